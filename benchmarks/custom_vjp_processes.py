"""Every process on a model with a jax.custom_vjp, against its plain twin, and what the detection trace costs
(docs/problems.md, "A model with a `jax.custom_vjp`").

    PYTHONPATH=src .venv/bin/python benchmarks/custom_vjp_processes.py

Prints, per registered process that takes an in-memory problem: the last loss of 6 steps on a 3-6-2 MLP
with a custom_vjp swish and on the same MLP written plainly (float64), and their relative difference;
then the same processes on a neural ODE (jax.experimental.ode.odeint, 3 steps), ok or the error's first
words; then the detection trace's time on the built-in nets and the custom_vjp functions it finds in ten
common JAX functions (none expected).
"""

import sys
import time
import warnings
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.ode import odeint

import eosflow
import eosflow.process as registry
from eosflow.derivative_chain import custom_vjp_names
from eosflow.problems import build_problem
from eosflow.tracing import equations

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from user_models import swish  # noqa: E402  (a custom_vjp swish, as a user writes one)

SPECIFIC = ("particle_model",)  # models of one built-in problem only


def options(name: str) -> dict:
    return {name: {"batch_size": 4}} if name in ("sgd", "langevin") else {}


def last_loss(problem, name: str, steps: int) -> float | str:
    lr = 0.01 if any(part in name for part in ("adam", "rmsprop")) else 0.3
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = eosflow.simulate(problem, lr=lr, steps=steps, processes=[name], options=options(name))
        return float(ds["loss"].values[-1, -1])
    except Exception as error:  # reported, not raised: the table says which processes run
        return f"{type(error).__name__}: {str(error)[:70]}"


def main() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), rng.normal(size=(40, 2))
    params = {"w": rng.normal(size=(3, 6)) / 2, "v": rng.normal(size=(6, 2)) / 3}
    custom = eosflow.Problem.from_model(lambda p, x: swish(x @ p["w"]) @ p["v"], params, x, y)
    plain = eosflow.Problem.from_model(lambda p, x: jax.nn.silu(x @ p["w"]) @ p["v"], params, x, y)
    names = [name for name in sorted(registry.PROCESSES) if name not in SPECIFIC]
    print("| process | custom_vjp loss | plain loss | rel. difference |")
    print("|---|---|---|---|")
    for name in names:
        a, b = last_loss(custom, name, 6), last_loss(plain, name, 6)
        diff = abs(a - b) / abs(b) if isinstance(a, float) and isinstance(b, float) else float("nan")
        print(f"| {name} | {a} | {b} | {diff:.1e} |")

    ode_params = {"w": rng.normal(size=(2, 2)) / 2, "b": rng.normal(size=2) / 4}
    ox, oy = rng.normal(size=(20, 2)), np.sin(rng.normal(size=(20, 2)))

    def neural_ode(p, x):
        field = lambda h, t, p: jnp.tanh(h @ p["w"] + p["b"])  # noqa: E731
        return odeint(field, x, jnp.array([0.0, 1.0]), p, rtol=1e-10, atol=1e-10)[-1]

    ode = eosflow.Problem.from_model(neural_ode, ode_params, ox, oy)
    results = {name: last_loss(ode, name, 3) for name in names}
    failed = {name: r for name, r in results.items() if isinstance(r, str)}
    print(f"\nneural ODE ({ode.objective.loss_on.names}): {len(names) - len(failed)} of {len(names)} processes run")
    for name, error in failed.items():
        print(f"  {name}: {error}")

    print("\ndetection trace (eosflow.tracing.equations) on the built-in nets, best of 3:")
    for name in ("mlp", "cnn", "resnet", "vit"):
        problem = build_problem({"name": name}, 0, "float32")[0]
        objective = problem.objective
        times = []
        for _ in range(3):
            start = time.perf_counter()
            equations(objective.loss_on, problem.w0, objective.data)
            times.append(time.perf_counter() - start)
        print(f"  {name}: {1e3 * min(times):.0f} ms")
    z = jnp.ones((2, 5, 4, 8))
    common = {
        "jax.nn.dot_product_attention": lambda q: jax.nn.dot_product_attention(q, q, q).sum(),
        "jax.nn.gelu": lambda q: jax.nn.gelu(q).sum(),
        "optax.softmax_cross_entropy": lambda q: optax.softmax_cross_entropy(q, jax.nn.softmax(q)).sum(),
        "optax.softmax_cross_entropy_with_integer_labels": lambda q: optax.softmax_cross_entropy_with_integer_labels(
            q.reshape(-1, 8), jnp.zeros(40, int)
        ).sum(),
        "jnp.linalg.norm": lambda q: jnp.linalg.norm(q),
        "jax.scipy.special.logsumexp": lambda q: jax.scipy.special.logsumexp(q),
        "optax.safe_norm": lambda q: optax.safe_norm(q, 1e-6).sum(),
        "eqx.nn.MultiheadAttention": lambda q: eqx.nn.MultiheadAttention(2, 8, key=jax.random.PRNGKey(0))(
            q[0, 0], q[0, 0], q[0, 0]
        ).sum(),
        "jnp.linalg.eigh": lambda q: jnp.linalg.eigh(q[0, 0] @ q[0, 0].T)[0].sum(),
        "jax.checkpoint": lambda q: jax.checkpoint(lambda a: jnp.sin(a).sum())(q),
    }
    print("\ncustom_vjp functions found in common JAX functions:")
    for name, fn in common.items():
        print(f"  {name}: {custom_vjp_names(equations(fn, z)) or 'none'}")


if __name__ == "__main__":
    main()
