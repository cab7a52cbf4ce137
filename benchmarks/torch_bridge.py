"""eosflow's torch tracker against PyHessian-style power iteration and the JAX tracker.

A torch MLP (64-32-32-10, tanh, 3466 parameters, float64) trains by full-batch GD on 500 digits
at lr = 0.4 (the demo's setting: the sharpness reaches 2/lr = 5 around step 200). Every
``--every`` steps the top-k Hessian eigenvalues are measured by

  eosflow.torch   SharpnessTracker(model, loss, k, tol=1e-3, carry="ritz"), warm-started from the last call
  jax twin        the same LOBPCG on the same network written in JAX (same weights), warm-started
  pyhessian       hessian(model, criterion, data).eigenvalues(top_n=k, tol=1e-3), as PyHessian
                  calls it (cold start, power iteration with deflation): the real package
                  (pip install pyhessian; `make bench-torch` installs it), its HVPs counted

and compared with ARPACK at tol 0 (scipy eigsh). Printed per phase (sharpening: lr S < 1.9;
edge: lr S >= 1.9): median HVPs per measurement, median and max relative eigenvalue error.

    python benchmarks/torch_bridge.py [--steps 400] [--every 10] [--k 1 3] [--threads 1]

``--crossing`` measures instead what the tracker pays to move arrays between torch and JAX, on float32 MLPs
64-w-w-10 (``--widths``; 30, 140, 510 give d = 3190, 30250, 298870) on 500 digits: per Hessian-vector product
(one host callback per column of LOBPCG's block), the product itself (the shared gradient graph) and the
callback's round trip with the product replaced by the identity, as the tracker crosses now (NumPy:
``torch.from_numpy`` of the callback's column, ``.numpy()`` back), as it crossed with w beside each column
(before w stayed in torch), and through DLPack (``torch.from_dlpack`` of the column); per update, w into JAX
(before w stayed in torch) and the eigenvectors out to torch, both ways; and the whole update (k = 3, tol 1e-3,
warm, after a GD step). The rows alternate, ``--repeats`` times each, each first in turn.

    python benchmarks/torch_bridge.py --crossing [--widths 30 140 510] [--repeats 20] [--threads 1]

``--run`` times eosflow.simulate on eosflow.torch.problem (an MLP 64-32-10, float32, cross-entropy on 256
digits, lr 0.5, 40 steps, k_max 2) for ``--processes``: the bridge's Hessian-vector products at one w through
one shared gradient graph (eosflow.torch.bridge.SharedGraph) and each from scratch, alternating, 3 runs each.

    python benchmarks/torch_bridge.py --run [--processes gd gradient_flow central_flow] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib
import time

import equinox as eqx
import jax
import jax.dlpack
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg
import torch
from sklearn.datasets import load_digits

from eosflow.spectrum import leading_columns, lobpcg, random_vectors
from eosflow.torch import SharpnessTracker, TorchObjective
from eosflow.torch.bridge import host_callback

jax.config.update("jax_enable_x64", True)  # this script's own process: float64 throughout
torch.set_default_dtype(torch.float64)  # PyHessian draws its vectors in the default dtype


def digits(n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = (x[:n] - x[:n].mean(0)) / (x[:n].std(0) + 1e-8)
    return torch.from_numpy(x), torch.nn.functional.one_hot(torch.from_numpy(y[:n]), 10).double()


def mlp(width: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 10),
    )


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def jax_twin_hvp(objective: TorchObjective):
    """H(w) V for the same MLP written in JAX over torch's flat layout."""
    inputs, targets = (jnp.asarray(t.numpy()) for t in objective.batch)
    splits = np.cumsum(objective.sizes)[:-1]

    def loss(w):
        w1, b1, w2, b2, w3, b3 = (p.reshape(s) for p, s in zip(jnp.split(w, splits), objective.shapes))
        out = jnp.tanh(jnp.tanh(inputs @ w1.T + b1) @ w2.T + b2) @ w3.T + b3
        return 0.5 * jnp.mean(jnp.sum((out - targets) ** 2, axis=1))

    def block(w, vectors):
        _, lin = jax.linearize(jax.grad(loss), w)
        return jax.vmap(lin, in_axes=1, out_axes=1)(vectors)

    return block


