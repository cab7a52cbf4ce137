"""Cost and accuracy of the eigenpair tracker along GD trajectories on the digits MLP, per phase.

    .venv/bin/python benchmarks/sharpness.py [--quick] [--widths 32 140] [--steps 700] [--every 25]
    .venv/bin/python benchmarks/sharpness.py --leaderboard mlp_digits matrix_factorization [--rules ...]

For each width (32: d = 3466; 140: d = 30250) GD runs once (lr = 0.4, tanh MLP 64-w-w-10 on 500
digits, float32) saving its iterates; then each solver replays the trajectory, warm-started from
the previous step as in a run. At every ``--every``-th step the top eigenvalues are compared with
ARPACK at tol 0 on the float64 Hessian (the oracle), and the reported residuals are checked
against the true ones (float64 HVPs of the returned float32 vectors). Per phase (sharpening:
lr S < 1.9 by the oracle; edge of stability: from the first oracle step with lr S >= 1.9) it
prints HVPs per step, gradient-equivalents per step of GD with the tracker (1 + 2 HVPs), the
median and max relative error of the top k eigenvalues, the fraction of steps with a reported
residual above tol, the largest true residual of a pair reported converged, and the a-posteriori
bound on the eigenvalue error, (r |theta|)^2 / gap with the true residual r and the oracle's gap
(its median, and how often the measured error is within it).

Solvers: the tracker (warm-started LOBPCG) at k = 1 and k = 3, with and without the guard vector,
warm-started from the previous step or as GD does (``gd.warm_start``: from step t - 2 when GD
bounces, "same_side", or that moved on by its change since t - 4, "extrapolated", or by that change
damped by the factor that best predicted step t - 2, "fitted", GD's default);
cold ARPACK Lanczos (k = 1, tol 0); power iteration at PyHessian's tolerance (1e-3).
``--quick``: width 32 only, 400 steps, the main solvers.

``--leaderboard P ...`` instead runs each entry's optimizer (GD, or RMSProp, Adam, ... for the entries
of ``--suite adaptive``) alone on those leaderboard entries (their spec: steps, lr, dtype, k growing to
k_max) once per ``warm_start`` rule (``[gd] warm_start``, ``[rmsprop] warm_start``, ...) and prints the
eigensolver's HVPs per step before the edge (edge ratio < 0.95, lr S < 1.9 for GD, by the optimizer's
own measurement), at the edge, and over the whole run (twice that is the leaderboard's "eigensolver
grad-equiv. / step" of the optimizer's row), how settled its orbit is: the median of
|w_t - w_{t-2}| / |w_t - w_{t-1}| over the second half of the run (~0 on an exact period-2 orbit,
where the tracked vectors stop moving), and the share of steps whose measurement stopped at ``max_iters``
with a residual above tol (reported so in the row's ``residual``) and the largest residual recorded.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # this script's choice: its oracles and prepare() compute in float64

import eosflow
from eosflow.cli import demo_table
from eosflow.experiment import prepare, run
from eosflow.spectrum import Eigenpairs, lanczos, lobpcg, power_iteration, random_vectors
from eosflow.tracker import gd_warm_start

LR, EDGE = 0.4, 1.9  # lr S >= EDGE: the edge of stability
MAIN = (
    "k=1 tol=1e-3, no guard, previous step",
    "k=1 tol=3e-3 (GD)",
    "k=3 tol=1e-3, no guard, previous step",
    "k=3 tol=1e-3 (GD)",
    "k=3 tol=3e-3 (GD)",
    "k=1 tol=1e-3 (GD, extrapolated)",
    "k=1 tol=3e-3 (GD, extrapolated)",
    "k=3 tol=1e-3 (GD, extrapolated)",
    "k=1 tol=1e-3 (GD, fitted)",
    "k=1 tol=3e-3 (GD, fitted)",
    "k=3 tol=1e-3 (GD, fitted)",
)  # --solvers main (and --quick)
# (label, k, tol, guard, start[, max_iters], default 30): start as gd.warm_start ("previous", "same_side",
# "extrapolated", "fitted") or "secant"
TRACKERS = [
    ("k=1 tol=1e-3, no guard, previous step", 1, 1e-3, 0, "previous"),
    ("k=1 tol=1e-3, previous step", 1, 1e-3, 1, "previous"),
    ("k=1 tol=3e-3, previous step", 1, 3e-3, 1, "previous"),
    ("k=1 tol=1e-2, previous step", 1, 1e-2, 1, "previous"),
    ("k=1 tol=1e-3 (GD)", 1, 1e-3, 1, "same_side"),
    ("k=1 tol=3e-3 (GD)", 1, 3e-3, 1, "same_side"),
    ("k=1 tol=3e-3, previous step + secant", 1, 3e-3, 1, "secant"),
    ("k=3 tol=1e-3, no guard, previous step", 3, 1e-3, 0, "previous"),
    ("k=3 tol=1e-3, previous step", 3, 1e-3, 1, "previous"),
    ("k=3 tol=1e-3 (GD)", 3, 1e-3, 1, "same_side"),
    ("k=3 tol=3e-3 (GD)", 3, 3e-3, 1, "same_side"),
    ("k=1 tol=3e-3 (GD), guard 2", 1, 3e-3, 2, "same_side"),
    ("k=1 tol=3e-3 (GD), guard 4", 1, 3e-3, 4, "same_side"),
    ("k=3 tol=3e-3 (GD), guard 2", 3, 3e-3, 2, "same_side"),
    ("k=3 tol=3e-3 (GD), guard 4", 3, 3e-3, 4, "same_side"),
    ("k=3 tol=1e-3 (GD), guard 4", 3, 1e-3, 4, "same_side"),
    ("k=1 tol=1e-3 (GD, extrapolated)", 1, 1e-3, 1, "extrapolated"),
    ("k=1 tol=3e-3 (GD, extrapolated)", 1, 3e-3, 1, "extrapolated"),
    ("k=1 tol=4e-3 (GD, extrapolated)", 1, 4e-3, 1, "extrapolated"),
    ("k=1 tol=5e-3 (GD, extrapolated)", 1, 5e-3, 1, "extrapolated"),
    ("k=1 tol=1e-2 (GD, extrapolated)", 1, 1e-2, 1, "extrapolated"),
    ("k=1 tol=3e-2 (GD, extrapolated)", 1, 3e-2, 1, "extrapolated"),
    ("k=1 tol=3e-3 full Krylov (GD, extrapolated)", 1, 3e-3, 1, "extrapolated+krylov"),
    ("k=3 tol=1e-3 (GD, extrapolated)", 3, 1e-3, 1, "extrapolated"),
    ("k=3 tol=3e-3 (GD, extrapolated)", 3, 3e-3, 1, "extrapolated"),
    ("k=1 tol=1e-3 (GD, fitted)", 1, 1e-3, 1, "fitted"),
    ("k=1 tol=3e-3 (GD, fitted)", 1, 3e-3, 1, "fitted"),
    ("k=3 tol=1e-3 (GD, fitted)", 3, 1e-3, 1, "fitted"),
    ("k=3 tol=3e-3 (GD, fitted)", 3, 3e-3, 1, "fitted"),
    ("k=1 tol=4e-3 (GD, fitted)", 1, 4e-3, 1, "fitted"),
    ("k=1 tol=5e-3 (GD, fitted)", 1, 5e-3, 1, "fitted"),
    ("k=1 tol=1e-3 (GD, fitted), no guard", 1, 1e-3, 0, "fitted"),
    ("k=1 tol=3e-3 (GD, fitted), no guard", 1, 3e-3, 0, "fitted"),
    ("k=1 tol=5e-3 (GD, fitted), no guard", 1, 5e-3, 0, "fitted"),
    ("k=3 tol=5e-3 (GD, fitted), guard 4", 3, 5e-3, 4, "fitted"),
    ("k=3 tol=1e-2 (GD, fitted), guard 4", 3, 1e-2, 4, "fitted"),
    ("k=1 tol=1e-3 (GD, fitted), power carry", 1, 1e-3, 1, "fitted+power"),
    ("k=1 tol=3e-3 (GD, fitted), power carry", 1, 3e-3, 1, "fitted+power"),
    ("k=1 tol=5e-3 (GD, fitted), power carry", 1, 5e-3, 1, "fitted+power"),
    ("k=3 tol=1e-3 (GD, fitted), power carry", 3, 1e-3, 1, "fitted+power"),
    ("k=3 tol=3e-3 (GD, fitted), power carry", 3, 3e-3, 1, "fitted+power"),
    ("k=1 tol=3e-3 (GD, fitted), power carry, max_iters 4", 1, 3e-3, 1, "fitted+power", 4),
    ("k=1 tol=3e-3 (GD, fitted), power carry, max_iters 5", 1, 3e-3, 1, "fitted+power", 5),
]


def trajectory(width: int, steps: int):
    """GD's iterates (steps x d) on the digits MLP of this width, and the float32 / float64 objectives."""
    table = demo_table()
    table.update(steps=steps, spectrum={"every": 0}, record={"chunk": 100, "params_every": 1})
    table["problem"]["width"] = width
    with tempfile.TemporaryDirectory() as tmp:
        run(table, tmp)
        _, params = eosflow.load_params(tmp, "gd")
    return np.asarray(params), prepare(table)[1].objective, prepare({**table, "dtype": "float64"})[1].objective


