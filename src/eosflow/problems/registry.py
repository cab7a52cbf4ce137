"""Problems: built in memory from a user's model or loss, by name from the registry, or by import path.

    Problem.from_model(apply_fn, params, inputs, targets, loss="mse")   # loss(apply_fn(params, x), y)
    Problem.from_equinox(model, inputs, targets, loss="mse")            # loss(vmap(model)(x), y)
    Problem.from_function(loss_fn, w0)                                   # loss_fn(w0), w0 a pytree or vector

    [problem]
    name = "mlp"                              # a registered problem, its parameters validated
    name = "my_pkg.problems:make_problem"     # a factory, called with the table's other keys

Every spec's problem goes through :func:`build_problem`, so the CLI, ``--resume``, reports and
sweep workers find an import-path problem with no registration step (its module must be
importable there: installed, or on ``PYTHONPATH``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from eosflow.config import Entry, SpecError, describe_fields, parse, suggest, unknown_key_error
from eosflow.data import CLASSIFICATION, REGRESSION
from eosflow.objective import (
    LOSSES,
    Objective,
    OnDifferentiablePart,
    PyTree,
    Unravel,
    check_example_count,
    check_mean_over_examples,
    differentiable_loss,
    differentiable_part,
    ravel,
    training_batch_norms,
    training_dropouts,
)
from eosflow.precision import DTYPES, check_dtypes, floating_leaves, precision
from eosflow.tracing import equations

IN_MEMORY = "in_memory"  # problem.name recorded for a problem given to eosflow.simulate in memory


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
    w0: Array | np.ndarray
    test_objective: Objective | None = None
    accuracy: Callable[[Array, Any], Array] | None = None
    num_classes: int | None = None
    info: dict = dataclasses.field(default_factory=dict)
    source: dict | None = None  # the [problem] table that rebuilds it (set for import-path problems)

    @classmethod
    def from_model(
        cls,
        apply_fn: Callable[[PyTree, Array], Array],
        params: PyTree,
        inputs: Array,
        targets: Array,
        loss: str | Callable[[Array, Array], Array] = "mse",
        info: dict | None = None,
        wrt: Any = None,
    ) -> Problem:
        """L(w) = loss(apply_fn(params(w), inputs), targets) over the flattened ``params``.

        ``apply_fn(params, inputs)`` is the model (an Equinox module's ``__call__`` vmapped, a Flax
        ``apply``, ...); ``loss`` is ``"mse"`` (mean_i 1/2 |f - y|^2), ``"sse"``, ``"cross_entropy"``
        or a function ``loss(predictions, targets)`` averaging over examples. ``params`` is a
        pytree of arrays (for an Equinox model, :meth:`from_equinox` does the partition and the vmap).
        Every leaf of ``params`` and the floating inputs and targets must share the run's dtype.
        Checked here by tracing (nothing is computed), each failure a SpecError naming the call and
        shapes: every leaf is a floating array, inputs and targets have one row per example,
        ``apply_fn(params, inputs)`` runs, a built-in loss gets targets of the predictions' shape, and
        the loss is a scalar. For a Flax NNX or Equinox module w is what its own gradient differentiates, or
        the part ``wrt`` selects, the rest held fixed (:func:`eosflow.objective.differentiable_part`).
        """
        if isinstance(loss, str) and loss not in LOSSES:
            raise SpecError(f"unknown loss {loss!r}{suggest(loss, LOSSES)}")
        if not jax.tree_util.tree_leaves(params):
            raise SpecError("Problem.from_model: `params` has no array leaves")
        apply_fn, params = _measured_part(apply_fn, params, "Problem.from_model", wrt)
        _check_some_entries(params, "Problem.from_model", "params")
        objective, w0 = Objective.from_model(apply_fn, params, inputs, targets, loss)
        problem = cls(objective, w0, info=dict(info or {}))
        with precision(problem.default_dtype()):  # traced as a run will (JAX caches closed-over constants)
            _check_model(apply_fn, params, inputs, targets, loss)
        return problem

    @classmethod
    def from_equinox(
        cls,
        model: PyTree,
        inputs: Array,
        targets: Array,
        loss: str | Callable[[Array, Array], Array] = "mse",
        state: Any = None,
        axis_name: Any = None,
        info: dict | None = None,
    ) -> Problem:
        """L(w) = loss(vmap(model)(inputs), targets) over the model's floating arrays (an Equinox module
        called on one example, ``model(x)``, or ``model(x, state)`` with ``state`` from
        ``eqx.nn.make_with_state``, held fixed). BatchNorm in training mode normalizes each batch by its
        own statistics (the loss training descends), under ``axis_name`` (default: the name its layers
        use); dropout in training mode, and other layers whose forward updates their state (SpectralNorm in
        training mode), are refused by their path (docs/problems.md, "Your own model")."""
        from eosflow.problems.equinox_model import check_state_updates, split_model

        forward, params = split_model(model, state, axis_name)
        problem = cls.from_model(forward, params, inputs, targets, loss, info)
        with precision(problem.default_dtype()):  # traced as a run will
            check_state_updates(model, state, inputs, forward.axis_name)
        if forward.batch_statistics:
            problem.info["norm_layers"] = "batch statistics (training mode): " + ", ".join(forward.batch_statistics)
        return problem

    @classmethod
    def from_function(
        cls, loss_fn: Callable[[PyTree], Array], w0: PyTree, info: dict | None = None, wrt: Any = None
    ) -> Problem:
        """L(w) = loss_fn(w) from ``w0``: a flat vector, or any pytree of floating arrays (flattened
        here), or a module (its differentiable part, or the part ``wrt`` selects, as in :meth:`from_model`);
        ``loss_fn(w0)`` is traced here and must return a scalar."""
        if not jax.tree_util.tree_leaves(w0):
            raise SpecError("Problem.from_function: `w0` has no array leaves")
        loss_fn, w0 = _measured_part(loss_fn, w0, "Problem.from_function", wrt)
        _check_some_entries(w0, "Problem.from_function", "w0")
        flat, unravel = ravel(w0, where="w0")
        objective = Objective(loss_on=_PytreeLoss(loss_fn, unravel), data=None, unravel=unravel)
        problem = cls(objective, flat, info=dict(info or {}))
        with precision(problem.default_dtype()):
            _check_scalar("loss_fn(w0)", _traced("loss_fn(w0)", loss_fn, w0))
            loss_on = differentiable_loss(objective.loss_on, equations(objective.loss_on, flat, None), "loss_fn(w0)")
        problem.objective = eqx.tree_at(lambda o: o.loss_on, objective, loss_on)
        return problem

    def with_microbatch(self, size: int) -> Problem:
        """This problem with its full-batch losses (training and test) evaluated in chunks of ``size``
        examples (:attr:`Objective.microbatch`): the same loss, one chunk's activations in memory at a
        time. The chunks' losses are averaged, so the loss must be a mean over examples: checked at w0 on
        every chunk against the row-weighted mean of its two halves (a sum, BatchNorm's batch statistics, or
        a mean over the rows a mask keeps is refused by a SpecError)."""
        check_example_count(size, "`microbatch`")
        objective = self.objective
        if objective.data is None:
            raise SpecError(
                f"`microbatch` = {size}: this problem's loss has no examples (no data), so it has nothing to split"
            )
        if objective.num_examples >= 2:
            with precision(self.default_dtype()):
                w0 = jnp.asarray(self.w0)

                def loss_of(a: int, b: int) -> float:
                    return float(objective.loss_on(w0, jax.tree_util.tree_map(lambda leaf: leaf[a:b], objective.data)))

                check_mean_over_examples(loss_of, objective.num_examples, size, f"`microbatch` = {size} (at w0)")
        test = self.test_objective
        return dataclasses.replace(
            self,
            objective=objective.with_microbatch(size),
            test_objective=test if test is None or test.data is None else test.with_microbatch(size),
        )

    def fingerprint(self) -> str:
        """A digest (sha256, 16 hex digits) of w0 and the training and test data, their dtypes, shapes and bytes:
        what a run directory records of a problem built in memory, so that a resume on other data or from
        another start is refused (the loss's code is not in it)."""
        digest = hashlib.sha256()
        data = [self.objective.data, None if self.test_objective is None else self.test_objective.data]
        for leaf in [self.w0, *jax.tree.leaves(data)]:
            array = np.ascontiguousarray(np.asarray(leaf))
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        """The problem's shapes, never its values (w0 of a network has millions of entries): w0's size and dtype, the
        parameters' leaves (their count when long), the training and test data's arrays as ``f32[500,64]``, and the
        other fields that are set."""

        def short(tree: Any) -> str:
            return eqx.tree_pformat(tree, short_arrays=True, struct_as_array=True, width=10**9)

        unravel, test = self.objective.unravel, self.test_objective
        fields = [f"w0={short(self.w0)}"]
        if isinstance(unravel, Unravel):  # the user's pytree: its leaves, or their count when that is long
            params = short(_parameter_leaves(unravel))
            fields.append(f"params={params}" if len(params) <= 120 else f"params=<{len(unravel.shapes)} leaves>")
        fields.append(f"data={short(self.objective.data)}")
        if test is not None:
            fields.append(f"test_data={short(test.data)}")
        if self.objective.microbatch is not None:
            fields.append(f"microbatch={self.objective.microbatch}")
        if self.accuracy is not None:
            fields.append(f"accuracy={getattr(self.accuracy, '__name__', type(self.accuracy).__name__)}")
        fields += [f"{name}={getattr(self, name)!r}" for name in ("num_classes", "source") if getattr(self, name)]
        if self.info:
            fields.append(f"info={self.info!r}")
        return f"Problem({', '.join(fields)})"

    def default_dtype(self) -> str:
        """The dtype a run of this problem computes in unless told: float64 if every floating
        parameter leaf is float64, else float32."""
        names = getattr(self.objective.unravel, "dtypes", None) or (np.dtype(self.w0.dtype).name,)
        floating = [name for name in names if jnp.issubdtype(np.dtype(name), jnp.floating)]
        return "float64" if floating and all(name == "float64" for name in floating) else "float32"

    def check_finite(self) -> None:
        """w0 and every floating data leaf are finite (else a SpecError naming the leaf and the first
        bad entry): a NaN in the data or the start would otherwise stop a run as diverged at step 0. One compiled
        program counts them all (counted leaf by leaf, isfinite, ~ and sum compiled for each leaf's shape: 26
        small programs for a 3-layer MLP and its data, a second or more of a first run); the leaves are read one
        by one only to name a bad one."""
        data = [tree for _, tree in self._named_data()]
        if not int(_non_finite_count([leaf for _, leaf in _inexact_leaves([self.w0, *data])])):
            return
        unravel = self.objective.unravel
        start = ("params", unravel(jnp.asarray(self.w0))) if isinstance(unravel, Unravel) else ("w0", self.w0)
        for where, tree in [start, *self._named_data()]:
            for path, leaf in _inexact_leaves(tree):
                bad = int(jnp.sum(~jnp.isfinite(leaf)))
                if bad:
                    values = np.asarray(leaf)
                    index = np.argwhere(~np.isfinite(values))[0]
                    raise SpecError(
                        f"{where}{jax.tree_util.keystr(path)} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} "
                        f"({values[tuple(index)]} at {index.tolist()}): every process starts from w0 on this data"
                    )

    @functools.cached_property
    def initial_loss(self) -> float:
        """L(w0), evaluated once: checked when a spec is prepared, and the divergence limit's scale in a run."""
        return float(self.objective.value(jnp.asarray(self.w0)))

    def check_initial_loss(self, name: str) -> None:
        """L(w0) is finite (else a SpecError): values that overflow the dtype (an eigenvalue of 1e39 in float32,
        a start where exp overflows) would otherwise run, and stop as diverged at step 0, over an earlier run
        with --overwrite."""
        value = self.initial_loss
        if not np.isfinite(value):
            raise SpecError(
                f"the loss at w0 is {value} on problem {name!r} ({np.dtype(self.w0.dtype).name}): every process "
                "would diverge at its first step; look for a value of [problem] (a scale, an eigenvalue, the start, "
                "the data) beyond what the dtype holds"
            )

    def check_dtype(self, dtype: Any) -> None:
        """Every floating parameter leaf and data leaf has ``dtype`` (else a SpecError naming it; for a data leaf, also
        the parameters, whose dtype a run takes unless told, and how to make the two agree)."""
        unravel = self.objective.unravel
        params = ["w0"]
        if isinstance(unravel, Unravel):  # the user's pytree: name its leaves
            tree = _parameter_leaves(unravel)
            check_dtypes(tree, dtype, "params")
            params = [f"params{path}" for path, _ in floating_leaves(tree)]
        if str(self.info.get("backend", "")).startswith("torch"):  # eosflow.torch.problem: w0 is the model's
            model = f"w0 of the torch model {self.info.get('model', '')}"
            check_dtypes(
                self.w0,
                dtype,
                model,
                "cast the model (`model.to(torch.{dtype})`) and its batch before eosflow.torch.problem",
            )
        else:
            check_dtypes(self.w0, dtype, "w0")
        run = np.dtype(dtype).name
        for where, data in self._named_data():
            for path, name in floating_leaves(data):
                if name != run:
                    raise SpecError(self._data_dtype_error(f"{where}{path}", name, run, params))

    @staticmethod
    def _data_dtype_error(leaf: str, name: str, run: str, params: list[str]) -> str:
        """The message for a data ``leaf`` of dtype ``name`` in a run of dtype ``run``, whose floating parameters
        (``params``, their names) have passed: the run's dtype is likely theirs, so say so, and the two fixes."""
        shown = ", ".join(params[:3]) + (f" and {len(params) - 3} more" if len(params) > 3 else "")
        numpy = "; NumPy makes float64 arrays unless told" if run == "float64" else ""
        cast_params = f'`jax.tree.map(lambda a: a.astype("{name}"), params)` before building the Problem'
        if name not in DTYPES:  # (bfloat16, float16 data: no run computes in them)
            return f'{leaf} is {name} but this run computes in {run}: cast the data (`.astype("{run}")`)'
        return (
            f"{leaf} is {name} but this run computes in {run}, its spec's `dtype`, which eosflow.simulate sets from "
            "the parameters when not given (float64 when every floating parameter leaf is, else float32); every one "
            f"is {run} here ({shown}{numpy}). The parameters and the data must share it: for a {name} run cast the "
            f"parameters ({cast_params}; then no dtype need be given), or for a {run} run cast the data "
            f'(`.astype("{run}")`)'
        )

    def _named_data(self) -> list[tuple[str, PyTree]]:
        """The training and test data as (name, pytree): from_model's (inputs, targets) named apart."""
        named = []
        for where, objective in (("data", self.objective), ("test data", self.test_objective)):
            data = None if objective is None else objective.data
            if isinstance(data, tuple) and len(data) == 2:
                named += [(f"{where} inputs", data[0]), (f"{where} targets", data[1])]
            else:
                named.append((where, data))
        return named


def _check_model(apply_fn: Callable, params: PyTree, inputs: Any, targets: Any, loss: str | Callable) -> None:
    """The model fits its data and loss, checked by tracing (nothing is computed): inputs and targets
    share their leading (example) axis, apply_fn(params, inputs) runs, a built-in loss gets targets of
    the predictions' shape (integer labels: without the class axis, for cross_entropy) and the loss
    is a scalar. Each failure is a SpecError naming the call and the shapes."""
    for name, tree in (("inputs", inputs), ("targets", targets)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not hasattr(leaf, "shape"):  # a list of numbers is a pytree of floats, with no example axis
                raise SpecError(
                    f"Problem.from_model: {name}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array "
                    f"(pass {name} as arrays, e.g. jnp.asarray({name}))"
                )
            if leaf.shape and leaf.shape[0] == 0:
                raise SpecError(f"Problem.from_model: {name}{jax.tree_util.keystr(path)} has 0 examples {leaf.shape}")
    counts = {
        name: {leaf.shape[0] if leaf.shape else None for leaf in jax.tree_util.tree_leaves(tree)}
        for name, tree in (("inputs", inputs), ("targets", targets))
    }
    if len(counts["inputs"] | counts["targets"]) > 1:
        raise SpecError(
            f"Problem.from_model: targets have {_examples(counts['targets'])} examples (leading axis) but "
            f"inputs have {_examples(counts['inputs'])}: every input and target leaf needs one row per example"
        )
    shapes = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), inputs)
    one_example = (
        f" (apply_fn gets the whole batch of inputs, {shapes}, examples along the leading axis: a model written "
        "for one example needs mapping over them, `lambda params, x: jax.vmap(lambda xi: model(params, xi))(x)`; "
        "an Equinox module: Problem.from_equinox maps it)"
    )
    predictions = _traced("apply_fn(params, inputs)", apply_fn, params, inputs, hint=one_example)
    if isinstance(loss, str) and not isinstance(predictions, jax.ShapeDtypeStruct):
        kind = type(predictions).__name__
        size = f" of {len(predictions)}" if isinstance(predictions, tuple | list | dict) else ""
        raise SpecError(
            f"Problem.from_model: apply_fn(params, inputs) returns a {kind}{size}, not an array of predictions, "
            f"which the built-in {loss} loss needs: return the predictions alone (e.g. `lambda p, x: apply_fn(p, "
            "x)[0]` for a model that also returns an auxiliary output), or pass a loss of your own that takes them"
        )
    if isinstance(loss, str) and hasattr(targets, "shape"):
        shape, wanted = tuple(targets.shape), tuple(predictions.shape)
        if loss == "cross_entropy":
            if shape != wanted and not (jnp.issubdtype(targets.dtype, jnp.integer) and shape == wanted[:-1]):
                raise SpecError(
                    f"Problem.from_model: targets have shape {shape} ({jnp.dtype(targets.dtype).name}) but "
                    f"apply_fn(params, inputs) returns logits of shape {wanted}: cross_entropy takes one-hot rows "
                    f"of shape {wanted} or integer labels of shape {wanted[:-1]}"
                )
            if shape != wanted:  # integer labels: a class index each
                _check_labels(targets, wanted[-1])
        elif shape != wanted:
            raise SpecError(
                f"Problem.from_model: targets have shape {shape} but apply_fn(params, inputs) returns shape "
                f"{wanted}: the {loss} loss compares them entry by entry, so their shapes must be equal "
                "(reshape the targets, e.g. `targets[:, None]`, or the model's output)"
            )
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    _check_scalar("loss(predictions, targets)", _traced("loss(predictions, targets)", loss_fn, predictions, targets))


