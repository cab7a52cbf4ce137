"""The experiment specification: a TOML file validated into a :class:`Spec`.

    name = "demo"
    steps = 1000
    lr = 0.05                     # eta, shared by the optimizer and every model of it
    processes = ["gd", "central_flow"]

    [problem]                     # validated against the named problem's parameters
    name = "mlp"
    width = 32

    [spectrum]                    # top-eigenpair tracking (see eosflow.spectrum)
    every = 1

    [central_flow]                # options of one process, by its name
    substeps = 4

    [central_flow.spectrum]       # this process's tracker: the [spectrum] table with these keys replaced
    k_max = 6

A model of another optimizer (``adam_rod_flow``) shares that optimizer's hyperparameters the way
every model shares ``lr``: they live in the optimizer's table (``[adam] beta1 = 0.9``), which is
read by the optimizer and by each of its models, whether or not the optimizer itself is listed.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w

from eosflow.config import SpecError, option, parse, to_table, unknown_key_error
from eosflow.problems.registry import problem_params
from eosflow.process import PROCESSES, parse_options, process_entry
from eosflow.spectrum import Carry


@dataclasses.dataclass(frozen=True)
class SpectrumSpec:
    every: int = option(1, "measure the top eigenpairs every m steps (0: never)", ge=0)
    k: int = option(1, "eigenpairs tracked at the start", ge=1)
    k_max: int = option(6, "most eigenpairs ever tracked", ge=1)
    threshold: float = option(1.5, "track one more eigenvalue once all exceed threshold/lr", gt=0)
    grow_every: int = option(
        0,
        "also consider growing the tracked eigenspace every m steps within a chunk "
        "(0: only between chunks of `record.chunk` steps)",
        ge=0,
    )
    tol: float = option(1e-3, "relative residual |Hv - lambda v| / |lambda| accepted", gt=0, lt=1)
    max_iters: int = option(30, "LOBPCG iterations at most per measurement", ge=1)
    guard: int = option(1, "Ritz vectors kept beyond the k reported (no HVPs of their own)", ge=0)
    cluster: float = option(
        0.0,
        "relative gap below which Ritz values form a cluster converged as a whole: "
        "its subspace residual <= tol (0: each pair)",
        ge=0,
        lt=1,
    )
    carry: Carry = option(
        "power",
        "what an optimizer's measurement leaves for its next one to start from: each Ritz vector moved by one "
        "power step H v / |H v| (no HVP; fewer HVPs, docs/sharpness.md), or the Ritz vectors themselves; the "
        "models keep their Ritz vectors",
    )

    def check(self, where: str) -> None:
        if self.k > self.k_max:
            raise SpecError(f"`{where}.k` = {self.k} exceeds `{where}.k_max` = {self.k_max}")


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    chunk: int = option(100, "steps between flushes to disk (and checkpoints)", ge=1)
    params_every: int = option(0, "save the parameters every n steps (0: never)", ge=0)


@dataclasses.dataclass(frozen=True)
class DivergenceSpec:
    loss_blowup: float = option(1e4, "stop when the loss exceeds this multiple of the initial loss", gt=1)


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str = option("run", "a label for the run")
    seed: int = option(0, "seed of the initialization, data subsets and noise", ge=0, le=2**63 - 1)
    steps: int = option(1000, "optimizer steps (units of time) to run", ge=1)
    lr: float = option(0.05, "learning rate eta of the optimizer and its models", gt=0)
    dtype: Literal["float32", "float64"] = option("float32", "floating-point precision")
    microbatch: int = option(
        0,
        "evaluate full-batch losses in chunks of this many examples (0: all at once); for data whose "
        "forward pass does not fit in memory at once (the loss must be a mean over examples)",
        ge=0,
    )
    processes: tuple[str, ...] = option(("gd",), "processes run in lockstep; the first is the reference")
    problem: dict = dataclasses.field(default_factory=lambda: {"name": "mlp"})
    spectrum: SpectrumSpec = dataclasses.field(default_factory=SpectrumSpec)
    record: RecordSpec = dataclasses.field(default_factory=RecordSpec)
    divergence: DivergenceSpec = dataclasses.field(default_factory=DivergenceSpec)
    options: dict = dataclasses.field(default_factory=dict)  # process name -> its options
    spectra: dict = dataclasses.field(default_factory=dict)  # process name -> the [spectrum] keys it replaces

    def spectrum_of(self, name: str) -> SpectrumSpec:
        """The tracker of process ``name``: ``[spectrum]`` with the keys of its ``[name.spectrum]`` replaced."""
        return dataclasses.replace(self.spectrum, **self.spectra.get(name, {}))

    def check(self, where: str) -> None:
        if not self.processes:
            raise SpecError("`processes` must name at least one process")
        if len(set(self.processes)) != len(self.processes):
            raise SpecError(f"`processes` = {list(self.processes)} names a process twice")


def parse_spec(table: dict) -> Spec:
    """Validate a whole spec table (as read from TOML) into a Spec with every default resolved."""
    if not isinstance(table, dict):
        raise SpecError("a spec must be a TOML table")
    table = copy.deepcopy(table)
    base_fields = {f.name for f in dataclasses.fields(Spec)} - {"options", "spectra"}
    processes = table.get("processes", ["gd"])
    modelled = set()  # the optimizers whose hyperparameters a listed model reads
    if isinstance(processes, (list, tuple)):
        for name in processes:
            if isinstance(name, str) and (optimizer := process_entry(name).optimizer) is not None:
                modelled.add(optimizer)
    option_tables, overrides = {}, {}
    for key in list(table):
        if key in base_fields:
            continue
        if key in PROCESSES:
            if key not in processes and key not in modelled:
                raise SpecError(f"table `[{key}]` configures a process that `processes` does not list")
            option_tables[key] = table.pop(key)
            if isinstance(option_tables[key], dict) and "spectrum" in option_tables[key]:
                overrides[key] = option_tables[key].pop("spectrum")
        else:
            raise unknown_key_error("", key, base_fields | set(PROCESSES))
    problem = table.pop("problem", {"name": "mlp"})
    if not isinstance(problem, dict):
        raise SpecError(f"`problem` must be a table, got {problem!r}")
    spec = parse(Spec, table)
    for name in spec.processes:
        process_entry(name).check_problem(str(problem.get("name", "")))
    names = list(spec.processes) + sorted(modelled - set(spec.processes))
    options = {name: parse_options(name, option_tables.get(name)) for name in names}
    for name in overrides:
        if name not in spec.processes:
            raise SpecError(f"table `[{name}.spectrum]` sets the tracker of a process that `processes` does not list")
    spectra = {name: spectrum_override(spec.spectrum, name, keys) for name, keys in overrides.items()}
    return dataclasses.replace(spec, problem=problem, options=options, spectra=spectra)


def spectrum_override(spectrum: SpectrumSpec, name: str, table: Any) -> dict:
    """The keys of ``[name.spectrum]``, validated as the run's ``[spectrum]`` with them replaced."""
    where = f"{name}.spectrum"
    if not isinstance(table, dict):
        raise SpecError(f"`{where}` must be a table of [spectrum] keys, got {table!r}")
    merged = parse(SpectrumSpec, to_table(spectrum) | table, where)
    return {key: getattr(merged, key) for key in table}