def replay(objective, params, k: int, tol: float, guard: int, start: str, max_iters: int = 30, cluster=None):
    """The tracker along the trajectory: HVPs, values (steps x k), residuals and vectors at every step.

    ``start``: GD's warm-start rule (:func:`eosflow.tracker.gd_warm_start`: "previous", "same_side"
    "extrapolated" or "fitted", GD bouncing when its steps s_t = w_{t+1} - w_t = -lr g_t, read off the iterates,
    point against each other); ``"secant"``: from the previous step's vectors, with GD's last step
    w_t - w_{t-1} (the direction of GD's free secant g_t - g_{t-1}) as an extra basis vector (one more HVP).
    A ``start`` ending in ``+krylov`` (k = 1) replaces LOBPCG by :func:`krylov_top`, the same start.
    A ``start`` ending in ``+power`` keeps, for the next warm start, each returned vector moved by one power
    step, H x / |H x| (sign kept), instead of x itself: it damps x's components along eigenvalues |lambda| <
    theta by lambda / theta. LOBPCG holds H x at convergence (the image of its last Ritz vectors), so the step
    would be free in the tracker; this replay recomputes it by one HVP that it does not count.
    """

    def lobpcg_at(w, v, extra=None):
        matvec = jax.vmap(jax.linearize(objective.grad, w)[1], in_axes=1, out_axes=1)
        return lobpcg(matvec, v, tol=tol, max_iters=max_iters, guard=guard, extra=extra, cluster=cluster)

    measure = jax.jit(lobpcg_at)
    power = start.endswith("+power")
    start = start.removesuffix("+power")
    image = jax.jit(lambda w, v: jax.vmap(jax.linearize(objective.grad, w)[1], in_axes=1, out_axes=1)(v))
    if start.endswith("+krylov"):
        start = start.removesuffix("+krylov")
        hvp = jax.jit(lambda w, v: jax.jvp(objective.grad, (w,), (v.astype(w.dtype),))[1])

        def measure(w, v, extra=None):
            return krylov_top(lambda u: np.asarray(hvp(w, jnp.asarray(u)), np.float64), np.asarray(v), tol, max_iters)

    history = jnp.stack([random_vectors(jax.random.PRNGKey(0), params.shape[1], k, params.dtype)] * 6)
    steps = np.diff(params, axis=0, append=params[-1:] + (params[-1:] - params[-2:-1]))
    hvps, values, residuals, kept = [], [], [], {}
    for t, w in enumerate(params):
        initial, extra = history[0], None
        if start == "secant" and t >= 1:
            extra = jnp.asarray(steps[t - 1])[:, None]
        elif start != "secant" and t >= 1:
            initial = gd_warm_start(history, jnp.vdot(steps[t], steps[t - 1]) < 0, start)  # type: ignore[arg-type]
        pairs = measure(jnp.asarray(w), initial, extra)
        vectors = pairs.vectors
        carried = vectors
        if power:
            moved = image(jnp.asarray(w), vectors)
            carried = moved / jnp.linalg.norm(moved, axis=0) * jnp.sign(jnp.sum(moved * vectors, axis=0))
        history = jnp.concatenate([carried[None], history[:-1]])
        hvps.append(int(pairs.hvps))
        values.append(np.asarray(pairs.values))
        residuals.append(np.asarray(pairs.residuals))
        kept[t] = np.asarray(vectors)
    return np.array(hvps), np.array(values), np.array(residuals), kept