def _check_labels(labels: Any, classes: int) -> None:
    """Integer labels index the ``classes`` logits: out of 0..classes-1 a label is a SpecError naming the first one
    (JAX's indexing would read -1 as the last class and give NaN for one >= classes, silently)."""
    if isinstance(labels, jax.core.Tracer):  # inside a trace there are no values to check
        return
    values = np.asarray(labels)
    outside = np.flatnonzero((values < 0) | (values >= classes))
    if outside.size:
        where = np.unravel_index(outside[0], values.shape)
        raise SpecError(
            f"Problem.from_model: targets hold integer labels from {values.min()} to {values.max()}, but the logits "
            f"have {classes} classes: cross_entropy takes labels 0..{classes - 1} ({outside.size} outside, the "
            f"first targets[{', '.join(map(str, where))}] = {values[where]})"
        )


def _examples(counts: set) -> str:
    return " or ".join(str(count) for count in sorted(counts, key=str))


def _traced(call: str, fn: Callable, *args: Any, hint: str = "") -> Any:
    """``jax.eval_shape(fn, *args)``: the shapes of ``fn``'s result, or a SpecError naming ``call`` (and ``hint``)."""
    try:
        with warnings.catch_warnings():  # a leaf of another dtype is named when a run checks its dtype
            warnings.filterwarnings("ignore", message="Explicitly requested dtype", category=UserWarning)
            return jax.eval_shape(fn, *args)
    except Exception as error:  # the user's function: say which call failed, keep the cause chained
        raise SpecError(f"{call} failed on the given arrays: {type(error).__name__}: {error}{hint}") from error


