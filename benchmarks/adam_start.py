"""The start of a bias-corrected moment: Adam's first steps against its stable flow's, by the flow's start.

    PYTHONPATH=src python benchmarks/adam_start.py [--lrs 0.04,0.02,0.01] [--beta1s 0.5,0.9]

Adam (b2 = 0.99, eps = 0.1, bias correction) on the rotated quadratic with eigenvalues 1, 0.5, 0.2, 0.1
and |w0| = 3, float64; ``adam_stable_flow`` with ``start = "lag"`` (the moments start at g(w0)) and
``"extrapolated"`` (at the gradient extrapolated back by the lookback alpha, docs/adaptive.md section 3).
Printed: the distance to Adam after 1 and after 5 steps per lr, and the ratio between consecutive lrs
(4: an O(lr^2) error; 8: O(lr^3)).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from eosflow.experiment import prepare
from eosflow.flows.moments import lookback

sys.path.insert(0, str(Path(__file__).parent))
from adam_modified_equation import B2, PROBLEMS  # noqa: E402


def distances(lr: float, beta1: float, start: str) -> np.ndarray:
    """||w_adam - w_flow|| at steps 0..5 (the problem and Adam's b2 of ``adam_modified_equation.py``)."""
    adam = {"beta1": beta1, "beta2": B2, "eps": 0.1}
    processes = ["adam", "adam_stable_flow"]
    table = dict(lr=lr, dtype="float64", seed=1, processes=processes, problem=PROBLEMS["quadratic"])
    table.update(spectrum={"every": 0}, adam=adam, adam_stable_flow={"start": start})
    _, problem, _, built = prepare(table)
    rows = {name: np.asarray(p.advance(p.init(problem.w0), 6)[1]["position"]) for name, p in built.items()}
    return np.linalg.norm(rows["adam"] - rows["adam_stable_flow"], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", default="0.04,0.02,0.01")
    parser.add_argument("--beta1s", default="0.5,0.9")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)  # a script, not the library: float64 for the quadratic
    lrs = [float(lr) for lr in args.lrs.split(",")]
    for b in [*(float(b) for b in args.beta1s.split(",")), B2]:
        lag = b / (1.0 - b)
        rate = 1.0 / (lag + 0.5)
        print(f"lookback alpha at b = {b}: {lookback(rate, 1.0 - lag * rate):.3f}")
    for beta1 in (float(b) for b in args.beta1s.split(",")):
        for start in ("lag", "extrapolated"):
            d = np.array([distances(lr, beta1, start) for lr in lrs])
            for step in (1, 5):
                ratios = ", ".join(f"{r:.2f}" for r in d[:-1, step] / d[1:, step])
                values = " / ".join(f"{v:.3g}" for v in d[:, step])
                print(f"b1 = {beta1}, start = {start:12s} step {step}: {values}  (ratios {ratios})")


if __name__ == "__main__":
    main()