def resolved_table(spec: Spec, problem_params: Any) -> dict:
    """The spec with every default filled in, as a TOML-ready table (re-parses to the same spec)."""
    table = to_table(dataclasses.replace(spec, options={}, problem={}, spectra={}))
    table.pop("options")
    table.pop("spectra")
    params = problem_params if isinstance(problem_params, dict) else to_table(problem_params)  # dict: import path
    table["problem"] = {"name": spec.problem["name"], **params}
    for name, opts in spec.options.items():
        table[name] = to_table(opts) | ({"spectrum": dict(spec.spectra[name])} if name in spec.spectra else {})
    return table


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A validated spec: the :class:`Spec`, its problem's parameters, and the table with every
    default filled in (what a run directory stores as ``spec.resolved.toml``)."""

    spec: Spec
    problem_params: Any
    table: dict

    @property
    def text(self) -> str:
        return tomli_w.dumps(self.table)


def resolve(table: dict) -> Resolved:
    """The one way to validate a spec table: every field, process option and problem parameter
    checked and defaulted, nothing built (no data read, no problem or process constructed)."""
    spec = parse_spec(table)
    _, params = problem_params(spec.problem)
    return Resolved(spec, params, resolved_table(spec, params))


def spec_differences(stored_text: str, resolved: dict) -> list[str]:
    """What differs between a run directory's ``spec.resolved.toml`` and the resolved table
    ``resolved`` ([] if nothing). The stored spec is re-resolved with today's defaults first, so
    a run written before an option existed matches the spec that leaves it at its default. An in-memory
    problem's ``fingerprint`` (of w0 and its data) is compared where both sides have one."""
    if stored_text == tomli_w.dumps(resolved):
        return []
    stored, current = _re_resolved(tomllib.loads(stored_text)), resolved
    if not ("fingerprint" in stored.get("problem", {}) and "fingerprint" in current.get("problem", {})):
        stored, current = _without_fingerprint(stored), _without_fingerprint(current)
    return _differences(stored, current)