def _check_scalar(call: str, result: Any) -> None:
    """A loss is one number, the mean over examples."""
    if not isinstance(result, jax.ShapeDtypeStruct):
        raise SpecError(f"{call} returns a {type(result).__name__}, not a scalar: return the loss alone")
    if result.shape != ():
        raise SpecError(
            f"{call} returns shape {tuple(result.shape)}, not a scalar: the loss must reduce over examples "
            "and outputs (e.g. jnp.mean)"
        )


def _measured_part(fn: Callable, params: PyTree, where: str, wrt: Any = None) -> tuple[Callable, PyTree]:
    """``fn`` and ``params`` as they are, or, for a Flax NNX or Equinox module, what its own gradient
    differentiates (:func:`differentiable_part`) and ``fn`` on that part, the rest held fixed; warns of an NNX
    Dropout in training mode (one fixed mask); a batch of one example for NNX BatchNorm in training mode is
    refused where ``fn`` is called on one. ``wrt``: the part measured (:func:`differentiable_part`)."""
    part, rebuild = differentiable_part(params, wrt)
    if part is params:
        return fn, params
    dropouts = training_dropouts(params)
    if dropouts:
        warnings.warn(
            f"{where}: {', '.join(dropouts)} {'is an nnx.Dropout' if len(dropouts) == 1 else 'are nnx.Dropouts'} "
            "in training mode, and eosflow holds the module's RNG state fixed: every evaluation draws the same "
            "mask, a fixed thinned network rather than dropout's random loss. Pass `model.eval()` (or "
            "deterministic=True) for the whole network",
            stacklevel=3,
        )
    return OnDifferentiablePart(fn, rebuild, tuple(training_batch_norms(params))), part


