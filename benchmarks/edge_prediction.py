"""The central flow's prediction at GD's own iterates, against GD's oscillation and loss (eosflow.edge_prediction).

    PYTHONPATH=src .venv/bin/python benchmarks/edge_prediction.py [--steps 600] [--lr 0.4] [--dtype float32]
        [--width 32] [--activation tanh] [--k 3] [--seed 0]
        [--window 100] [--settled 400] [--entry NAME] [--figure PNG]
        [--optimizer rmsprop [--decay 0.99] [--eps 3e-3] [--bias-correction]] [--optimizer adam0 [--decay] [--eps]]

GD on the demo's problem (tanh MLP 64-w-w-10 on 500 digits, MSE) runs ``--steps`` steps keeping its iterates. Then,
as a user's loop would, at every step t >= 1 a warm-started tracker (k pairs, tol 1e-4) measures H at the
midpoint c_t = (w_t + w_{t-1}) / 2 and ``predict`` gives X there; ``offsets`` gives GD's x = U^T (w_t - w_{t-1}) / 2.
Per window of steps it prints the means of: m (critical directions), tr X (the predicted variance), |x_m|^2 (the
measured one, on the m critical directions of each step), the predicted loss L(c) + 1/2 sum X_ii lambda_i, GD's
own loss L(w_t), the loss at the midpoint L(c) (what the prediction adds to), and the share of steps where every
tracked pair was critical (the critical set may then be cut: raise ``--k``); before the edge, lambda_1's change
per step against its predicted rate, lr times ``sharpening``. Then the cost of one ``predict``
(median ms, after compilation) in gradients.

``--optimizer rmsprop`` runs optax.rmsprop (``--lr``, ``--decay``, ``--eps`` inside the root as optax's default,
``--bias-correction``) instead of GD, keeping its state at every step: the tracker then measures P^-1/2 H P^-1/2
with P read from the state, ``predict`` is given the optimizer and its state (RMSProp's central flow, nu fed by the
oscillation), and ``offsets`` P, so that x is in X's coordinates. ``--optimizer adam0`` runs optax.adam at b1 = 0
(b2 = ``--decay``, ``--eps`` outside the root): RMSProp with bias correction, read from Adam's state.
"""

from __future__ import annotations

import argparse
import tempfile
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

import eosflow
from eosflow import edge_prediction, optimizer_edges
from eosflow.cli import demo_table
from eosflow.experiment import prepare, run
from eosflow.leaderboard import ARCHITECTURES, SUITE
from eosflow.precision import precision


