"""The ``eosflow`` command.

    eosflow run SPEC.toml [--set key=value ...] [--out DIR] [--resume | --overwrite]
    eosflow resume DIR [--steps N]
    eosflow demo [--out DIR]
    eosflow report RUN_DIR
    eosflow sweep SPEC.toml --grid key=v1,v2 [--grid ...] [--scheduler ADDRESS]
    eosflow compare SPEC.toml [--set key=value ...] [--out DIR] [--overwrite] [--from onset|K]
    eosflow compare RUN_DIR --from onset|K
    eosflow leaderboard [--suite default|architectures|adaptive|all] [--quick] [--jobs N] [--out DIR]
                        [--problems A,B] [--models M,N]
    eosflow problems
    eosflow processes

User errors (a bad spec, an unusable run directory, a missing dataset) print one paragraph and
exit with status 2; ``compare --from`` checks its step and processes before the run starts (status 2,
nothing written), and when the optimizer never reaches its onset, or diverges, it keeps the run and its
report, prints why and exits with status 3 (as ``run`` for a run that did not complete). Ctrl-C and
SIGTERM stop after flushing the chunk in progress (status 130 / 143), with the command that resumes.
Each command imports what it needs (JAX, matplotlib, Dask) when it runs, so ``--help`` and ``--version``
answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time
import warnings
from functools import partial
from importlib import resources
from pathlib import Path

from eosflow.config import SpecError
from eosflow.signals import Interrupted
from eosflow.store import RunDirectoryWarning, StoreError, not_a_run_directory, report_command

USER_ERRORS = (SpecError, StoreError)


def _run_table(table: dict, out: Path, resume: bool, overwrite: bool, quiet: bool) -> int:
    from eosflow.compare import warn_incomplete_critical_sets
    from eosflow.experiment import run
    from eosflow.load import load
    from eosflow.progress import training_bar
    from eosflow.report import make_report, unconverged, unconverged_lines
    from eosflow.spec import parse_spec
    from eosflow.store import RunStore

    spec = parse_spec(table)
    try:
        if quiet:
            outcome = run(table, out, resume=resume, overwrite=overwrite)
        else:
            bar, update = training_bar(spec.steps, spec.processes[0], spec.lr)
            with bar:
                outcome = run(table, out, resume=resume, overwrite=overwrite, progress=update)
    except KeyboardInterrupt as error:
        return _interrupted(error, out)
    try:
        ds = load(out)
        report = make_report(out, ds)
    except KeyboardInterrupt as error:  # the run is whole on disk; only its report is not
        print(
            f"eosflow: {outcome.status}: {_steps(outcome.steps_done)} in {out}; its report was interrupted; "
            f"write it with: {report_command(out)}",
            file=sys.stderr,
        )
        return getattr(error, "exit_code", 130)
    warn_incomplete_critical_sets(ds)
    for line in unconverged_lines(ds, unconverged(ds)):
        print(f"eosflow: {line.removeprefix('- ')}", file=sys.stderr)
    summary = RunStore(out).read_summary()
    print(
        f"{outcome.status}: {_steps(outcome.steps_done)} in {out}, {summary.get('seconds', float('nan')):.1f} s of run "
        "time (all sessions)" + (f" ({outcome.reason})" if outcome.reason else "")
    )
    for name, reason in (summary.get("dropped_processes") or {}).items():
        print(f"dropped {name}: {reason}")
    print(f"report: {report}")
    return 0 if outcome.status == "completed" else 3


def _steps(count: int) -> str:
    """``1 step``, ``2 steps``."""
    return f"{count} step" + ("" if count == 1 else "s")


def _interrupted(error: KeyboardInterrupt, out: Path) -> int:
    """Say what of the run in ``out`` is on disk and how to resume it; the exit status of the signal."""
    from eosflow.store import RunStore, resume_command, steps_on_disk

    done = RunStore(out).read_summary().get("steps_done", 0)
    how = signal.Signals(error.signum).name if isinstance(error, Interrupted) else "SIGINT"
    print(
        f"eosflow: interrupted by {how}; {steps_on_disk(done)}; resume with: {resume_command(out)}",
        file=sys.stderr,
    )
    return getattr(error, "exit_code", 130)


DESCRIPTION = "Measure gradient descent at the edge of stability and compare it with its continuous-time models."
EPILOG = """examples:
  eosflow demo                                       the default experiment and its report
  eosflow run examples/demo.toml --set lr=0.3 --out runs/lr03
  eosflow resume runs/lr03                           continue an interrupted run
  eosflow resume runs/lr03 --steps 4000              extend it to 4000 steps
  eosflow report runs/lr03
  eosflow processes                                  every optimizer and model, with its options

