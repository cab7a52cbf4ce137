"""The adaptive suite's models started on the optimizer's state at its edge onset, over several seeds.

    PYTHONPATH=src python benchmarks/from_onset_seeds.py [--entries mlp_digits-adam,...] [--seeds 0,1,2,3,4]
        [--set adam_rod_flow.rod_rate=first_order ...]

For each entry of ``leaderboard.ADAPTIVE_SUITE`` (default: all) and seed, runs the optimizer from w0 and
its models from its state at its onset (its first step with edge ratio >= 0.95; :func:`eosflow.anchored.
anchored`, as the leaderboard's "from onset" columns) and prints, per model, the onset step, the rel.
distance and rel. centre distance to the optimizer (the stable flow restarted there the yardstick) and the
loss error and its window-averaged form over the steps after the onset; the row ``<optimizer> (floor)`` is
the optimizer itself restarted there a rounding away (the leaderboard's optimizer row, docs/compare.md "The
floor"). Then, per (entry, model), on how many seeds the rel. distance and the rel. centre distance are
<= 0.5 and the loss error (avg) <= 0.1 (issue 21's acceptance figures), and <= the larger of 0.1 and the
floor's loss error (avg) of that seed.
"""

from __future__ import annotations

import argparse

from eosflow.leaderboard import ADAPTIVE_SUITE, from_onset, suite_tables
from eosflow.spec import set_dotted

METRICS = ("relative_distance", "relative_centre_distance", "loss_error", "loss_error_averaged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", default=",".join(entry.name for entry in ADAPTIVE_SUITE))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--set", nargs="*", default=[], help="dotted assignments applied to every entry's spec")
    args = parser.parse_args()
    names = args.entries.split(",")
    unknown = sorted(set(names) - {entry.name for entry in ADAPTIVE_SUITE})
    if unknown:
        raise SystemExit(f"--entries: {', '.join(unknown)} not in the adaptive suite")
    tables = suite_tables(suite=tuple(entry for entry in ADAPTIVE_SUITE if entry.name in names))
    for table in tables.values():
        for assignment in args.set:
            set_dotted(table, assignment)
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| entry | seed | model | onset | rel. distance | rel. centre distance | loss error | loss error (avg) |")
    print("|---|---|---|---|---|---|---|---|")
    met: dict[tuple[str, str], list[tuple[bool, bool, bool]]] = {}
    for name, table in tables.items():
        for seed in seeds:
            rows = from_onset({**table, "seed": seed}).set_index("process")
            optimizer = table["processes"][0]
            for model in [optimizer, *table["processes"][2:]]:
                row = rows.loc[model]
                values = [float(row.get(metric + "_from_onset", float("nan"))) for metric in METRICS]
                onset = row.get("onset", float("nan"))
                label = f"{model} (floor)" if model == optimizer else model
                print(f"| {name} | {seed} | {label} | {onset:.0f} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
                if model == optimizer:
                    floor = values[3]
                    continue
                bound = max(0.1, floor)
                met.setdefault((name, model), []).append(
                    (values[0] <= 0.5, values[1] <= 0.5, values[3] <= 0.1, values[3] <= bound)
                )
    print()
    print(
        "| entry | model | rel. distance <= 0.5 | rel. centre distance <= 0.5 | loss error (avg) <= 0.1 "
        "| loss error (avg) <= max(0.1, floor) |"
    )
    print("|---|---|---|---|---|---|")
    for (name, model), flags in met.items():
        counts = [sum(flag[i] for flag in flags) for i in range(4)]
        print(f"| {name} | {model} | " + " | ".join(f"{c} of {len(flags)}" for c in counts) + " |")


if __name__ == "__main__":
    main()