def _without_fingerprint(table: dict) -> dict:
    """``table`` without its problem's ``fingerprint``: compared only where both sides built the problem in memory
    (a run written before it was recorded, or resumed from its spec's import path, has none to compare)."""
    problem = {key: value for key, value in table.get("problem", {}).items() if key != "fingerprint"}
    return table | {"problem": problem} if "problem" in table else table


def differences_but_steps(stored_text: str, resolved: dict) -> tuple[list[str], int]:
    """(:func:`spec_differences` other than in ``steps``, the stored ``steps``): a run directory whose
    spec differs only in its length can be extended (or, interrupted, ended sooner) by a resume."""
    stored_steps = tomllib.loads(stored_text).get("steps", resolved["steps"])
    return spec_differences(stored_text, resolved | {"steps": stored_steps}), stored_steps


def _re_resolved(stored: dict) -> dict:
    """``stored`` with today's defaults, or as written if this eosflow cannot read it (a process
    or option since removed): then every key it has that this one lacks shows as a difference."""
    try:
        return resolve(stored).table
    except SpecError:
        return stored


def _differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested tables, as "`key` = old there, new here"."""
    found = []
    for key in sorted(set(stored) | set(current), key=str):
        old, new = stored.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"`{prefix}{key}` = {old!r} there, {new!r} here")
    return found


def set_dotted(table: dict, assignment: str, flag: str = "--set") -> None:
    """Apply ``--set a.b=value`` (value parsed as TOML, else taken as a string) in place; errors name ``flag``."""
    if "=" not in assignment:
        raise SpecError(f"{flag} expects dotted.key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *parents, leaf = key.strip().split(".")
    node = table
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{flag} {key}: `{part}` is not a table")
    node[leaf] = value


def load_spec_table(path: str | Path) -> dict:
    """Read a TOML spec file, with a clear error for a missing or malformed file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist") from None
    except OSError as error:
        raise SpecError(f"cannot read spec file {str(path)!r}: {error.strerror}") from None
    try:
        text = data.decode("utf-8-sig")  # TOML is UTF-8; an editor's byte-order mark is dropped
    except UnicodeDecodeError as error:
        raise SpecError(
            f"spec file {str(path)!r} is not UTF-8 text, as TOML must be (byte {data[error.start]:#04x} at position "
            f"{error.start}): save it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"spec file {str(path)!r} is not valid TOML: {error}") from None
