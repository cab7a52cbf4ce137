"""HVPs of `SharpnessTracker` in a user's GD loop with each carry: the Ritz vectors or one power step of them.

GD (lr = 0.4) on the demo's MLP (d = 3466, float32) for 300 steps, the tracker updated at every step (k = 1 and 3,
tol 1e-3), with `warm_start` "previous" and "fitted"; prints the HVPs spent and the last reading of lr S.

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python \\
        benchmarks/tracker_carry.py
"""

import jax

from eosflow.cli import demo_table
from eosflow.experiment import prepare
from eosflow.tracker import SharpnessTracker

LR, STEPS = 0.4, 300


def main() -> None:
    _, problem, _, _ = prepare(demo_table())

    def loss(w):
        return problem.objective.value(w)

    grad = jax.jit(jax.grad(loss))
    print("| warm_start | carry | k | HVPs | lr S at the last step |\n|---|---|---|---|---|")
    for warm_start in ("previous", "fitted"):
        for carry in ("ritz", "power"):
            for k in (1, 3):
                tracker = SharpnessTracker(loss, k=k, warm_start=warm_start, carry=carry)
                update, state, w = jax.jit(tracker.update), tracker.init(problem.w0, jax.random.PRNGKey(0)), problem.w0
                for _ in range(STEPS):
                    state, eig = update(state, w)
                    w = w - LR * grad(w)
                print(
                    f"| {warm_start} | {carry} | {k} | {int(state.hvps)} | {LR * float(eig.values[0]):.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