def _check_some_entries(params: PyTree, where: str, name: str) -> None:
    """At least one parameter entry, else a SpecError naming the leaves: a zero-size leaf carries no direction
    and is kept (flattened to nothing), but with every leaf empty there is no w to measure."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if sum(int(np.size(leaf)) for _, leaf in leaves) == 0:
        shapes = ", ".join(f"{name}{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))}" for path, leaf in leaves)
        raise SpecError(
            f"{where}: every leaf of `{name}` has size zero ({shapes or 'no floating array leaves'}): "
            "there are no parameters to measure"
        )


class _PytreeLoss(eqx.Module):
    """loss_fn(unravel(w)), ignoring the (absent) batch; hashable by value like the objective's losses."""

    loss_fn: Callable = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)

    def __call__(self, w: Array, batch: PyTree) -> Array:
        return self.loss_fn(self.unravel(w))


def _parameter_leaves(unravel: Unravel) -> PyTree:
    """The user's parameter pytree that ``unravel`` rebuilds, each leaf its shape and dtype (a ShapeDtypeStruct)."""
    leaves = [jax.ShapeDtypeStruct(shape, np.dtype(name)) for shape, name in zip(unravel.shapes, unravel.dtypes)]
    return jax.tree_util.tree_unflatten(unravel.treedef, leaves)


