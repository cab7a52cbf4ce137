"""Problems by name: each registers a builder and the dataclass of its parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array

from eosflow.config import SpecError, describe_fields, parse, suggest
from eosflow.data import CLASSIFICATION, REGRESSION
from eosflow.objective import Objective


@dataclasses.dataclass
class Problem:
    """What a process needs: the training objective and the shared initialization.

    Attributes:
        objective: the full-batch training loss over the flat parameter vector.
        w0: the initial flat parameters (the same for every process of an experiment).
        test_objective: the same loss on held-out data, if the problem has a test split.
        accuracy: ``accuracy(w, data)`` in [0, 1] for classification problems.
        num_classes: K, for classification problems (the flattest MSE sharpness is 2/K).
        info: anything worth recording in the run summary (sizes, dataset, ...).
    """

    objective: Objective
    w0: Array
    test_objective: Objective | None = None
    accuracy: Callable[[Array, Any], Array] | None = None
    num_classes: int | None = None
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ProblemEntry:
    name: str
    params: type
    build: Callable[..., Problem]
    summary: str


PROBLEMS: dict[str, ProblemEntry] = {}


def register_problem(name: str, params: type, summary: str):
    """Decorator: ``build(params, seed, dtype) -> Problem`` becomes available as ``name``."""

    def decorate(build):
        PROBLEMS[name] = ProblemEntry(name, params, build, summary)
        return build

    return decorate


def parse_problem(table: dict) -> tuple[ProblemEntry, Any]:
    """Validate the ``[problem]`` table without building anything; returns (its entry, its params)."""
    table = dict(table or {})
    name = table.pop("name", None)
    if name is None:
        raise SpecError(f"`problem.name` is required; choose one of {', '.join(sorted(PROBLEMS))}")
    if name not in PROBLEMS:
        raise SpecError(f"unknown problem `problem.name` = {name!r}{suggest(str(name), PROBLEMS)}")
    entry = PROBLEMS[name]
    return entry, parse(entry.params, table, "problem")


def build_problem(table: dict, seed: int, dtype: str) -> tuple[Problem, Any]:
    """Validate the ``[problem]`` table and build the problem; returns (problem, params)."""
    entry, params = parse_problem(table)
    return entry.build(params, seed, jnp.dtype(dtype)), params


def describe_problems() -> str:
    """Every problem with its parameters, defaults and help, then the datasets (``eosflow problems``)."""
    lines = []
    for name, entry in sorted(PROBLEMS.items()):
        lines.append(f"{name}: {entry.summary}")
        rows = describe_fields(entry.params)
        width = max((len(f"{field} = {default}") for field, default, _ in rows), default=0)
        lines += [f"    {f'{field} = {default}':<{width}}  {text}" for field, default, text in rows]
        lines.append("")
    for task, registry in (("classification", CLASSIFICATION), ("regression", REGRESSION)):
        lines.append(f"{task} datasets (problem.dataset):")
        width = max(len(name) for name in registry)
        lines += [f"    {name:<{width}}  {entry.summary}" for name, entry in sorted(registry.items())]
    return "\n".join(lines)
