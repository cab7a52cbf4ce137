"""How far rounding alone moves the central flow's predicted amplitude with 2-3 critical directions.

    # the pre-issue-16 trajectory (1a4c053: issue 19's tracker, the old flow code), dumped once:
    mkdir /tmp/base && git archive 1a4c053 src | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base/src .venv/bin/python benchmarks/flow_equivalence.py --only mlp/central_flow_k3 \
        --dump /tmp/base.npz
    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/central_rounding.py --against /tmp/base.npz

The case is flow_equivalence's ``mlp/central_flow_k3`` (digits MLP, d = 1,066, float64, lr = 1,
k = 3, 150 steps, 1-3 critical directions) with ``remeasure = true`` (the pre-issue-16 scheme).
Variants of the same arithmetic in other orders: this checkout as is (pair gradients and H U one
per iteration of `spectrum.column_loop`); the pair gradients, or the H U columns, or both, in
the old code's serial loops; and this checkout from a w0 moved by one ulp in every coordinate. Per variant: the largest
difference against the dump (relative to the column's largest magnitude) of the position, the
amplitude and Sigma's top eigenvalue, and at the worst step the top Hessian eigenvalues.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # a script: float64 for the 1e-12 contract

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import flow_equivalence  # noqa: E402
from eosflow.experiment import prepare  # noqa: E402
from eosflow.flows import central  # noqa: E402
from eosflow.flows.sdcp import pair_indices, pair_scale  # noqa: E402
from eosflow.spectrum import dense_top_eigenpairs  # noqa: E402

LABEL = "mlp/central_flow_k3"


def serial_pair_gradients(objective, w, critical, m=None):
    """The pre-issue-16 order: one third derivative at a time, in a loop over the m(m+1)/2 pairs."""
    size = critical.shape[1]
    m = size if m is None else m
    rows, cols = (jnp.asarray(index) for index in pair_indices(size))
    scale = jnp.asarray(pair_scale(size), w.dtype)

    def pair(p, out):
        return out.at[p].set(scale[p] * objective.third_derivative(w, critical[:, rows[p]], critical[:, cols[p]]))

    return jax.lax.fori_loop(0, m * (m + 1) // 2, pair, jnp.zeros((scale.size, w.size), w.dtype))


def serial_slack(self, w, critical):
    """The pre-issue-16 order: one HVP at a time, in a loop over the m critical columns."""
    U = critical.vectors
    (loss, grad), linear = jax.linearize(self.objective.value_and_grad, w)

    def column(i, out):
        return out.at[:, i].set(linear(U[:, i])[1])

    image = jax.lax.fori_loop(0, critical.count, column, jnp.zeros_like(U))
    return (loss, grad), (2.0 / self.lr) * jnp.eye(U.shape[1], dtype=w.dtype) - 0.5 * (U.T @ image + image.T @ U)


def run(variant: str) -> dict[str, np.ndarray]:
    jax.clear_caches()  # the compiled step of the previous variant would be reused
    pairs, slack = central.pair_gradients, central.CentralFlow._measured_slack
    if "pairs" in variant:
        central.pair_gradients = serial_pair_gradients
    if "columns" in variant:
        central.CentralFlow._measured_slack = serial_slack  # type: ignore[method-assign]
    try:
        _, problem, lr, steps, process, options, k_max = next(c for c in flow_equivalence.CASES if c[0] == LABEL)
        moved = (lambda w0: jnp.nextafter(w0, jnp.inf)) if variant == "one ulp" else None
        return flow_equivalence.run_case(
            problem, lr, steps, process, {**options, "remeasure": True}, k_max, moved=moved
        )
    finally:
        central.pair_gradients, central.CentralFlow._measured_slack = pairs, slack


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="flow_equivalence's dump of the base")
    args = parser.parse_args(argv)
    base = {key[len(LABEL) + 1 :]: value for key, value in np.load(args.against).items() if key.startswith(LABEL)}
    objective = None
    print("| variant | position | amplitude | Sigma_1 | worst step | m there | top 4 eigenvalues x lr there |")
    print("|---|---|---|---|---|---|---|")
    for variant in ("this checkout", "serial pairs", "serial columns", "serial pairs + columns", "one ulp"):
        rows = run(variant)
        gaps = {}
        for key in ("position", "amplitude", "covariance"):
            a, b = base[key], rows[key]
            gaps[key] = np.nanmax(np.abs(a - b)) / np.nanmax(np.abs(a))
        worst = int(np.nanargmax(np.abs(base["amplitude"] - rows["amplitude"])))
        if objective is None:
            _, problem, lr, *_ = next(c for c in flow_equivalence.CASES if c[0] == LABEL)
            objective = prepare({"lr": lr, "dtype": "float64", "problem": problem})[1].objective
        top = dense_top_eigenpairs(objective, jnp.asarray(base["position"][worst]), k=4).values * lr
        print(
            f"| {variant} | {gaps['position']:.1e} | {gaps['amplitude']:.1e} | {gaps['covariance']:.1e} | {worst} | "
            f"{int(rows['critical'][worst])} | {', '.join(f'{v:.5f}' for v in top)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