def pyhessian_eigenvalues(model, criterion, data, top_n: int, counter: list[int]):
    """PyHessian's top_n eigenvalues (tol 1e-3, maxIter 100), counting its HVPs."""
    try:  # the submodule (the package's __init__ shadows it with the class of the same name)
        ph = importlib.import_module("pyhessian.hessian")
    except ImportError:
        ph = None
    if ph is not None:
        original = ph.hessian_vector_product

        def counted(gradsH, params, v):
            counter[0] += 1
            return original(gradsH, params, v)

        ph.hessian_vector_product = counted
        try:
            return ph.hessian(model, criterion, data=data, cuda=False).eigenvalues(top_n=top_n, tol=1e-3)[0]
        finally:
            ph.hessian_vector_product = original
    raise SystemExit("pip install pyhessian (the comparison calls the real package)")


def arpack(objective: TorchObjective, k: int) -> np.ndarray:
    w = objective.flat_parameters()
    d = w.numel()
    op = scipy.sparse.linalg.LinearOperator(
        (d, d),
        matvec=lambda v: objective.hvp(w, torch.from_numpy(np.ascontiguousarray(v).ravel())).numpy(),
        dtype=np.float64,
    )
    return np.sort(scipy.sparse.linalg.eigsh(op, k=k, which="LA", tol=0)[0])[::-1]


def bridge_overhead(objective: TorchObjective, repeats: int = 30) -> None:
    """ms per Hessian-vector product: torch directly, through the JAX bridge (jitted), and the JAX twin."""
    from eosflow.torch import to_jax

    bridged, w0 = to_jax(objective)
    twin = jax_twin_hvp(objective)
    v = jnp.asarray(np.random.default_rng(0).normal(size=(w0.size, 1)))
    w_t, v_t = objective.flat_parameters(), torch.from_numpy(np.array(v[:, 0]))
    bridged_hvp, twin_hvp = eqx.filter_jit(bridged.hvp), jax.jit(twin)  # arguments, not constants: no folding
    w_j, v_j = jnp.asarray(w0), jnp.asarray(v)
    linearized = objective.linearized(w_t)  # the tracker's and hessian_operator's: one gradient graph per update
    candidates = {
        "torch (double backward)": lambda: objective.hvp(w_t, v_t),
        "torch, shared gradient graph": lambda: linearized(v_t[:, None]),
        "eosflow.torch bridge, jitted": lambda: bridged_hvp(w_j, v_j[:, 0]),
        "jax twin, jitted": lambda: twin_hvp(w_j, v_j),
    }
    print(f"ms per HVP at d = {objective.dim} (median of {repeats}):")
    for name, fn in candidates.items():
        jax.block_until_ready(fn())
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(1e3 * (time.perf_counter() - started))
        print(f"  {name:<30} {np.median(times):8.2f}")


def _dlpack_host_callback(fn, shape, dtype, *args):
    """eosflow.torch.bridge.host_callback with the callback's arrays taken into torch by DLPack (the
    alternative measured; float32 and int32 arguments, one 32-bit word each, as the tracker's)."""
    as_torch = {np.dtype(np.float32): torch.float32, np.dtype(np.int32): torch.int32}
    kinds = [as_torch[np.dtype(a.dtype)] for a in args]

    def on_words(*packed):
        out = fn(*(torch.from_dlpack(p).view(kind) for p, kind in zip(packed, kinds)))
        return out.view(torch.uint32).numpy()

    packed = [jax.lax.bitcast_convert_type(a, jnp.uint32) for a in args]
    out = jax.pure_callback(on_words, jax.ShapeDtypeStruct(shape, jnp.uint32), *packed, vmap_method="sequential")
    return jax.lax.bitcast_convert_type(out, dtype)


def _timed(fn) -> float:
    started = time.perf_counter()
    jax.block_until_ready(fn())
    return 1e3 * (time.perf_counter() - started)


