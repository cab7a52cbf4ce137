"""SGD's limiting dynamics on an MLP on digits: the anomalous-diffusion exponent and the local
displacement law delta ~ lr^2 tr(Sigma_g) / (S (1 - beta^2)).

    .venv/bin/python benchmarks/sgd_diffusion.py [--out DIR] [--quick]

1. A long run (``eosflow.experiment.run``) of SGD with momentum and weight decay, positions saved
   every ``params_every`` steps; after the loss settles, the exponent c of Delta_k ~ k^c is fitted
   from the checkpoint and on consecutive segments (as the run's report does; it is written too).
2. Independent replicas continued from the checkpoint: the exponent of E Delta_k with a jackknife
   interval over replicas, in several lag windows (the curve has crossovers), and its split into
   the replicas' common drift and their spread (the noise-driven part).
3. From the converged weights, a grid of (lr, S, beta): each point equilibrates, then the mean
   local displacement ||theta_{k+1} - theta_k||^2 and tr(Sigma_g) are measured. Printed: the
   ratio to lr^2 tr(Sigma_g) / (S (1 - beta^2)), and least-squares fits of
   log delta = a + b log(lr^2 / (S (1 - beta^2)))  and  log delta = a + b1 log lr + b2 log S + b3 log(1 - beta^2).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

jax.config.update("jax_enable_x64", True)  # this script's choice: its oracles and prepare() compute in float64

import eosflow
from eosflow.experiment import prepare, run
from eosflow.report import make_report
from eosflow.report_sgd import settled_step
from eosflow.theory.diffusion import (
    fit_exponent,
    global_displacement,
    predicted_local_displacement,
    segment_displacements,
)

PROBLEM = {
    "name": "mlp",
    "dataset": "digits",
    "n_train": 500,
    "n_test": 0,
    "width": 32,
    "depth": 2,
    "loss": "cross_entropy",
}
BASE = {"batch_size": 32, "momentum": 0.9, "weight_decay": 1e-3}
LR = 0.05


def long_run(out: Path, steps: int, params_every: int) -> tuple[np.ndarray, int]:
    """The run and its report; prints the two single-run fits. Returns (w at the checkpoint, checkpoint)."""
    table = {
        "name": "sgd_diffusion_mlp_digits",
        "steps": steps,
        "lr": LR,
        "seed": 0,
        "dtype": "float32",
        "processes": ["sgd"],
        "problem": PROBLEM,
        "spectrum": {"every": 0},
        "record": {"chunk": 5000, "params_every": params_every},
        "sgd": {**BASE, "loss_every": 50},
    }
    started = time.perf_counter()
    run(table, out, overwrite=True)
    report = make_report(out)
    ds = eosflow.load(out)
    checkpoint = settled_step(ds["loss"].sel(process="sgd").values, ds["step_norm_sq"].sel(process="sgd").values)
    saved, params = eosflow.load_params(out, "sgd")
    first = int(np.searchsorted(saved, checkpoint))
    checkpoint, late = int(saved[first]), params[first:].astype(np.float64)
    print(
        f"long run: {steps} steps of SGD (lr {LR}, S {BASE['batch_size']}, beta {BASE['momentum']}, "
        f"lam {BASE['weight_decay']}), d = {params.shape[1]}, {time.perf_counter() - started:.0f} s "
        f"with its report ({report})"
    )
    print(
        f"checkpoint (loss and local displacement settled): step {checkpoint}; {len(late)} saved positions after it\n"
    )
    print("| curves | lag window (steps) | exponent c | 95% interval | method |")
    print("|---|---|---|---|---|")
    single = global_displacement(late)
    fit = fit_exponent(np.arange(1, len(single)) * params_every, single[1:])
    print(
        f"| one, from the checkpoint | {fit.window[0]:g}-{fit.window[1]:g} | {fit.exponent:.3f} | "
        f"[{fit.low:.3f}, {fit.high:.3f}] | {fit.method} |"
    )
    for segments in (4, 8, 16):
        curves = segment_displacements(late, segments)
        lags = np.arange(curves.shape[1]) * params_every
        fit = fit_exponent(lags[1:], curves[:, 1:])
        print(
            f"| {segments} consecutive segments | {fit.window[0]:g}-{fit.window[1]:g} | {fit.exponent:.3f} | "
            f"[{fit.low:.3f}, {fit.high:.3f}] | {fit.method} |"
        )
    print()
    return late[0], checkpoint


def replicas(w_checkpoint: np.ndarray, steps: int, every: int, count: int) -> None:
    """``count`` independent continuations (fresh minibatch streams) from the checkpoint, in lockstep.

    From the Gram matrices G_k[r, s] = <x_k^r, x_k^s> of the displacements x_k^r = theta_k^r - theta_0:
    - E Delta_k (mean of G_k[r, r]): its exponent, with the jackknife over replicas (the honest
      interval for that checkpoint);
    - the common drift ||E theta_k - theta_0||^2 and the spread E||theta_k - E theta_k||^2 (the
      part of Delta the noise makes: replicas separating), each estimated without bias, and the
      spread's exponent with a delete-one-replica jackknife.
    """
    table = {
        "lr": LR,
        "dtype": "float32",
        "processes": ["sgd"],
        "problem": PROBLEM,
        "spectrum": {"every": 0},
        "sgd": {**BASE, "loss_every": 1000},
    }
    _, problem, _, processes = prepare(table)
    started = time.perf_counter()
    chains = [eqx.tree_at(lambda p: p.sample_key, processes["sgd"], jax.random.PRNGKey(1000 + r)) for r in range(count)]
    states = [c.init(problem.w0)._replace(w=jnp.asarray(w_checkpoint, jnp.float32)) for c in chains]
    grams = []
    for _ in range(steps // 1000):
        kept = []
        for r, chain in enumerate(chains):
            states[r], rows = chain.advance(states[r], 1000)
            kept.append(np.asarray(rows["position"][::every], np.float64) - w_checkpoint)
        kept = np.stack(kept)  # replicas x saved x d
        grams.append(np.einsum("rnd,snd->nrs", kept, kept))
    gram = np.concatenate(grams)  # saved x replicas x replicas
    lags = np.arange(len(gram)) * every
    curves = np.einsum("nrr->rn", gram)

    def drift_and_spread(members):
        sub = gram[:, members][:, :, members]
        n = len(members)
        total = np.einsum("nrs->n", sub) / n**2  # ||mean x||^2
        spread = (np.einsum("nrr->n", sub) / n - total) * n / (n - 1)  # unbiased E||x - E x||^2
        return total - spread / n, spread  # unbiased ||E x||^2, spread

    everyone = np.arange(count)
    drift, spread = drift_and_spread(everyone)
    print(
        f"{count} replicas x {steps} steps from the checkpoint ({time.perf_counter() - started:.0f} s); "
        "the momentum buffer restarts at 0 (it relaxes in ~1 / (1 - beta) = 10 steps)\n"
    )
    print("| curve | lag window (steps) | exponent c | 95% interval | method |")
    print("|---|---|---|---|---|")
    windows = [None, (every, 10 * every), (10 * every, 100 * every), (100 * every, lags[-1] / 3)]
    for window in windows:
        fit = fit_exponent(lags[1:], curves[:, 1:], window=window)
        print(
            f"| E Delta_k | {fit.window[0]:g}-{fit.window[1]:g} | {fit.exponent:.3f} | "
            f"[{fit.low:.3f}, {fit.high:.3f}] | {fit.method} |"
        )
    for window in windows:
        fit = fit_exponent(lags[1:], spread[1:], window=window)
        leave_one_out = np.array(
            [
                fit_exponent(lags[1:], drift_and_spread(np.delete(everyone, r))[1][1:], window=window).exponent
                for r in range(count)
            ]
        )
        error = np.sqrt((count - 1) / count * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
        half = float(scipy.stats.t.ppf(0.975, count - 1)) * error
        print(
            f"| spread E||theta_k - E theta_k||^2 | {fit.window[0]:g}-{fit.window[1]:g} | {fit.exponent:.3f} | "
            f"[{fit.exponent - half:.3f}, {fit.exponent + half:.3f}] | jackknife over {count} replicas |"
        )
    shown = [lag for lag in (20, 100, 1000, 10000, 50000) if lag <= lags[-1]]
    print(
        "\nshare of E Delta_k that is the common drift ||E theta_k - theta_0||^2: "
        + ", ".join(f"k = {lag}: {drift[lag // every] / curves.mean(axis=0)[lag // every]:.2f}" for lag in shown)
        + "\n"
    )


def grid(w_converged: np.ndarray, equilibrate: int, measure: int, lrs, batches, momenta) -> None:
    rows = []
    print("| lr | S | beta | mean delta | tr Sigma_g | predicted lr^2 tr / (S (1 - beta^2)) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for lr, batch, beta in itertools.product(lrs, batches, momenta):
        table = {
            "lr": lr,
            "dtype": "float32",
            "processes": ["sgd"],
            "problem": PROBLEM,
            "spectrum": {"every": 0},
            "sgd": {
                **BASE,
                "batch_size": batch,
                "momentum": beta,
                "loss_every": 1000,
                "noise_every": max(1, measure // 8),
            },
        }
        _, problem, _, processes = prepare(table)
        sgd = processes["sgd"]
        state = sgd.init(problem.w0)._replace(w=np.asarray(w_converged, np.float32))
        state, _ = sgd.advance(state, equilibrate)
        _, observed = sgd.advance(state, measure)
        delta = float(np.mean(observed["step_norm_sq"]))
        trace = float(np.nanmean(observed["noise_trace"]))
        predicted = predicted_local_displacement(trace / batch, lr, beta)
        rows.append((lr, batch, beta, delta, trace))
        print(
            f"| {lr:g} | {batch} | {beta:g} | {delta:.4g} | {trace:.4g} | {predicted:.4g} | {delta / predicted:.3f} |"
        )
    lr, batch, beta, delta, trace = map(np.array, zip(*rows))
    scale = lr**2 / (batch * (1 - beta**2))
    slope, intercept = np.polyfit(np.log(scale), np.log(delta), 1)
    residual = np.log(delta) - (intercept + slope * np.log(scale))
    r2 = 1 - residual.var() / np.log(delta).var()
    print(
        f"\nfit log delta = a + b log(lr^2 / (S (1 - beta^2))): b = {slope:.3f} (law: 1), "
        f"e^a = {np.exp(intercept):.4g} (mean tr Sigma_g = {trace.mean():.4g}), R^2 = {r2:.4f}"
    )
    design = np.stack([np.ones_like(lr), np.log(lr), np.log(batch), np.log(1 - beta**2)], axis=1)
    coefficients = np.linalg.lstsq(design, np.log(delta), rcond=None)[0]
    print(
        f"fit log delta = a + b1 log lr + b2 log S + b3 log(1 - beta^2): b1 = {coefficients[1]:.3f} (law: 2), "
        f"b2 = {coefficients[2]:.3f} (law: -1), b3 = {coefficients[3]:.3f} (law: -1)"
    )
    ratio = delta / (scale * trace)
    print(
        f"delta / (lr^2 tr Sigma_g / (S (1 - beta^2))): mean {ratio.mean():.3f}, "
        f"range [{ratio.min():.3f}, {ratio.max():.3f}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/eosflow_sgd_diffusion", help="run directory of the long run")
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick:
        w, _ = long_run(Path(args.out), 6000, 10)
        replicas(w, 4000, 10, 3)
        grid(w, 1000, 1000, (0.02, 0.05), (16, 64), (0.0, 0.9))
    else:
        w, checkpoint = long_run(Path(args.out), 60000, 20)
        replicas(w, 60000 - checkpoint // 1000 * 1000, 20, 6)
        grid(w, 4000, 6000, (0.01, 0.03, 0.05), (16, 64), (0.0, 0.5, 0.9))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