def krylov_top(hvp, start, tol: float, max_iters: int) -> Eigenpairs:
    """The top Ritz pair of the whole Krylov space grown from ``start`` (d x 1) by residuals, stopped
    at the relative residual ``tol``: Rayleigh-Ritz over every direction so far (Lanczos with full
    reorthogonalization, in float64 on the host), the most a single-vector method can take from the
    same HVPs; LOBPCG keeps only [x, r, p]."""
    basis = [start[:, 0] / np.linalg.norm(start[:, 0])]
    images = [hvp(basis[0])]
    while True:
        b, hb = np.stack(basis, axis=1), np.stack(images, axis=1)
        reduced = b.T @ hb
        values, coefficients = np.linalg.eigh(0.5 * (reduced + reduced.T))
        x, hx = b @ coefficients[:, -1], hb @ coefficients[:, -1]
        residual = hx - values[-1] * x
        relative = np.linalg.norm(residual) / abs(values[-1])
        if relative <= tol or len(basis) > max_iters:
            return Eigenpairs(values[-1:], x[:, None], len(basis), np.array([relative]))  # type: ignore[arg-type]
        for _ in range(2):  # twice is enough (Kahan)
            residual = residual - b @ (b.T @ residual)
        basis.append(residual / np.linalg.norm(residual))
        images.append(hvp(basis[-1]))