def crossing_at(width: int, batch: tuple[torch.Tensor, torch.Tensor], repeats: int, k: int) -> None:
    """The rows of ``--crossing`` for the MLP 64-width-width-10 (float32) on ``batch``."""
    loss_fn = torch.nn.functional.cross_entropy
    torch.manual_seed(0)
    model = mlp(width).float()
    objective = TorchObjective(model, loss_fn, batch)
    w_t = objective.flat_parameters()
    d = w_t.numel()
    linearized = objective.linearized(w_t)
    column = torch.from_numpy(np.random.default_rng(0).normal(size=(d, 1)).astype(np.float32))
    token, w, block = jnp.asarray(0, jnp.int32), jnp.asarray(w_t.numpy()), jnp.asarray(column.numpy()).repeat(k, 1)

    def through(cross, identity, *carried):  # LOBPCG's column loop over a block of k, each column one callback
        def columns(vectors, token, *carried):  # (the token and w arguments of the program, as the tracker's)
            def matvec(v):
                return cross(identity, v.shape, np.dtype(np.float32), token, *carried, v)

            return leading_columns(matvec, vectors, k)

        program = jax.jit(columns)
        return lambda vectors: program(vectors, token, *carried)

    def by_numpy(token, *arrays):  # the tracker's _hvp_block conversions around an identity product
        *carried, v = (torch.from_numpy(np.require(a, requirements="W")) for a in arrays)
        return v.numpy()

    numpy_loop = through(lambda *a: host_callback(*a, vmap_method="sequential"), by_numpy)
    numpy_w_loop = through(lambda *a: host_callback(*a, vmap_method="sequential"), by_numpy, w)
    dlpack_loop = through(_dlpack_host_callback, lambda token, v: v.clone())
    vectors = jax.block_until_ready(numpy_loop(block))
    assert np.array_equal(np.asarray(vectors), np.asarray(dlpack_loop(block)))
    assert np.array_equal(np.asarray(vectors), np.asarray(numpy_w_loop(block)))
    candidates = {
        "product (shared graph), per column": lambda: linearized(column),
        "crossing NumPy, per column": lambda: numpy_loop(block),
        "crossing NumPy with w, per column": lambda: numpy_w_loop(block),
        "crossing DLPack, per column": lambda: dlpack_loop(block),
        "w into JAX: NumPy": lambda: jnp.asarray(w_t.numpy()),
        "w into JAX: DLPack": lambda: jax.dlpack.from_dlpack(w_t),
        "vectors to torch: NumPy copy": lambda: torch.from_numpy(np.array(vectors)),
        "vectors to torch: DLPack + clone": lambda: torch.from_dlpack(vectors).clone(),
    }
    rows: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        jax.block_until_ready(fn())
    names = list(candidates)
    for repeat in range(repeats):  # each row first in turn: none always follows the product (a cold cache)
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            rows[name].append(_timed(candidates[name]) / (k if "crossing" in name else 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SharpnessTracker(model, loss_fn, k=k, tol=1e-3)
    tracker.update(batch)
    updates, hvps = [], []
    for _ in range(max(repeats // 4, 3)):
        optimizer.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()
        started = time.perf_counter()
        hvps.append(tracker.update(batch, optimizer).hvps)
        updates.append(1e3 * (time.perf_counter() - started))
    print(f"d = {d}:")
    for name, times in rows.items():
        print(f"  {name:<38} {np.median(times):9.3f}")
    share = np.median(hvps) * np.median(rows["crossing NumPy, per column"]) / np.median(updates)
    print(
        f"  {'update (GD step before each)':<38} {np.median(updates):9.1f}  ({np.median(hvps):.0f} HVPs: "
        f"the NumPy crossing is {100 * share:.1f}% of it)"
    )


def crossing(widths: list[int], repeats: int, k: int = 3) -> None:
    """ms per product and per update that the torch <-> JAX crossing costs, NumPy against DLPack (see the top)."""
    x, y = load_digits(return_X_y=True)
    batch = (torch.tensor(x[:500] / 16, dtype=torch.float32), torch.from_numpy(y[:500]))
    print(f"torch <-> JAX crossing, float32, k = {k}, median ms of {repeats} (the crossings alternating):")
    for width in widths:
        crossing_at(width, batch, repeats, k)


def shared_graph_runs(processes: list[str], runs: int = 3) -> None:
    """Seconds per eosflow.simulate on a torch problem, the bridge's HVPs shared or from scratch (see the top)."""
    import eosflow
    from eosflow.torch import bridge, problem

    x, y = load_digits(return_X_y=True)
    batch = (torch.tensor(x[:256] / 16, dtype=torch.float32), torch.from_numpy(y[:256]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).float()
    torch_problem = problem(model, torch.nn.functional.cross_entropy, batch)
    settings = {"lr": 0.5, "steps": 40, "processes": processes, "spectrum": {"k_max": 2}}
    shared = bridge.SharedGraph.__call__
    ways = {"shared graph": shared, "from scratch": lambda self, w, v, batch: self.objective.hvp(w, v, batch)}
    eosflow.simulate(torch_problem, **settings)  # compiles
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    sharpness = {}
    try:
        for _ in range(runs):
            for way, call in ways.items():
                bridge.SharedGraph.__call__ = call
                started = time.perf_counter()
                ds = eosflow.simulate(torch_problem, **settings)
                seconds[way].append(time.perf_counter() - started)
                sharpness[way] = float(ds.sharpness.isel(step=-1, process=0))
    finally:
        bridge.SharedGraph.__call__ = shared
    print(f"eosflow.simulate on a torch MLP (d = {torch_problem.info['parameters']}), {processes}, 40 steps:")
    for way, times in seconds.items():
        print(f"  {way:<14} median {np.median(times):.2f} s of {np.round(times, 2)}; last sharpness {sharpness[way]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's; use 1 on a loaded machine, where "
        "spinning thread pools slow every call tens of times)",
    )
    parser.add_argument("--crossing", action="store_true", help="measure the torch <-> JAX crossing only")
    parser.add_argument("--widths", type=int, nargs="+", default=[30, 140, 510])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--run", action="store_true", help="time eosflow.simulate, HVPs shared or from scratch")
    parser.add_argument("--processes", nargs="+", default=["gd", "gradient_flow", "central_flow"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crossing:
        crossing(args.widths, args.repeats)
        return
    if args.run:
        shared_graph_runs(args.processes)
        return

    inputs, targets = digits()
    torch.manual_seed(0)
    bridge_overhead(TorchObjective(mlp(), half_mse, (inputs, targets)))
    rows = []
    for k in args.k:
        torch.manual_seed(0)
        model = mlp()
        objective = TorchObjective(model, half_mse, (inputs, targets))
        # the Ritz carry: the twin below warm-starts from its Ritz vectors too (the same algorithm, the same start)
        tracker = SharpnessTracker(model, half_mse, k=k, tol=1e-3, max_iters=30, carry="ritz")
        block = jax_twin_hvp(objective)
        twin = jax.jit(lambda w, x0, block=block: lobpcg(lambda v: block(w, v), x0, 1e-3, 30))
        twin_vectors = random_vectors(jax.random.PRNGKey(0), objective.dim, k, jnp.float64)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        for step in range(args.steps):
            if step % args.every == 0:  # step 0 compiles both solvers and is not recorded
                started = time.perf_counter()
                eig = tracker.update((inputs, targets))
                ours_ms = 1e3 * (time.perf_counter() - started)
                started = time.perf_counter()
                pairs = jax.block_until_ready(twin(jnp.asarray(objective.flat_parameters().numpy()), twin_vectors))
                twin_ms = 1e3 * (time.perf_counter() - started)
                twin_vectors = pairs.vectors
            if step % args.every == 0 and step > 0:
                reference = arpack(objective, k)
                counter = [0]
                started = time.perf_counter()
                power = np.sort(np.asarray(pyhessian_eigenvalues(model, half_mse, (inputs, targets), k, counter)))[::-1]
                power_ms = 1e3 * (time.perf_counter() - started)
                model.zero_grad(set_to_none=True)  # PyHessian leaves a graph in .grad
                phase = "edge" if args.lr * reference[0] >= 1.9 else "sharpening"

                def error(values, reference=reference):
                    return float(np.max(np.abs(values - reference) / np.abs(reference)))

                rows.append((k, phase, "eosflow.torch", eig.hvps, error(eig.values), ours_ms))
                rows.append((k, phase, "jax twin", int(pairs.hvps), error(np.asarray(pairs.values)), twin_ms))
                rows.append((k, phase, "pyhessian", counter[0], error(power), power_ms))
            optimizer.zero_grad()
            half_mse(model(inputs), targets).backward()
            optimizer.step()

    print(
        f"torch MLP 64-32-32-10 on digits, d = {objective.dim}, GD lr = {args.lr}, {args.steps} steps, "
        f"measured every {args.every}; error = max over the k pairs of |lambda - ARPACK| / ARPACK"
    )
    print(
        f"{'k':>2} {'phase':<11} {'method':<14} {'n':>3} {'HVPs (median)':>14} {'HVPs (mean)':>12} "
        f"{'median err':>11} {'max err':>9} {'ms (median)':>12}"
    )
    for k in args.k:
        for phase in ("sharpening", "edge"):
            for method in ("eosflow.torch", "jax twin", "pyhessian"):
                sel = [r for r in rows if r[0] == k and r[1] == phase and r[2] == method]
                if not sel:
                    continue
                hvps, errs, ms = (np.array([r[i] for r in sel], float) for i in (3, 4, 5))
                print(
                    f"{k:>2} {phase:<11} {method:<14} {len(sel):>3} {np.median(hvps):>14.1f} {hvps.mean():>12.1f} "
                    f"{np.median(errs):>11.1e} {errs.max():>9.1e} {np.median(ms):>12.1f}"
                )


if __name__ == "__main__":
    main()
