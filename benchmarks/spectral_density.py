"""The Hessian spectrum of the digits MLP before and at the edge of stability, by stochastic Lanczos quadrature.

    PYTHONPATH=src .venv/bin/python benchmarks/spectral_density.py [--width 32] [--steps 400] [--out DIR]

GD (the demo's problem: tanh MLP 64-w-w-10 on 500 digits, lr = 0.4, float32) runs ``--steps`` steps keeping its
iterates; at step 20 (sharpening) and at the last step (at the edge) it prints SLQ's largest nodes against
ARPACK's top 4 (float64 Hessian, tol 0) and 2/lr, the density's mass above lr S / 2 > 0.5 (the outliers), the
trace by SLQ and by Hutchinson (with their standard errors), and the HVPs and seconds spent (``--dense``: the
count above and the trace from the dense float64 spectrum too); writes the smoothed
densities (log scale, as in Ghorbani et al. 2019) to DIR/spectral_density.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import eosflow
from eosflow.cli import demo_table
from eosflow.experiment import prepare, run
from eosflow.hessian_operator import HessianOperator
from eosflow.precision import precision
from eosflow.spectral_density import hutchinson_trace, stochastic_lanczos
from eosflow.spectrum import lanczos

LR = 0.4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--order", type=int, default=80)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("/tmp/eosflow-spectral-density"))
    parser.add_argument("--dense", action="store_true", help="also the dense float64 spectrum (d HVPs, an eigh)")
    args = parser.parse_args()
    table = demo_table()
    table.update(steps=args.steps, lr=LR, spectrum={"every": 0}, record={"chunk": 100, "params_every": 1})
    table["problem"]["width"] = args.width
    with tempfile.TemporaryDirectory() as tmp:
        run(table, tmp)
        _, params = eosflow.load_params(tmp, "gd")
    objective = prepare(table)[1].objective
    with precision("float64"):  # the oracle's objective (the run's own is float32)
        objective64 = prepare({**table, "dtype": "float64"})[1].objective
    fig = Figure(figsize=(7.5, 3.6), dpi=110)
    ax = fig.subplots()
    print(f"digits MLP width {args.width}: d = {params.shape[1]}, GD at lr = {LR} (2/lr = {2 / LR:g})")
    for step, colour in ((20, "C0"), (args.steps - 1, "C3")):
        w = jnp.asarray(params[step])
        with precision("float64"):
            w64 = jnp.asarray(params[step], jnp.float64)
            top = np.asarray(lanczos(objective64, w64, k=4, tol=0.0).values)
            dense = None
            if args.dense:  # the whole spectrum: d HVPs and a dense eigh
                hessian = np.asarray(HessianOperator(objective64, w64) @ np.eye(w64.size))
                dense = np.linalg.eigvalsh(0.5 * (hessian + hessian.T))
        operator = HessianOperator(objective, w)
        started = time.perf_counter()
        density = stochastic_lanczos(operator, order=args.order, probes=args.probes)
        slq_seconds = time.perf_counter() - started
        started = time.perf_counter()
        trace, error = hutchinson_trace(operator, probes=100)
        hutchinson_seconds = time.perf_counter() - started
        largest = np.sort(np.unique(np.round(density.nodes.max(axis=1), 6)))[::-1][:4]
        outliers = float(np.mean(np.sum(density.weights * (LR * density.nodes / 2 > 0.5), axis=1)))
        print(f"\nstep {step}: lr S = {LR * top[0]:.4f}")
        print(f"  ARPACK top 4 (float64):             {np.array2string(top, precision=5)}")
        print(f"  SLQ largest node per probe (unique): {np.array2string(largest, precision=5)}")
        print(f"  density mass above lr x / 2 > 0.5:   {outliers:.2e} (= {outliers * params.shape[1]:.1f} eigenvalues)")
        if dense is not None:
            print(
                f"  dense float64 eigh: {int(np.sum(LR * dense / 2 > 0.5))} eigenvalues above, "
                f"trace {np.sum(dense):.2f}"
            )
        slq_trace, slq_error = density.trace()
        print(f"  trace: SLQ {slq_trace:.2f} +- {slq_error:.2f}, Hutchinson {trace:.2f} +- {error:.2f} (100 probes)")
        print(
            f"  cost: SLQ {density.hvps} HVPs in {slq_seconds:.1f} s (order {args.order}, {args.probes} probes), "
            f"Hutchinson 100 HVPs in {hutchinson_seconds:.1f} s"
        )
        grid = np.linspace(-1.0, 1.2 * 2 / LR, 2000)  # one grid and width for both steps
        ax.semilogy(grid, density.at(grid, width=0.05) + 1e-8, color=colour, label=f"step {step}")
    ax.axvline(2 / LR, color="0.55", lw=3, alpha=0.45, zorder=0.5, label="2 / lr")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (smoothed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "spectral_density.png")
    print(f"\n{args.out / 'spectral_density.png'}")


if __name__ == "__main__":
    main()
