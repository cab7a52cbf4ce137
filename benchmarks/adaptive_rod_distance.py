"""What a model's distance to its optimizer is made of: the optimizer's oscillation, and the centres' drift.

    PYTHONPATH=src python benchmarks/adaptive_rod_distance.py RUN_DIR [RUN_DIR ...] [--directions] [--travel K]

RUN_DIR: a run that saved every iterate (``record.params_every = 1``; ``benchmarks/adaptive_rows.py
--seeds ... --params-every 1`` writes them), whose first process is the optimizer. With w_k its iterates,
z_k a model's position and c_k = (w_{k-1} + 2 w_k + w_{k+1}) / 4 the optimizer's local centre (for a
period-2 orbit around a slowly moving point, that point),

    w_k - z_k = (w_k - c_k) + (c_k - z_k),      |w_k - c_k| = the optimizer's ``oscillation``,

so the distance d_k = |w_k - z_k| splits into the *oscillation floor* |w_k - c_k| (no model that reports
a smooth centre can come closer on average than that) and the *drift* |c_k - z_k| of the model's centre
from the optimizer's; the drift splits again into its component along the optimizer's oscillation
direction (w_k - c_k)/|w_k - c_k| and the rest. For a model that records its rod (``top_vector`` u and
``amplitude`` a; the experiment keeps ``reference_offset`` o = <w_k - z_k, u>), also the distance from
w_k to the rod's end on the side the model gives iterate k, z_k + (-1)^k a u (squared: d^2 - 2 (-1)^k a o +
a^2), and to the nearer end (the phase ignored). Time averages over the whole run, before and after the
optimizer's edge onset (first step with edge ratio >= 0.95); ``/ stable`` divides by the stable flow's <d>.
Then each model's distance at steps 1, 10, 100, the onset and the last step.

``--directions``: where the drift lies at the onset and at the last step: the share of |c_k - z_k|^2 in the
top 1, 3, 10 and 100 eigenvectors of the Hessian H(c_k) (dense, the run's problem rebuilt from its spec;
H itself, not Adam's preconditioned Hessian, whose P the saved iterates do not carry).

``--travel K``: how far each process moves from step K to the last step, |x_end - x_K|, and the cosine of
that displacement with the optimizer's (where models and optimizer part after the onset).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import eosflow
from eosflow.compare import baseline_of
from eosflow.load import load_params
from eosflow.precision import precision
from eosflow.problems import build_problem
from eosflow.spec import resolve
from eosflow.spectrum import dense_top_eigenpairs

TOP = (1, 3, 10, 100)


def split(iterates: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Per step 1..n-2: distance, floor, drift, and the drift along / across the optimizer's oscillation."""
    w = iterates[1:-1]
    centre = (iterates[:-2] + 2.0 * w + iterates[2:]) / 4.0
    z = positions[1:-1]
    swing, drift = w - centre, centre - z
    floor = np.linalg.norm(swing, axis=1)
    direction = swing / np.where(floor > 0, floor, 1.0)[:, None]
    along = np.einsum("nd,nd->n", drift, direction)
    total = np.linalg.norm(drift, axis=1)
    return {
        "distance": np.linalg.norm(w - z, axis=1),
        "floor": floor,
        "drift": total,
        "drift along": np.abs(along),
        "drift across": np.sqrt(np.maximum(total**2 - along**2, 0.0)),
    }


def ends(ds, name: str) -> dict[str, np.ndarray]:
    """Distances to the rod's end of the model's phase, z + (-1)^k a u, and to the nearer end (steps 1..n-2)."""
    d = ds["distance"].sel(process=name).values.astype(np.float64)
    offset = ds["reference_offset"].sel(process=name).values.astype(np.float64)
    a = ds["amplitude"].sel(process=name).values.astype(np.float64)
    sign = 1.0 - 2.0 * (np.arange(len(d)) % 2)
    return {
        "phase end": np.sqrt(np.maximum(d**2 - 2.0 * sign * a * offset + a**2, 0.0))[1:-1],
        "nearer end": np.sqrt(np.maximum(d**2 - 2.0 * a * np.abs(offset) + a**2, 0.0))[1:-1],
    }


