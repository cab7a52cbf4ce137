"""Validated configuration: plain dataclasses read from TOML tables with errors a user can act on.

A config class is a frozen dataclass whose fields carry their constraints in ``metadata``:

    lr: float = field(default=0.05, metadata=dict(gt=0, help="learning rate eta"))

:func:`parse` turns a TOML table into an instance, and raises :class:`SpecError` naming the
dotted field, the value given and what is allowed (with the closest valid key for a typo).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registry entry: a name, the config class of its spec table, its builder and a one-line summary."""

    name: str
    options: type
    build: Callable[..., Any]
    summary: str


class SpecError(ValueError):
    """A problem with a run specification; the message names the field and the fix."""


class SpecWarning(UserWarning):
    """A spec value that was adjusted to fit the problem (the message names the field and the value used)."""


def suggest(name: str, options) -> str:
    """' (did you mean `x`?)' for the closest option, or a list of the valid ones."""
    options = sorted(options)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f" (did you mean `{close[0]}`?)"
    return f"; valid: {', '.join(options)}" if options else ""


def unknown_key_error(where: str, key: str, options) -> SpecError:
    """'unknown key `a.b` (did you mean `a.c`?)', with the suggestion as a full dotted key."""
    close = difflib.get_close_matches(key, sorted(options), n=1, cutoff=0.6)
    if close:
        return SpecError(f"unknown key `{_join(where, key)}` (did you mean `{_join(where, close[0])}`?)")
    return SpecError(f"unknown key `{_join(where, key)}`{suggest(key, options)}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation (int, float, bool, str, Literal, tuple, Optional)."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except SpecError as error:
                errors.append(str(error))
        raise SpecError(errors[0])
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            hint = suggest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
            raise SpecError(f"`{where}` = {value!r} is not allowed; choose one of {allowed}{hint}")
        return value
    if origin is tuple:
        (item,) = get_args(annotation)[:1]
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"`{where}` must be a list, got {_describe(value)}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise SpecError(f"`{where}` must be true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"`{where}` must be an integer, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"`{where}` must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise SpecError(f"`{where}` must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise SpecError(f"`{where}` must be a string, got {_describe(value)}")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return parse(annotation, value, where)
    return value


def plain_table(value: Any) -> Any:
    """``value`` with every NumPy or JAX scalar in it (np.float32 from a ``np.linspace`` sweep, np.int64 from
    ``np.arange``) replaced by the Python number it holds, recursively through tables and lists: a spec holds
    TOML's types, and a NumPy scalar would otherwise be refused as "not a number" or fail to be written."""
    if isinstance(value, dict):
        return {key: plain_table(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain_table(item) for item in value)
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):
        return value.item()
    return value


def _check_bounds(value: Any, meta: Mapping, where: str) -> None:
    if value is None:
        return
    checks = [
        ("gt", lambda v, b: v > b, "greater than"),
        ("ge", lambda v, b: v >= b, "at least"),
        ("lt", lambda v, b: v < b, "less than"),
        ("le", lambda v, b: v <= b, "at most"),
    ]
    for key, ok, words in checks:
        if key in meta and not ok(value, meta[key]):
            raise SpecError(f"`{where}` = {value!r} is out of range: it must be {words} {meta[key]}")


def parse(cls: type[T], table: Any, where: str = "") -> T:
    """Build the dataclass ``cls`` from a TOML table, validating every key and value."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise SpecError(f"`{where or 'spec'}` must be a table, got {_describe(table)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in table:
        if key not in fields:
            raise unknown_key_error(where, key, fields)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"`{_join(where, name)}` is required ({f.metadata.get('help', '')})")
            continue
        value = _coerce(table[name], hints[name], _join(where, name))
        _check_bounds(value, f.metadata, _join(where, name))
        values[name] = value
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        check(where)
    return instance


def to_table(instance: Any) -> dict:
    """The inverse of :func:`parse`: a TOML-ready dict (None values dropped, tuples as lists)."""
    table = {}
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = to_table(value)
        elif isinstance(value, tuple):
            value = list(value)
        table[f.name] = value
    return table


def describe_fields(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) for each field: what ``eosflow problems`` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows


def warn_unused(options: Any, where: str, unused: dict[str, str]) -> None:
    """A SpecWarning for each option of ``unused`` (field -> why it has no effect in this configuration) that is
    set away from its default: a value the run would otherwise ignore without a word."""
    defaults = {field.name: field.default for field in dataclasses.fields(options)}
    for name, why in unused.items():
        if getattr(options, name) != defaults[name]:
            warnings.warn(
                f"`{where}.{name}` = {getattr(options, name)!r} has no effect: {why}", SpecWarning, stacklevel=3
            )


def option(default: Any, help: str = "", **bounds) -> Any:
    """A dataclass field with a default, a help text and bounds (gt, ge, lt, le)."""
    return dataclasses.field(default=default, metadata=dict(help=help, **bounds))