def _inexact_leaves(tree: Any) -> list[tuple[Any, Any]]:
    """(path, leaf) of the floating and complex leaves of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(path, leaf) for path, leaf in leaves if jnp.issubdtype(getattr(leaf, "dtype", np.int32), jnp.inexact)]


@jax.jit
def _non_finite_count(leaves: list) -> Array:
    """sum over ``leaves`` of their non-finite entries, () int32."""
    return sum((jnp.sum(~jnp.isfinite(leaf)) for leaf in leaves), jnp.asarray(0, jnp.int32))


class ProblemEntry(Entry):
    """A registered problem: ``build(options, seed, dtype) -> Problem``, ``options`` its ``[problem]`` fields."""


PROBLEMS: dict[str, ProblemEntry] = {}


def register_problem(name: str, params: type, summary: str):
    """Decorator: ``build(params, seed, dtype) -> Problem`` becomes available as ``name``."""

    def decorate(build):
        PROBLEMS[name] = ProblemEntry(name, params, build, summary)
        return build

    return decorate


def build_problem(table: dict, seed: int, dtype: str) -> tuple[Problem, Any]:
    """Validate the ``[problem]`` table and build the problem; returns (problem, params).

    ``params`` is the registered problem's parameters dataclass, or for an import path the dict
    of the table's other keys (what the factory was called with).
    """
    name, params = problem_params(table)
    if isinstance(params, dict):
        problem = _call_factory(name, params, seed, dtype)
    else:
        problem = PROBLEMS[name].build(params, seed, jnp.dtype(dtype))
    return problem, params


def problem_params(table: dict) -> tuple[str, Any]:
    """(name, params) of a ``[problem]`` table, validated without building the problem.

    A name with a colon is an import path ``"module:attribute"``: the module is imported and the
    factory's signature checked against the table's other keys.
    """
    table = dict(table or {})
    name = table.pop("name", None)
    if name is None:
        raise SpecError(
            f"`problem.name` is required; choose one of {', '.join(sorted(PROBLEMS))} "
            'or name a factory by import path, "my_pkg.problems:make_problem"'
        )
    if name == IN_MEMORY:
        raise SpecError(
            f"`problem.name` = {IN_MEMORY!r} is a problem that was given to eosflow.simulate in memory; a spec cannot "
            "rebuild it: resume with eosflow.simulate(problem, ..., out=run_dir, resume=True), or name a factory "
            'that builds it by import path, "my_pkg.problems:make_problem"'
        )
    if isinstance(name, str) and ":" in name:
        factory = import_factory(name)
        _bind(name, factory, table, seed=0, dtype="float32")
        return name, table
    if name not in PROBLEMS:
        raise SpecError(
            f"unknown problem `problem.name` = {name!r}{suggest(str(name), PROBLEMS)} "
            '(a problem of your own is named by import path, "my_pkg.problems:make_problem")'
        )
    return name, parse(PROBLEMS[name].options, table, "problem")


def import_factory(path: str) -> Callable[..., Problem]:
    """The callable named by ``"package.module:attribute"`` (the attribute may be dotted)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise SpecError(f'`problem.name` = {path!r}: an import path is "package.module:factory"')
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SpecError(
            f"`problem.name` = {path!r}: cannot import module {module_name!r} ({error}); it must be importable "
            "where the run happens (installed, or its directory on PYTHONPATH; on every Dask worker for a sweep)"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SpecError(f"`problem.name` = {path!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"`problem.name` = {path!r} is a {type(target).__name__}, not a callable returning a Problem")
    return target


def _bind(path: str, factory: Callable, keys: dict, seed: int, dtype: str) -> inspect.BoundArguments | None:
    """The factory's arguments: the table's keys, plus ``seed`` and ``dtype`` if it takes them
    (and the table does not set them)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: call it as it is
        return None
    accepted = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    extra = {
        key: value
        for key, value in (("seed", seed), ("dtype", dtype))
        if key not in keys and (key in accepted or takes_any)
    }
    try:
        return signature.bind(**keys, **extra)
    except TypeError as error:
        unknown = [key for key in keys if key not in accepted and not takes_any]
        hint = f"; {unknown_key_error('problem', unknown[0], set(accepted) - set(keys))}" if unknown else ""
        raise SpecError(f"`problem` table {keys} does not fit {path}{signature}: {error}{hint}") from None


def _call_factory(path: str, keys: dict, seed: int, dtype: str) -> Problem:
    factory = import_factory(path)
    bound = _bind(path, factory, keys, seed, dtype)
    problem = factory(*bound.args, **bound.kwargs) if bound is not None else factory(**keys)
    if not isinstance(problem, Problem):
        raise SpecError(
            f"`problem.name` = {path!r} returned a {type(problem).__name__}, not an eosflow.Problem "
            "(build one with Problem.from_model or Problem.from_function)"
        )
    return dataclasses.replace(problem, source={"name": path, **keys})


def describe_problems() -> str:
    """Every problem with its parameters, defaults and help, then the datasets (``eosflow problems``)."""
    lines = []
    for name, entry in sorted(PROBLEMS.items()):
        lines.append(f"{name}: {entry.summary}")
        rows = describe_fields(entry.options)
        width = max((len(f"{field} = {default}") for field, default, _ in rows), default=0)
        lines += [f"    {f'{field} = {default}':<{width}}  {text}" for field, default, text in rows]
        lines.append("")
    for task, registry in (("classification", CLASSIFICATION), ("regression", REGRESSION)):
        lines.append(f"{task} datasets (problem.dataset):")
        width = max(len(name) for name in registry)
        lines += [f"    {name:<{width}}  {entry.summary}" for name, entry in sorted(registry.items())]
    return "\n".join(lines)