def true_residuals(objective64, w, values, vectors) -> np.ndarray:
    """||H v - theta v|| / |theta| with float64 HVPs of the returned (float32) pairs."""
    v = jnp.asarray(vectors, jnp.float64)
    hv = np.asarray(jax.vmap(lambda u: objective64.hvp(jnp.asarray(w, jnp.float64), u), in_axes=1, out_axes=1)(v))
    return np.linalg.norm(hv - np.asarray(v) * values, axis=0) / np.abs(values)


def residual_bound(values, true, oracle) -> np.ndarray:
    """max_i (r_i |theta_i|)^2 / (gap_i lambda_i) per oracle step: the a-posteriori bound on the relative
    eigenvalue error of a Ritz value with absolute residual r_i |theta_i|, gap_i = min_{j != i} |theta_i - lambda_j|
    over the oracle's top k + 1 (checks x k values and true relative residuals, checks x (k + 1) oracle)."""
    k = values.shape[1]
    distance = np.abs(values[:, :, None] - oracle[:, None, :])  # checks x k x (k + 1)
    distance[:, np.arange(k), np.arange(k)] = np.inf
    return np.max((true * np.abs(values)) ** 2 / distance.min(axis=2) / oracle[:, :k], axis=1)


def phase_rows(label, hvps, errors, steps_phase, checks_phase, unconverged, worst_true, bound=None):
    """One table row per phase from per-step HVPs and per-checkpoint errors."""
    rows = []
    for name in ("sharpening", "edge of stability"):
        spent, err = hvps[steps_phase[name]], errors[checks_phase[name]]
        if not spent.size:
            continue
        rows.append(
            (
                label,
                name,
                spent.mean(),
                1 + 2 * spent.mean(),
                np.median(err) if err.size else np.nan,
                err.max() if err.size else np.nan,
                unconverged[steps_phase[name]].mean() if unconverged is not None else np.nan,
                worst_true[checks_phase[name]].max() if worst_true is not None and err.size else np.nan,
                np.median(bound[checks_phase[name]]) if bound is not None and err.size else np.nan,
                np.mean(err <= bound[checks_phase[name]]) if bound is not None and err.size else np.nan,
            )
        )
    return rows