'eosflow COMMAND --help' describes one command; the spec format is docs/spec.md."""


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``--set KEY=VALUE`` option of the commands that read a spec."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set lr=0.1 --set problem.width=32",
    )


def path_argument(text: str) -> Path:
    """A path given on the command line; an empty one (an unset shell variable, ``--out "$OUT"``) is refused
    rather than read as the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return Path(text)


def default_out(prefix: str, table: dict, spec: Path) -> Path:
    """runs/<prefix><name>-<time>, the spec's ``name`` (else the file's stem) reduced to a file name: a name
    such as "../x" stays inside runs/."""
    name = re.sub(r"[^\w.+-]", "_", str(table.get("name", spec.stem))).lstrip(".") or "run"
    return Path("runs") / f"{prefix}{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _step_or_name(text: str) -> int | str:
    """``--from``'s value: a step (an integer), else the text as given (eosflow.anchored checks it)."""
    return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else text


def _version() -> str:
    import importlib.metadata

    return importlib.metadata.version("eosflow")


def demo_table() -> dict:
    """The default experiment (an MLP on scikit-learn's digits reaching the edge of stability)."""
    import tomllib

    return tomllib.loads(resources.files("eosflow").joinpath("specs/demo.toml").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eosflow", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"eosflow {_version()}")
    parser.add_argument(
        "--compile-cache",
        type=path_argument,
        metavar="DIR",
        help="keep compiled programs in DIR and load them from it in later commands (JAX's persistent cache)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser("run", help="run an experiment spec into a run directory")
    p_run.add_argument("spec", type=path_argument, help="the spec (TOML); with --resume, a run directory will do")
    add_overrides(p_run)
    p_run.add_argument("--out", type=path_argument, help="run directory (default: runs/<name>-<time>)")
    mode = p_run.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in --out (or: eosflow run --resume DIR)"
    )
    mode.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p_run.add_argument("--quiet", action="store_true", help="no progress bar")

    p_resume = sub.add_parser("resume", help="continue (and repair) an interrupted run from its directory alone")
    p_resume.add_argument("run_dir", type=path_argument, help="the run directory; its stored spec is used")
    p_resume.add_argument(
        "--steps", type=int, help="run to this many steps in all (extend a finished run; never fewer than on disk)"
    )
    p_resume.add_argument("--quiet", action="store_true", help="no progress bar")

    p_demo = sub.add_parser("demo", help="run the default experiment and write its report")
    p_demo.add_argument(
        "--out",
        type=path_argument,
        default=Path("runs/demo"),
        help="run directory (default: runs/demo); an earlier demo there is replaced, another run refused",
    )
    p_demo.add_argument("--quiet", action="store_true", help="no progress bar")

    p_report = sub.add_parser("report", help="(re)write the report of a run directory")
    p_report.add_argument("run_dir", type=path_argument, help="a run directory (what run, demo or compare wrote)")

    p_sweep = sub.add_parser("sweep", help="run the product of grids over a spec on a Dask cluster")
    p_sweep.add_argument("spec", type=path_argument, help="the spec (TOML) every point starts from")
    p_sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        required=True,
        help="a grid over one dotted key, e.g. --grid lr=0.1,0.2 (repeat for a product)",
    )
    add_overrides(p_sweep)
    p_sweep.add_argument("--scheduler", help="address of an existing dask scheduler (default: a LocalCluster)")
    p_sweep.add_argument("--workers", type=int, help="LocalCluster workers (default: one per core)")
    p_sweep.add_argument("--out", type=path_argument, help="sweep directory (default: runs/sweep-<name>-<time>)")
    p_sweep.add_argument("--quiet", action="store_true", help="no progress display")

    p_compare = sub.add_parser("compare", help="run GD and models from one w0 and report how well each tracks GD")
    p_compare.add_argument(
        "spec",
        type=path_argument,
        help="the spec (TOML): GD first, then the models; with --from, a run directory will do (its run is kept)",
    )
    add_overrides(p_compare)
    p_compare.add_argument("--out", type=path_argument, help="run directory (default: runs/compare-<name>-<time>)")
    p_compare.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p_compare.add_argument("--quiet", action="store_true", help="no progress bar")
    p_compare.add_argument(
        "--from",
        dest="at",
        type=_step_or_name,
        metavar="onset|K",
        help="also restart the models on the optimizer's state at step K, or at its edge onset (first edge ratio "
        ">= 0.95), and score them from there: saved as RUN_DIR/from_step_K.nc, a section of the report "
        '(docs/compare.md, "From a later step"); exit status 3 if the optimizer never reaches its onset',
    )

    p_board = sub.add_parser("leaderboard", help="rank every model of GD on the built-in problem suite")
    p_board.add_argument(
        "--quick", action="store_true", help="the toy problems only, shortened (under a minute on 2 CPU cores)"
    )
    p_board.add_argument(
        "--suite",
        default="default",
        help="default (toys, MLP, CNN, mean field), architectures (ResNet, transformer, LSTM, MLP), "
        "adaptive (RMSProp and Adam with their models) or all",
    )
    p_board.add_argument("--jobs", type=int, default=1, help="problems run at once in worker processes")
    p_board.add_argument("--problems", help="comma-separated problems of the suite to run (default: all)")
    p_board.add_argument(
        "--models", help="comma-separated models to run beside the reference and its baseline (default: all)"
    )
    p_board.add_argument("--out", type=path_argument, help="directory (default: runs/leaderboard[-SUITE][-quick])")
    p_board.add_argument("--quiet", action="store_true", help="no progress bars")

    p_log = sub.add_parser(
        "plot-log", help="draw edge logs of your own loop (eosflow.edge_log), one or several overlaid, and summarize"
    )
    p_log.add_argument("log", type=path_argument, nargs="+", help="JSON-lines files an eosflow.edge_log.EdgeLog wrote")
    p_log.add_argument("--out", type=path_argument, help="the PNG (default, for one log: its name with .png)")

    sub.add_parser("problems", help="list every problem with its parameters and defaults")
    sub.add_parser("processes", help="list every optimizer and model with its options")

    args = parser.parse_args(argv)
    if args.command == "plot-log" and len(args.log) > 1 and args.out is None:
        p_log.error("give --out for the figure of several logs")
    previous = _terminate_raises()
    try:
        if args.compile_cache is not None:
            from eosflow.compile_cache import use_compile_cache

            use_compile_cache(args.compile_cache)
        with warnings.catch_warnings():
            warnings.simplefilter("always", RunDirectoryWarning)
            warnings.showwarning = _warning_printer()
            return _dispatch(args)
    except USER_ERRORS as error:
        print(f"eosflow: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print("eosflow: interrupted", file=sys.stderr)
        return getattr(error, "exit_code", 130)
    except BrokenPipeError:  # `eosflow problems | head`: the reader has gone; no traceback, no more output
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_raises():
    """SIGTERM (``timeout``, Slurm, ``docker stop``) outside a run's chunk loop stops like Ctrl-C,
    with exit status 143 (a run's own handler stops it at a chunk boundary instead)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, handler)


def _warning_printer():
    """``warnings.showwarning`` for one command: each message once (a run directory's damage is found by load,
    report and summary alike, and was printed two or three times), without Python's file and line."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if str(message) not in shown:
            shown.add(str(message))
            print(f"eosflow: warning: {message}", file=sys.stderr)

    return show


def _dispatch(args) -> int:
    from eosflow.spec import load_spec_table, set_dotted

    if args.command == "resume" or (args.command == "run" and args.resume and args.spec.is_dir() and not args.out):
        run_dir = args.run_dir if args.command == "resume" else args.spec
        if not (run_dir / "spec.toml").is_file():
            raise not_a_run_directory(run_dir)
        table = load_spec_table(run_dir / "spec.toml")
        for assignment in getattr(args, "set", []):
            set_dotted(table, assignment)
        if getattr(args, "steps", None) is not None:
            table["steps"] = args.steps
        return _run_table(table, run_dir, True, False, args.quiet)
    if args.command == "run":
        if args.resume and not args.out:
            raise StoreError(
                f"--resume needs the run directory: eosflow run {args.spec} --resume --out DIR, or eosflow resume DIR"
            )
        table = load_spec_table(args.spec)
        for assignment in args.set:
            set_dotted(table, assignment)
        out = args.out or default_out("", table, args.spec)
        return _run_table(table, out, args.resume, args.overwrite, args.quiet)
    if args.command == "sweep":
        from eosflow.sweep import run_sweep

        table = load_spec_table(args.spec)
        for assignment in args.set:
            set_dotted(table, assignment)
        out = args.out or default_out("sweep-", table, args.spec)
        path = run_sweep(table, args.grid, out, scheduler=args.scheduler, workers=args.workers, progress=not args.quiet)
        print(f"sweep: {path}")
        return 0
    if args.command == "compare":
        from eosflow.anchored import NoAnchorStep, check_anchorable
        from eosflow.compare import compare, compare_from, report_page, warn_incomplete_critical_sets
        from eosflow.load import load
        from eosflow.store import RunStore

        if args.spec.is_dir():  # a run directory: add the comparison from a step to it, rerunning nothing else
            out = args.spec
            if not (out / "spec.toml").is_file():
                raise not_a_run_directory(out)
            if args.at is None or args.set or args.out or args.overwrite:
                raise StoreError(
                    f"{str(out)!r} is a directory: `eosflow compare RUN_DIR --from onset|K` adds the comparison "
                    "from a step to a run directory (with no --set, --out or --overwrite); `eosflow report RUN_DIR` "
                    "redraws its report"
                )
            recorded = RunStore(out).read_summary()  # whether its optimizer diverged, and where
            check_anchorable(load_spec_table(out / "spec.toml"), args.at, where="--from", recorded=recorded)
            make = partial(compare_from, out, args.at)
        else:
            table = load_spec_table(args.spec)
            for assignment in args.set:
                set_dotted(table, assignment)
            out = args.out or default_out("compare-", table, args.spec)
            make = partial(
                compare, table, out, overwrite=args.overwrite, progress=not args.quiet, at=args.at, where="--from"
            )
        try:
            page = make()
        except KeyboardInterrupt as error:
            return _interrupted(error, out)
        except NoAnchorStep as error:
            print(f"report: {report_page(out)}")
            warn_incomplete_critical_sets(load(out))
            print(
                f"eosflow: no comparison from {args.at}: {error}. The run from w0 and its report are kept in {out}.",
                file=sys.stderr,
            )
            return 3
        print(f"report: {page}")
        warn_incomplete_critical_sets(load(out))
        return 0
    if args.command == "leaderboard":
        from eosflow.leaderboard import SuiteInterrupted, leaderboard

        name = "leaderboard" + (f"-{args.suite}" if args.suite != "default" else "") + ("-quick" if args.quick else "")
        out = args.out or Path("runs") / name
        try:
            page = leaderboard(
                out,
                quick=args.quick,
                progress=not args.quiet,
                suite=args.suite,
                jobs=args.jobs,
                problems=args.problems.split(",") if args.problems else None,
                models=args.models.split(",") if args.models else None,
            )
        except SuiteInterrupted as error:
            print(
                f"eosflow: interrupted before it finished {', '.join(error.rest)}; "
                + (f"the table of the entries it finished: {error.page}; " if error.page else "no entry finished; ")
                + f"the runs so far are in {out / 'runs'}. The rest, merged into "
                + ("that table" if error.page else "the table in --out")
                + f": {error.command}",
                file=sys.stderr,
            )
            return error.exit_code
        print(f"leaderboard: {page}")
        return 0
    if args.command == "demo":
        if (args.out / "spec.toml").is_file():  # the demo runs afresh over an earlier demo, and over nothing else
            earlier = load_spec_table(args.out / "spec.toml")
            if earlier != demo_table():
                raise StoreError(
                    f"{str(args.out)!r} holds the run {earlier.get('name', '?')!r}, not the demo, which would replace "
                    "it: give the demo another --out"
                )
        return _run_table(demo_table(), args.out, False, True, args.quiet)
    if args.command == "report":
        from eosflow.report import make_report

        print(make_report(args.run_dir))
        return 0
    if args.command == "plot-log":
        from eosflow import edge_log

        runs = {}
        for path in args.log:
            runs[path] = ds = edge_log.read(path)
            if not ds.sizes["step"]:
                print(f"{path}: no records")
                continue
            print(
                f"{path}: {ds.sizes['step']} steps logged ({int(ds.step[0])}..{int(ds.step[-1])}), "
                f"{', '.join(map(str, ds.data_vars))}"
            )
            found = edge_log.summary(ds)
            for key, value in found.items():
                print(f"  {key}: {value if not isinstance(value, float) else f'{value:.4f}'}")
            if not found and "sharpness" in ds:
                print(f"  {edge_log.NO_THRESHOLD}")
            for tail in edge_log.non_finite_tails(ds):
                print(f"  {tail} (diverged)")
            for line in edge_log.unconverged_readings(ds):
                print(f"  {line}")
        if len(args.log) == 1:
            print(edge_log.plot(runs[args.log[0]], args.out or args.log[0].with_suffix(".png")))
        else:
            print(edge_log.overlay(args.log, args.out))
        return 0
    if args.command == "problems":
        from eosflow.problems import describe_problems

        print(describe_problems())
        return 0
    if args.command == "processes":
        from eosflow.process import PROCESSES

        def summary(entry):
            only = f" (problem {', '.join(entry.problems)} only)" if entry.problems else ""
            return entry.summary + only

        print(
            "Each process below, with its options and their defaults. Name processes in `processes`;\n"
            "set an option in the table of the process's name, e.g.\n\n"
            '    processes = ["gd", "central_flow"]\n    [central_flow]\n    substeps = 8\n'
        )
        print(_listing({name: (summary(e), e.options) for name, e in PROCESSES.items()}))
        return 0
    raise AssertionError(args.command)


def _listing(entries: dict) -> str:
    from eosflow.config import describe_fields

    lines = []
    for name, (summary, params) in sorted(entries.items()):
        lines.append(f"[{name}]  {summary}")
        rows = [(f"{field} = {default}", text) for field, default, text in describe_fields(params)]
        width = max((len(left) for left, _ in rows), default=0)
        lines += [f"    {left:<{width}}  {text}" for left, text in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
