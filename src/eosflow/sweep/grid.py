"""The grid of a sweep: ``--grid key=v1,v2`` texts parsed into values, and values written back as
TOML text (for ``--set``), as directory names and as one parquet column type."""

from __future__ import annotations

import re
import tomllib

import tomli_w

from eosflow.config import SpecError


def parse_grid(text: str) -> tuple[str, list]:
    """``"lr=0.1,0.2"`` -> ``("lr", [0.1, 0.2])``: values are TOML (bare words are strings).

    A list value is written as a TOML array: ``problem.eigenvalues=[20.0, 1.0],[30.0, 1.0]``.
    """
    if "=" not in text:
        raise SpecError(f"--grid expects dotted.key=v1,v2,..., got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or not all(part.strip() for part in key.split(".")):
        raise SpecError(f"--grid {text!r}: the key must be a dotted spec key such as `lr` or `problem.width`")
    try:
        values = tomllib.loads(f"v = [{raw}]")["v"]
    except tomllib.TOMLDecodeError:
        values = [_scalar(word.strip(), key) for word in raw.split(",")]
    if not values:
        raise SpecError(f"--grid {key}: no values given (write {key}=v1,v2,...)")
    for i, value in enumerate(values):
        if isinstance(value, dict):
            raise SpecError(f"--grid {key}: a table value is not allowed; grid over its keys ({key}.name=...)")
        if any(same_value(value, other) for other in values[:i]):
            raise SpecError(f"--grid {key}: the value {literal(value)} is listed twice")
    return key, values


def same_value(a, b) -> bool:
    """Whether two grid values make one point: equal, an int and a float alike (``1`` and ``1.0`` resolve to the
    same spec), a bool apart from the numbers (``true`` is not ``1``), a string apart from everything else."""

    def kind(value):
        return "number" if isinstance(value, int | float) and not isinstance(value, bool) else type(value)

    return kind(a) == kind(b) and a == b


def _scalar(word: str, key: str):
    if not word:
        raise SpecError(f"--grid {key}: an empty value in the list (write {key}=v1,v2,...)")
    try:
        return tomllib.loads(f"v = {word}")["v"]
    except tomllib.TOMLDecodeError:
        return word


def literal(value) -> str:
    """The one-line TOML text of a value (what ``--set key=<text>`` parses back to ``value``)."""
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return tomli_w.dumps({"v": value})[len("v = ") :].strip()


def label(value) -> str:
    """A value as it appears in a point's directory name (strings unquoted, no spaces or slashes)."""
    if isinstance(value, list):
        return "[" + ",".join(label(v) for v in value) + "]"
    text = value if isinstance(value, str) else literal(value)
    return re.sub(r"[\s/\\]+", "", text) or "_"


def column(values: list, grid: list) -> list:
    """Grid values as one parquet type: numbers as floats if mixed, anything else mixed as TOML text
    (``grid``: every value of that grid key, which decides the type)."""
    kinds = {type(v) for v in grid}
    if kinds == {int, float}:
        return [float(v) for v in values]
    if len(kinds) == 1 and kinds <= {int, float, str, bool}:
        return values
    return [literal(v) for v in values]
