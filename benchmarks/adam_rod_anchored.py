"""Adam's flows re-anchored on Adam's own state at step k: is the distance made early or late?

    PYTHONPATH=src python benchmarks/adam_rod_anchored.py [--entry mlp_digits-adam-eps] [--seed 0]
        [--anchors 10,100,250,400] [--end 1000]

Runs Adam from w0 (the adaptive suite's entry, float as the entry has it), and at each anchor step k starts
``adam_stable_flow`` and ``adam_rod_flow`` from Adam's state there instead of from w0: the centre
c_k = (w_{k-1} + 2 w_k + w_{k+1}) / 4, D = the centred m over [k, k+1], nu = (nu_k + nu_{k+1}) / 2 (the
flows' mapping, docs/adaptive.md section 3), the masses 1 - b^k, and the rod (-1)^k (w_k - c_k, m_k - m_bar_k).
Printed per anchor: each flow's mean distance to Adam over [k, end) and its distance at a few later steps,
beside Adam itself restarted from w_k + delta, |delta| = 1e-5 (a random direction): how far Adam's own
iterates move apart from a small perturbation (the limit of any model's pointwise prediction). Compare the
means with the same flows started from w0 (``benchmarks/adaptive_rows.py OUT --entries E --seeds S``).
"""

from __future__ import annotations

import argparse
import copy

import jax
import jax.numpy as jnp
import numpy as np

from eosflow.experiment import prepare
from eosflow.flows.flow import FlowState
from eosflow.flows.phase_rod import Rod
from eosflow.leaderboard import ADAPTIVE_SUITE, suite_tables


def adam_states(adam, w0, steps: list[int]) -> dict[int, object]:
    """Adam's state after each of ``steps`` (sorted) steps."""
    state, done, out = adam.init(w0), 0, {}
    for k in steps:
        if k > done:
            state, _ = adam.advance(state, k - done)
            done = k
        out[k] = state
    return out


def anchored(flow, states: dict, k: int, b1: float, b2: float):
    """(centre phase, rod) of the flows at Adam's step k (module docstring)."""
    w = {j: states[k + j].w for j in (-1, 0, 1, 2)}
    m = {j: states[k + j].rule.m for j in (-1, 0, 1, 2)}
    centre_w = (w[-1] + 2.0 * w[0] + w[1]) / 4.0
    centre_m = (m[-1] + 2.0 * m[0] + m[1]) / 4.0
    next_m = (m[0] + 2.0 * m[1] + m[2]) / 4.0
    phase = flow.start_phase(centre_w)._replace(
        w=centre_w,
        direction=0.5 * (centre_m + next_m),
        nu=0.5 * (states[k].rule.nu + states[k + 1].rule.nu),
        mass=jnp.asarray([1.0 - b1**k, 1.0 - b2**k], centre_w.dtype),
    )
    sign = 1 - 2 * (k % 2)
    return phase, Rod(sign * (w[0] - centre_w), sign * (m[0] - centre_m))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", default="mlp_digits-adam-eps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anchors", default="10,100,250,400")
    parser.add_argument("--end", type=int, default=1000)
    args = parser.parse_args()
    entries = [entry for entry in ADAPTIVE_SUITE if entry.name == args.entry and entry.optimizer == "adam"]
    if not entries:
        raise SystemExit(f"--entry: {args.entry!r} is not an Adam entry of the adaptive suite")
    table = copy.deepcopy(suite_tables(suite=tuple(entries))[args.entry])
    table["seed"] = args.seed
    _, problem, _, processes = prepare(table)
    adam = processes["adam"]
    b1, b2 = adam.rule.beta1, adam.rule.beta2
    anchors = [int(k) for k in args.anchors.split(",")]
    if min(anchors) < 1 or max(anchors) + 2 >= args.end:
        raise SystemExit(f"--anchors: each must lie in [1, {args.end - 3}] (--end {args.end})")
    states = adam_states(adam, problem.w0, sorted({k + j for k in anchors for j in (-1, 0, 1, 2)}))
    for k in anchors:
        horizon = args.end - k
        _, rows = adam.advance(states[k], horizon)
        iterates = np.asarray(rows["position"], np.float64)
        marks = [h for h in (1, 50, 100, 200, 400, 600, 800) if h < horizon]
        print(f"anchor {k} (to step {args.end}), distance to Adam: mean over [k, end), then at k + h")
        centre, rod = anchored(processes["adam_rod_flow"], states, k, b1, b2)
        for name, z in (("adam_stable_flow", centre), ("adam_rod_flow", (centre, rod))):
            flow = processes[name]
            start = FlowState(z, states[k].vectors, jnp.asarray(jnp.nan, centre.w.dtype), jnp.asarray(k))
            positions = np.asarray(flow.advance(start, horizon)[1]["position"], np.float64)
            d = np.linalg.norm(iterates - positions, axis=1)
            print(f"  {name:18s} mean {d.mean():.4g}  " + " ".join(f"+{h}: {d[h]:.3g}" for h in marks))
        delta = jax.random.normal(jax.random.PRNGKey(1), problem.w0.shape, problem.w0.dtype)
        delta = 1e-5 * delta / jnp.linalg.norm(delta)
        nudged = states[k]._replace(w=states[k].w + delta, previous=states[k].previous + delta)
        d = np.linalg.norm(iterates - np.asarray(adam.advance(nudged, horizon)[1]["position"], np.float64), axis=1)
        print(f"  {'adam + 1e-5':18s} mean {d.mean():.4g}  " + " ".join(f"+{h}: {d[h]:.3g}" for h in marks))


if __name__ == "__main__":
    main()
