"""A model's accuracy and own cost on the leaderboard's problems, for other settings of its options.

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/model_variants.py [--model rod_flow]
        [--problems mlp_digits cnn_digits] [--variants substeps=4 substeps=2 correction=false]
        [--suite default|architectures|adaptive] [--problem-options 'activation="swish"']

For each problem named, from the leaderboard suite ``--suite``, one run of gd, gradient_flow and the
model per variant (the model's options as TOML values, several joined by ``,``; keys
``spectrum.KEY`` set the run's ``[spectrum]`` table instead, and ``model.spectrum.KEY`` the model's own
``[model.spectrum]`` table, which an entry may already set and is otherwise kept), scored as the
leaderboard scores it (``eosflow.compare``). Prints the accuracy columns, the model's own
gradient-equivalents per step (as the leaderboard's column: without the eigensolver for a model
that never reads the eigenpairs) and the eigensolver's, and the largest relative change of an
accuracy column against the first variant (put the leaderboard's setting first), and whether the
optimizer reached the edge (its share of steps at edge ratio >= 0.95, i.e. lr S >= 1.9 for GD).
"""

from __future__ import annotations

import argparse
import tempfile
import tomllib

import numpy as np

from eosflow.compare import ACCURACY, compare_run
from eosflow.experiment import run
from eosflow.leaderboard import own_cost, suite_entries, suite_tables
from eosflow.load import load


def options(variant: str) -> dict:
    """``substeps=2,correction=false`` -> {"substeps": 2, "correction": False}."""
    return tomllib.loads("\n".join(variant.split(",")))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rod_flow")
    parser.add_argument("--problems", nargs="+", default=["mlp_digits", "cnn_digits"])
    parser.add_argument("--variants", nargs="+", default=["substeps=4", "substeps=2", "correction=false"])
    parser.add_argument("--suite", default="default", help="the leaderboard suite the problems come from")
    parser.add_argument(
        "--problem-options",
        default="",
        help='TOML values for every problem\'s [problem] table, e.g. activation="swish"',
    )
    args = parser.parse_args(argv)
    tables = suite_tables(models=[args.model], suite=suite_entries(args.suite))
    problem_options = options(args.problem_options)
    for table in tables.values():
        table["problem"] = {**table["problem"], **problem_options}
    print(
        f"| problem | {args.model} options | " + " | ".join(ACCURACY) + " | own grad-equiv. / step | "
        "eigensolver grad-equiv. / step | largest change | optimizer's steps at edge ratio >= 0.95 (max) |"
    )
    print("|---" * (len(ACCURACY) + 6) + "|")
    for problem in args.problems:
        reference = None
        for variant in args.variants:
            chosen = options(variant)
            spectrum = {**tables[problem]["spectrum"], **chosen.pop("spectrum", {})}  # `spectrum.tol=1e-2`
            model = chosen.pop("model", {})
            own = model.pop("spectrum", {})  # `model.spectrum.k_max=6`: the model's own tracker
            if model:
                raise SystemExit(f"{variant!r}: `model.` takes only `model.spectrum.KEY`, got {sorted(model)}")
            model_table = {**tables[problem].get(args.model, {}), **chosen}  # keeps [model.spectrum]
            if own:
                model_table["spectrum"] = {**model_table.get("spectrum", {}), **own}
            table = {**tables[problem], args.model: model_table, "spectrum": spectrum}
            with tempfile.TemporaryDirectory() as out:
                run(table, out, overwrite=True)
                row = compare_run(out).loc[args.model]
                edge = at_the_edge(load(out).edge_ratio.sel(process=tables[problem]["processes"][0]).values)
            accuracy = [float(row[c]) for c in ACCURACY]
            reference = accuracy if reference is None else reference
            change = max(abs(a - b) / abs(b) for a, b in zip(accuracy, reference, strict=True))
            total, measurement = float(row["gradient_equivalents"]), float(row["measurement_equivalents"])
            cells = " | ".join(f"{a:.4g}" for a in accuracy)
            own = own_cost(args.model, total, measurement)
            print(
                f"| {problem} | {variant} | {cells} | {own:.1f} | {measurement:.1f} | {change:.1%} | {edge} |",
                flush=True,
            )


def at_the_edge(edge_ratio: np.ndarray) -> str:
    """The share of the measured steps with edge ratio >= 0.95 (lr S >= 1.9 for GD; the preconditioned
    sharpness over its threshold for an adaptive optimizer), and the largest: whether the run reached the edge."""
    measured = edge_ratio[np.isfinite(edge_ratio)]
    return f"{np.mean(measured >= 0.95):.0%} ({np.max(measured):.3f})"


if __name__ == "__main__":
    main()
