"""HVPs of GD's tracker with each carry on the tests' 12-wide float64 MLP (d = 1066), where the top eigenvalues
cluster: tests/test_spectrum.py's problem (k = 3, tol 1e-4, 60 steps, lr 0.5 and 0.85). Prints the HVPs with the Ritz
and the power carry, and the top four eigenvalues of the dense Hessian at w0.

    PYTHONPATH=src .venv/bin/python benchmarks/carry_small_mlp.py
"""

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)  # this script's choice: the problem is float64

from eosflow.experiment import prepare  # noqa: E402
from eosflow.problems import build_problem  # noqa: E402


def main() -> None:
    problem = build_problem({"name": "mlp", "width": 12, "n_train": 60, "n_test": 0}, 0, "float64")[0]
    top = np.linalg.eigvalsh(np.asarray(jax.jit(lambda w: problem.objective.hessian(w))(problem.w0)))[::-1][:4]
    print(f"d = {problem.w0.size}; top eigenvalues at w0: {np.round(top, 3)}")
    print("| lr | HVPs, ritz carry | HVPs, power carry |\n|---|---|---|")
    for lr in (0.5, 0.85):
        spent = {}
        for carry in ("ritz", "power"):
            table = {"lr": lr, "dtype": "float64", "steps": 60, "processes": ["gd"]}
            spectrum = {"k": 3, "k_max": 3, "tol": 1e-4, "max_iters": 60, "carry": carry}
            stepper = prepare({**table, "spectrum": spectrum}, problem)[3]["gd"]
            spent[carry] = int(np.asarray(stepper.advance(stepper.init(problem.w0), 60)[1]["hvps"]).sum())
        print(f"| {lr} | {spent['ritz']} | {spent['power']} |")


if __name__ == "__main__":
    main()