def directions(run_dir: str, iterates: np.ndarray, models: dict[str, np.ndarray], steps: list[int]) -> None:
    """Print the share of each model's drift c_k - z_k in the top eigenvectors of H(c_k) at ``steps``."""
    spec = resolve(tomllib.loads((Path(run_dir) / "spec.resolved.toml").read_text())).spec
    with precision(spec.dtype):
        problem, _ = build_problem(spec.problem, spec.seed, spec.dtype)
        for k in steps:
            centre = (iterates[k - 1] + 2.0 * iterates[k] + iterates[k + 1]) / 4.0
            pairs = dense_top_eigenpairs(problem.objective, jnp.asarray(centre, problem.w0.dtype), max(TOP))
            vectors = np.asarray(pairs.vectors, np.float64)
            print(f"  step {k}: top eigenvalues of H {', '.join(f'{v:.3g}' for v in np.asarray(pairs.values)[:3])}")
            for name, positions in models.items():
                drift = centre - positions[k]
                shares = np.cumsum((vectors.T @ drift) ** 2) / np.sum(drift**2)
                text = ", ".join(f"top {n}: {shares[n - 1]:.1e}" for n in TOP)
                print(f"    {name:22s} |drift| {np.linalg.norm(drift):.4g}; share of |drift|^2 in {text}")


def travel(iterates: np.ndarray, models: dict[str, np.ndarray], start: int) -> None:
    """Print each process's displacement from step ``start`` to the end, and its cosine with the optimizer's."""
    reference = iterates[-1] - iterates[start]
    print(f"  travel from step {start}: optimizer {np.linalg.norm(reference):.4g}")
    for name, positions in models.items():
        moved = positions[-1] - positions[start]
        size = np.linalg.norm(moved)
        cosine = float(moved @ reference) / (size * np.linalg.norm(reference)) if size > 0 else float("nan")
        print(f"    {name:22s} {size:.4g}, cosine with the optimizer's {cosine:.3f}")


def report(run_dir: str, along: bool, travel_from: int | None = None) -> None:
    ds = eosflow.load(run_dir)
    processes = [str(p) for p in ds.process.values]
    optimizer = processes[0]
    _, iterates = load_params(run_dir, optimizer)
    iterates = iterates.astype(np.float64)
    edge = ds["edge_ratio"].sel(process=optimizer).values[1:-1]
    above = np.flatnonzero(edge >= 0.95)
    onset = int(above[0]) if above.size else len(edge)
    parts, positions = {}, {}
    for name in processes[1:]:
        positions[name] = load_params(run_dir, name)[1].astype(np.float64)
        parts[name] = split(iterates, positions[name])
        if "reference_offset" in ds and np.isfinite(ds["reference_offset"].sel(process=name).values).any():
            parts[name].update(ends(ds, name))
    scale = np.mean(parts[baseline_of(optimizer)]["distance"])
    print(f"{run_dir}: {optimizer}, {len(iterates)} steps, edge onset at step {onset + 1}; <d> / stable = {scale:.4g}")
    print(f"  {'model':22s} {'part':13s} {'mean':>9s} {'/ stable':>9s} {'before':>9s} {'after':>9s}")
    for name, columns in parts.items():
        for part, values in columns.items():
            before = np.mean(values[:onset]) if onset else np.nan
            after = np.mean(values[onset:]) if onset < len(values) else np.nan
            print(
                f"  {name:22s} {part:13s} {np.mean(values):9.4g} {np.mean(values) / scale:9.3f} "
                f"{before:9.4g} {after:9.4g}"
            )
    marks = [k for k in (1, 10, 100, onset + 1, len(iterates) - 1) if k < len(iterates)]
    print(f"  {optimizer}'s first step |w_1 - w_0| = {np.linalg.norm(iterates[1] - iterates[0]):.3g}")
    for name, z in positions.items():
        d = np.linalg.norm(iterates - z, axis=1)
        print(f"  {name:22s} distance at step " + ", ".join(f"{k}: {d[k]:.3g}" for k in marks))
    if along:
        directions(run_dir, iterates, positions, [min(onset + 1, len(iterates) - 2), len(iterates) - 2])
    if travel_from is not None:
        travel(iterates, positions, travel_from)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--directions", action="store_true", help="the drift's share in H's top eigenvectors")
    parser.add_argument("--travel", type=int, default=None, help="each process's displacement from this step")
    args = parser.parse_args()
    for run in args.runs:
        report(run, args.directions, args.travel)


if __name__ == "__main__":
    main()