def draw(data: np.ndarray, window: int, out: str, title: str, who: str = "GD's") -> None:
    """Two panels over the steps: the optimizer's (``who``) loss, the predicted loss and the loss at the midpoint;
    the measured |x_m|^2 and the predicted tr X, each as a running mean over ``window`` steps."""
    from matplotlib.figure import Figure

    steps = data[:, 0]
    smooth = np.ones(window) / window
    fig = Figure(figsize=(7.5, 6.0), dpi=110)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, data[:, 5], color="0.6", lw=0.8, label=f"{who} loss")
    top.plot(steps, data[:, 4], color="C1", lw=1.2, label="predicted loss (central flow, at the midpoints)")
    top.plot(steps, data[:, 6], color="C0", lw=1.0, ls="--", label="loss at the midpoints")
    top.set_yscale("log")
    top.set_ylabel("loss")
    top.legend(fontsize=7)
    top.set_title("\n".join(textwrap.wrap(title, 130)), fontsize=7)
    valid = steps[window - 1 :]
    bottom.plot(valid, np.convolve(data[:, 3], smooth, "valid"), color="0.4", label=f"{who} |x_m|^2 (running mean)")
    bottom.plot(valid, np.convolve(data[:, 2], smooth, "valid"), color="C1", label="predicted tr X (running mean)")
    bottom.set_ylabel(f"oscillation variance, mean over {window} steps")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=7)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def optax_iterates(loss_fn, w0, optimizer, steps: int):
    """optax's iterates w_0 .. w_{steps-1} (steps, d) and its state after each (stacked: the state at row t is the
    one w_t was made with, whose P the next update uses)."""

    def step(carry, _):
        w, state = carry
        updates, state = optimizer.transform.update(jax.grad(loss_fn)(w), state, w)
        w = w + updates
        return (w, state), (w, state)

    state = optimizer.transform.init(w0)
    _, (ws, states) = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps - 1))((w0, state))
    first = jax.tree.map(lambda a: a[None], (w0, state))
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, (ws, states))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--entry", help="a GD entry of the leaderboard (its problem, lr and dtype) instead of the demo's"
    )
    parser.add_argument(
        "--figure", help="also draw the run into this PNG: losses, and variances smoothed over --window"
    )
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--settled", type=int, default=400, help="the summary line's first step")
    parser.add_argument("--optimizer", choices=("gd", "rmsprop", "adam0"), default="gd")
    parser.add_argument("--decay", type=float, default=0.99, help="RMSProp's decay (beta2)")
    parser.add_argument("--eps", type=float, default=3e-3, help="RMSProp's eps (inside the root, optax's default)")
    parser.add_argument("--bias-correction", action="store_true", help="RMSProp's bias correction")
    args = parser.parse_args()
    table = demo_table()
    table.update(
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        dtype=args.dtype,
        spectrum={"every": 0},
        record={"chunk": 100, "params_every": 1},
    )
    table["problem"].update(width=args.width, activation=args.activation)
    if args.entry:
        (entry,) = [e for e in (*SUITE, *ARCHITECTURES) if e.name == args.entry and e.optimizer == "gd"]
        table.update(problem=entry.table["problem"], lr=entry.table["lr"], dtype=entry.table.get("dtype", "float64"))
        args.lr, args.dtype = table["lr"], table["dtype"]
    preconditioned = args.optimizer != "gd"  # RMSProp, or Adam at b1 = 0: RMSProp's reading
    optimizer = {
        "gd": None,
        "rmsprop": optimizer_edges.rmsprop(
            args.lr, decay=args.decay, eps=args.eps, bias_correction=args.bias_correction
        ),
        "adam0": optimizer_edges.adam(args.lr, b1=0.0, b2=args.decay, eps=args.eps),
    }[args.optimizer]
    with precision(args.dtype), tempfile.TemporaryDirectory() as tmp:
        problem = prepare(table)[1]
        objective = problem.objective

        def loss_fn(w):  # the loss of the flat parameter vector, on the full batch
            return objective.value(w)

        if preconditioned:
            params, states = optax_iterates(loss_fn, problem.w0, optimizer, args.steps)
        else:
            run(table, tmp)
            _, params = eosflow.load_params(tmp, "gd")

        tracker = eosflow.SharpnessTracker(loss_fn, k=args.k, tol=1e-4, max_iters=100)
        update = jax.jit(tracker.update)
        state = tracker.init(jnp.asarray(params[0]), jax.random.key(args.seed))
        rows = []
        for t in range(1, args.steps):
            now, before = jnp.asarray(params[t]), jnp.asarray(params[t - 1])
            centre = (now + before) / 2
            opt_state = jax.tree.map(lambda a, t=t: a[t], states) if preconditioned else None
            preconditioner = optimizer.preconditioner(opt_state) if preconditioned else None
            state, eig = update(state, centre, None, preconditioner)
            prediction = edge_prediction.predict(
                loss_fn, centre, None, eig, args.lr, optimizer=optimizer, opt_state=opt_state
            )
            m = int(prediction.critical)
            x = np.asarray(edge_prediction.offsets(now, before, eig, preconditioner=preconditioner))
            rows.append(
                (
                    t,
                    m,
                    float(jnp.trace(prediction.covariance)),
                    float(np.sum(x[:m] ** 2)),
                    float(prediction.predicted_loss),
                    float(loss_fn(now)),
                    float(prediction.loss),
                    args.lr * float(eig.values[0]) / 2,
                    float(m > 0 and not int(prediction.complete)),
                    args.lr * float(prediction.sharpening[0]),  # lambda_1's predicted change over one step
                )
            )
        data = np.array(rows)

        times = []
        for _ in range(9):
            started = time.perf_counter()
            jax.block_until_ready(
                edge_prediction.predict(loss_fn, centre, None, eig, args.lr, optimizer=optimizer, opt_state=opt_state)
            )
            times.append(time.perf_counter() - started)
        grad = jax.jit(jax.grad(loss_fn))
        grad(centre).block_until_ready()
        started = time.perf_counter()
        for _ in range(20):
            grad(centre).block_until_ready()
        grad_ms = 1e3 * (time.perf_counter() - started) / 20

    name = {
        "gd": "GD",
        "rmsprop": f"optax.rmsprop (decay {args.decay}, eps {args.eps}, bias correction {args.bias_correction})",
        "adam0": f"optax.adam (b1 0, b2 {args.decay}, eps {args.eps} outside the root)",
    }[args.optimizer]
    who = {"gd": "GD's", "rmsprop": "RMSProp's", "adam0": "Adam's"}[args.optimizer]
    title = (
        (
            f"{args.entry} (the leaderboard's problem)"
            if args.entry
            else f"digits MLP ({args.activation}, width {args.width}), MSE"
        )
        + f", d = {params.shape[1]}, {name} at lr = {args.lr}, "
        f"{args.dtype}, seed {args.seed}; tracker k = {args.k}, tol 1e-4, at the midpoints"
    )
    print(title)
    print(
        "| steps | lr S/2 (mean) | m (mean) | predicted tr X | measured abs(x_m)^2 | measured / predicted "
        f"| predicted loss | {who} loss | loss at the midpoint | steps with every tracked pair critical |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for start in range(0, args.steps, args.window):
        part = data[(data[:, 0] >= start) & (data[:, 0] < start + args.window)]
        if not len(part):
            continue
        predicted, measured = part[:, 2].mean(), part[:, 3].mean()
        ratio = f"{measured / predicted:.3f}" if predicted > 0 else "-"
        print(
            f"| {int(part[0, 0])}-{int(part[-1, 0])} | {part[:, 7].mean():.4f} | {part[:, 1].mean():.2f} | "
            f"{predicted:.3e} | {measured:.3e} | {ratio} | {part[:, 4].mean():.5f} | {part[:, 5].mean():.5f} | "
            f"{part[:, 6].mean():.5f} | {100 * part[:, 8].mean():.0f}% |"
        )
    sharpness = 2 * data[:, 7] / args.lr
    growth, predicted_growth = np.diff(sharpness), data[:-1, 9]
    before = (data[:-1, 1] == 0) & (data[1:, 1] == 0)  # no critical direction at either end of the step
    print(
        "\nprogressive sharpening before the edge: lambda_1's change per step, measured (between consecutive "
        "midpoints) and predicted (lr sharpening_1)"
    )
    print("| steps | measured | predicted | measured / predicted |")
    print("|---|---|---|---|")
    for start in range(0, args.steps, args.window):
        part = before & (data[:-1, 0] >= start) & (data[:-1, 0] < start + args.window)
        if part.sum() < args.window // 2:
            continue
        measured, predicted = growth[part].mean(), predicted_growth[part].mean()
        print(f"| {start}-{start + args.window - 1} | {measured:.3e} | {predicted:.3e} | {measured / predicted:.3f} |")
    late = data[data[:, 0] >= args.settled]
    windows = [
        late[(late[:, 0] >= s) & (late[:, 0] < s + args.window)] for s in range(args.settled, args.steps, args.window)
    ]
    off = [abs(w[:, 4].mean() / w[:, 5].mean() - 1) for w in windows if len(w)]
    off_centre = [abs(w[:, 6].mean() / w[:, 5].mean() - 1) for w in windows if len(w)]
    ratios = [w[:, 3].mean() / w[:, 2].mean() for w in windows if len(w) and w[:, 2].mean() > 0]
    if not ratios:
        print(f"\nno critical direction from step {args.settled} on: nothing to compare")
    else:
        print(
            f"\nsteps {args.settled}-{args.steps - 1}: measured / predicted tr X = "
            f"{late[:, 3].sum() / late[:, 2].sum():.3f} "
            f"(per window {min(ratios):.3f} to {max(ratios):.3f}); the predicted loss is off {who} window mean by "
            f"{100 * np.mean(off):.2f}% on average (at most {100 * max(off):.2f}%), the loss at the midpoint by "
            f"{100 * np.mean(off_centre):.2f}% (at most {100 * max(off_centre):.2f}%)"
        )
    if args.figure:
        draw(data, args.window, args.figure, title, who)
    print(
        f"\none predict (k = {args.k}: {args.k * (args.k + 1) // 2} third derivatives): "
        f"{1e3 * float(np.median(times)):.1f} ms; one gradient {grad_ms:.3f} ms"
    )


if __name__ == "__main__":
    main()