def benchmark(width: int, steps: int, every: int, main_only: bool, only: str = "", cluster=None) -> None:
    started = time.perf_counter()
    params, objective, objective64 = trajectory(width, steps)
    d = params.shape[1]
    checks = np.arange(10, steps, every)
    oracle = np.array([lanczos(objective64, jnp.asarray(params[t], jnp.float64), k=4, tol=0.0).values for t in checks])
    edge = checks[np.argmax(LR * oracle[:, 0] >= EDGE)] if (LR * oracle[:, 0] >= EDGE).any() else steps
    print(
        f"\n## digits MLP width {width}: d = {d}, {steps} GD steps, lr = {LR}; edge of stability "
        f"(lr S >= {EDGE}) from step {edge}; oracle (ARPACK tol 0, float64) at {len(checks)} steps"
    )
    gaps = np.abs(np.diff(oracle[checks >= edge, :3], axis=1)) / oracle[checks >= edge, :1]
    if gaps.size:
        print(
            f"median relative gaps lambda_1-lambda_2, lambda_2-lambda_3 at the edge: {np.median(gaps, axis=0).round(4)}"
        )
    steps_phase = {"sharpening": np.arange(10, edge), "edge of stability": np.arange(edge, steps)}
    checks_phase = {"sharpening": checks < edge, "edge of stability": checks >= edge}

    rows = []

    def chosen(label):
        return any(part in label for part in only.split(","))

    for label, k, tol, guard, start, *cap in TRACKERS:
        if (main_only and label not in MAIN) or not chosen(label):
            continue
        hvps, values, residuals, kept = replay(objective, params, k, tol, guard, start, *cap, cluster=cluster)
        errors = np.max(np.abs(values[checks] - oracle[:, :k]) / oracle[:, :k], axis=1)
        converged = residuals <= tol
        true = np.array([true_residuals(objective64, params[t], values[t], kept[t]) for t in checks])
        worst = np.max(np.where(converged[checks], true, 0.0), axis=1)
        bound = residual_bound(values[checks], true, oracle[:, : k + 1])
        unconverged = ~np.all(converged, axis=1)
        rows += phase_rows(label, hvps, errors, steps_phase, checks_phase, unconverged, worst, bound)

    for label, solver in [
        ("cold Lanczos (ARPACK) k=1", lambda w: lanczos(objective, jnp.asarray(w), k=1, tol=0.0)),
        ("power iteration tol=1e-3", lambda w: power_iteration(objective, jnp.asarray(w), tol=1e-3)),
    ]:
        if not chosen(label):
            continue
        results = [solver(params[t]) for t in checks]
        hvps = np.full(steps, np.nan)
        hvps[checks] = [r.hvps for r in results]
        errors = np.abs(np.array([r.values[0] for r in results]) - oracle[:, 0]) / oracle[:, 0]
        per_check = {name: checks[mask] for name, mask in checks_phase.items()}
        rows += phase_rows(label, hvps, errors, per_check, checks_phase, None, None)

    print(
        "\n| solver | phase | HVPs / step | grad-equiv. / step (GD + solver) | median rel. error (top k) | "
        "max rel. error | steps with a residual > tol | max true residual of a converged pair | "
        "median bound r^2/gap | error <= bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, phase, hvps, equivalents, median, worst, unconverged, true, bound, held in rows:
        print(
            f"| {label} | {phase} | {hvps:.2f} | {equivalents:.1f} | {median:.1e} | {worst:.1e} | "
            f"{unconverged:.0%} | {true:.1e} | {bound:.1e} | {held:.0%} |".replace("nan%", "-").replace("nan", "-")
        )
    print(
        f"(width {width}: {time.perf_counter() - started:.0f} s; errors: max over the top k of "
        f"|theta_i - lambda_i| / lambda_i, median and max over the oracle steps of the phase)"
    )


def warm_start_costs(problems: list[str], rules: list[str]) -> None:
    """Each entry's optimizer (GD, RMSProp, Adam, ...) alone on leaderboard entries, once per warm-start rule:
    eigensolver HVPs per step, per phase."""
    from eosflow.leaderboard import ADAPTIVE_SUITE, ARCHITECTURES, SUITE
    from eosflow.process import PROCESSES
    from eosflow.spec import SpectrumSpec

    entries = {entry.name: entry for entry in SUITE + ARCHITECTURES + ADAPTIVE_SUITE}
    print(
        "\n| problem | optimizer.warm_start | edge from step | two-step / one-step displacement | HVPs / step before "
        "the edge | HVPs / step at the edge | HVPs / step, whole run | eigensolver grad-equiv. / step "
        "| steps costing more than same_side | steps with a residual > tol | largest residual |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in problems:
        if name not in entries:
            raise SystemExit(f"--leaderboard: no entry {name!r}; choose from {', '.join(entries)}")
        optimizer = entries[name].optimizer
        spent = {}
        for rule in rules:
            table = copy.deepcopy(entries[name].table)
            table.update(processes=[optimizer])
            for other in set(table) & set(PROCESSES) - {optimizer}:  # the models' tables (the mean-field entry's)
                del table[other]
            warm_start, _, carry = rule.partition("+")  # "fitted+power": [spectrum] carry = "power"
            table[optimizer] = {**table.get(optimizer, {}), "warm_start": warm_start}
            if carry:
                table["spectrum"] = {**table.get("spectrum", {}), "carry": carry}
            table["record"] = {**table["record"], "params_every": 1}
            with tempfile.TemporaryDirectory() as tmp:
                run(table, tmp)
                rows = eosflow.load(tmp).sel(process=optimizer)
                hvps, edge_ratio = rows["measurement_hvps"].values, rows["edge_ratio"].values
                residuals, tol = rows["residual"].values, table["spectrum"].get("tol", SpectrumSpec().tol)
                w = np.asarray(eosflow.load_params(tmp, optimizer)[1], np.float64)
            spent[rule] = hvps
            at_edge = np.flatnonzero(edge_ratio >= EDGE / 2)
            edge = int(at_edge[0]) if at_edge.size else hvps.size
            # how settled the orbit is over the second half: |w_t - w_{t-2}| / |w_t - w_{t-1}| (median)
            late = w[w.shape[0] // 2 :]
            settled = np.median(
                np.linalg.norm(late[2:] - late[:-2], axis=1) / np.linalg.norm(late[2:] - late[1:-1], axis=1)
            )
            before = f"{hvps[:edge].mean():.2f}" if edge else "-"
            after = f"{hvps[edge:].mean():.2f}" if edge < hvps.size else "-"
            worse = f"{np.mean(hvps > spent['same_side']):.0%}" if "same_side" in spent else "-"
            whole = f"{hvps.mean():.3f} | {2 * hvps.mean():.3f}"
            print(
                f"| {name} | {optimizer}.{rule} | {edge} | {settled:.1e} | {before} | {after} | {whole} | {worse} "
                f"| {np.mean(residuals > tol):.1%} | {np.nanmax(residuals):.1e} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 140], help="hidden widths (32: d = 3466)")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--every", type=int, default=25, help="oracle every n steps")
    parser.add_argument("--solvers", choices=["all", "main"], default="all", help=f"main: {', '.join(MAIN)}")
    parser.add_argument("--quick", action="store_true", help="width 32, 400 steps, --solvers main")
    parser.add_argument(
        "--only", default="", help="only the solvers whose label contains this text (or one of these, comma-separated)"
    )
    parser.add_argument("--cluster", type=float, help="the trackers' cluster gap (lobpcg's contract on clusters)")
    parser.add_argument(
        "--leaderboard", nargs="+", metavar="PROBLEM", help="each entry's optimizer alone on these leaderboard entries"
    )
    parser.add_argument(
        "--rules",
        nargs="+",
        default=["same_side", "extrapolated", "fitted"],
        help='warm_start rules of the optimizer (--leaderboard); "RULE+power" also sets [spectrum] carry = "power"',
    )
    args = parser.parse_args()
    if args.leaderboard:
        warm_start_costs(args.leaderboard, args.rules)
        return
    if args.quick:
        args.widths, args.steps, args.solvers = [32], 400, "main"
    for width in args.widths:
        benchmark(width, args.steps, args.every, args.solvers == "main", args.only, args.cluster)


if __name__ == "__main__":
    main()
