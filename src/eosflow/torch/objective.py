"""The loss of a ``torch.nn.Module`` over one flat parameter vector, with its derivatives.

    L(w)        = loss_fn(model_w(inputs), targets)      (torch.func.functional_call; model_w(**inputs) for a dict)
    g(w)        = grad L(w)                               (torch.func.grad)
    H(w) v      = grad_w <g(w), v>                          (reverse-over-reverse)
    D^3 L[u, v] = grad_w <H(w) v, u>                        (one more reverse pass; a vector)

Every derivative is one composable ``torch.func`` transform of the module's functional form, so
the module is never mutated and nothing is accumulated in ``.grad``. Batched forms (``hvp_batch``)
vectorize over columns with ``torch.func.vmap``.

The loss is the one the model's current train/eval modes define, with its current buffers and
frozen parameters (read at every call). Norm layers with running statistics (BatchNorm, SyncBatchNorm,
InstanceNorm with ``track_running_stats``) in train mode normalize by the batch's statistics, so L
is a pure function of w and the batch, the loss full-batch GD descends; they are evaluated on a
private copy of the module whose train-mode norm layers track no running statistics (the model's
running statistics are neither used nor updated). Dropout in train mode makes L random and is refused.

Examples are the slices of the batch's tensors along their example axes: by default the rows (a
shared leading axis), or the axes ``example_axis`` names (one int for every tensor, or a pytree of
ints matching the batch, e.g. ``(1, 0)`` for a sequence-first input (T, N, F) beside targets (N,)).
``examples(indices)`` is the minibatch of those slices, x[..., indices, ...] with the example axis
kept in place, on which every method can evaluate L and its derivatives; the full batch is
``self.batch`` itself, never gathered.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, grad_and_value, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from eosflow.objective import check_mean_over_examples, one_example_batch_statistics
from eosflow.precision import HALF_PRECISION, warn_half_precision_ops

Batch = tuple[Any, Any]
ExampleAxis = int | tuple | list | dict | None  # an int, or a pytree of ints (a prefix of the batch's structure)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch floating dtype (torch.float32 -> float32)."""
    return np.dtype(str(dtype).removeprefix("torch."))


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``DataParallel`` / ``DistributedDataParallel`` wrapper runs, whose parameters are the
    wrapper's: torch's stateless calls refuse DataParallel, and DDP's forward runs collectives (its buffer
    broadcast) that would wait for the other ranks while one process measures."""
    while isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters eosflow differentiates and steps, by name, in the order of its flat vector w: those
    that require grad (frozen ones stay fixed)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train_modes(model: torch.nn.Module) -> tuple[bool, ...]:
    """Every submodule's ``training`` flag: what decides which loss the model computes."""
    return tuple(module.training for module in model.modules())


def running_stats_layers(model: torch.nn.Module) -> dict[str, bool]:
    """{qualified name: in train mode} of the norm layers that keep running statistics."""
    return {
        name: module.training
        for name, module in model.named_modules()
        if isinstance(module, _NormBase) and module.track_running_stats
    }


def weight_norm_layers(model: torch.nn.Module) -> list[str]:
    """The modules whose weight is normalized by ``torch._weight_norm``: the ``parametrizations.weight_norm``
    parametrization, or the older ``nn.utils.weight_norm`` hook."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for name, module in model.named_modules():
        hooks = any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values())
        parametrizations = getattr(module, "parametrizations", {})
        listed = any(isinstance(f, _WeightNorm) for fs in parametrizations.values() for f in fs)
        if hooks or listed:
            found.append(name or type(module).__name__)
    return found


@functools.cache
def weight_norm_second_derivative_error() -> float:
    """The relative error of torch's second derivative of ``torch._weight_norm`` (double backward), against
    central differences of its first, on a fixed 3 x 2 float64 example: ~1e-9 if torch's is right (torch 2.13's
    is not: gradgradcheck fails)."""
    v = torch.tensor([[0.3, -1.2], [0.8, 0.5], [-0.4, 0.9]], dtype=torch.float64)
    g = torch.tensor([[1.3], [0.7], [-0.6]], dtype=torch.float64)
    c = torch.tensor([[0.5, -0.2], [1.1, 0.4], [-0.7, 0.8]], dtype=torch.float64)
    u = torch.tensor([[0.2, 0.9], [-0.6, 0.1], [0.4, -0.3]], dtype=torch.float64)

    def gradient(v: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        v = v if v.requires_grad else v.clone().requires_grad_(True)
        value = (torch._weight_norm(v, g, 0) ** 2 * c).sum()
        return torch.autograd.grad(value, v, create_graph=create_graph)[0]

    leaf = v.clone().requires_grad_(True)
    product = torch.autograd.grad((gradient(leaf, create_graph=True) * u).sum(), leaf)[0]
    h = 1e-5
    differences = (gradient(v + h * u) - gradient(v - h * u)) / (2 * h)
    return float((product - differences).norm() / differences.norm())


def restore_buffers(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """Put back every buffer of ``model`` that differs from its ``saved`` copy (bitwise, NaNs equal);
    returns their names."""
    changed = []
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            old = saved.get(name)
            if old is not None and not torch.equal(torch.nan_to_num(buffer), torch.nan_to_num(old)):
                buffer.copy_(old)
                changed.append(name)
    return changed


def batch_statistics_copy(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """A copy of ``model`` whose norm layers ``names`` track no running statistics (so they
    normalize by the batch's, and update nothing), and that holds no values: its parameters and
    buffers are placeholders on the meta device, every one supplied by ``functional_call``.

    (Unlike ``torch.func.replace_all_batch_norm_modules_``, layers in eval mode keep their running
    statistics, InstanceNorm is included, and ``model`` is untouched.)
    """
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        placeholder = torch.empty_like(tensor, device="meta")
        is_param = isinstance(tensor, torch.nn.Parameter)
        memo[id(tensor)] = torch.nn.Parameter(placeholder, tensor.requires_grad) if is_param else placeholder
    try:
        private = copy.deepcopy(model, memo)
    except Exception as error:
        raise ValueError(
            "eosflow evaluates norm layers in train mode (batch statistics) on a private copy of the model, "
            f"and copy.deepcopy(model) failed: {error}. Call model.eval() to use their running statistics"
        ) from error
    for name in names:
        layer = private.get_submodule(name)
        assert isinstance(layer, _NormBase)
        layer.running_mean = layer.running_var = layer.num_batches_tracked = None
        layer.track_running_stats = False
    return private


def call_slots(module: torch.nn.Module) -> dict[str, str]:
    """{path given to ``functional_call``: the name of the tensor held there (in ``named_parameters`` /
    ``named_buffers``)}, one path per slot (submodule, attribute) that holds a parameter or a buffer.

    torch's ``functional_call`` swaps tensors in path by path and back out in the same order. A submodule
    registered at two paths (``self.b = self.a``; ``ModuleList([block] * n)``) has one slot, which two
    paths would swap twice, leaving the call's tensors in the model (torch 2.13, with ``tie_weights``
    either way); a parameter shared by two submodules (``dec.weight = enc.weight``) has two slots, and
    both must be given the tensor. So every slot is named exactly once (call with ``tie_weights=False``)."""
    held = {id(tensor): name for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers())}
    seen: set[tuple[int, str]] = set()
    slots = {}
    for path, submodule in module.named_modules(remove_duplicate=False):
        for attribute, tensor in itertools.chain(submodule._parameters.items(), submodule._buffers.items()):
            if tensor is not None and (id(submodule), attribute) not in seen:
                seen.add((id(submodule), attribute))
                slots[f"{path}.{attribute}" if path else attribute] = held[id(tensor)]
    return slots


def _tensor_name(path: tuple) -> str:
    """A batch leaf by its position: ``batch[0] (inputs)``, ``batch[0][1] (inputs)``, ``batch[1] (targets)``."""
    first = getattr(path[0], "idx", None) if path else None
    role = " (inputs)" if first == 0 else " (targets)" if first == 1 else ""
    return f"batch{pytree.keystr(path)}{role}"


def check_not_meta(device: torch.device, what: str) -> None:
    """A ValueError for tensors on the meta device: shapes without values, nothing to measure."""
    if device.type == "meta":
        raise ValueError(
            f"{what} are on the meta device (shapes without values): materialize and load the weights first, "
            "e.g. model.to_empty(device='cpu') then model.load_state_dict(...)"
        )


def check_pair(batch: Any, where: str) -> None:
    """A ValueError unless ``batch`` is one pair (inputs, targets), a tuple or list of two, naming what it is."""
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return
    if torch.is_tensor(batch):
        what = f"a tensor of shape {tuple(batch.shape)}"
    elif isinstance(batch, tuple | list):
        what = f"a {type(batch).__name__} of {len(batch)}"
    else:
        what = f"a {type(batch).__name__}"
    raise ValueError(
        f"{where} must be one pair (inputs, targets), e.g. (x, y), got {what}; the inputs may themselves be a tuple "
        "(one argument of the model) or a dict of its keyword arguments, ({'x': x, 'mask': mask}, y)"
    )


def example_axes(batch: Batch, example_axis: ExampleAxis) -> tuple[list[int | None], int | None]:
    """The example axis of every leaf of ``batch`` (None for leaves that are not tensors) and N, the
    number of examples (None: the batch has none, every axis is None).

    ``example_axis`` None: the leading axis, if every tensor has one and they share its size (else
    no examples). An int (for every tensor) or a pytree of ints that is a prefix of the batch's
    structure (``(1, 0)`` for ``(inputs, targets)``): those axes (negative ones count from the end),
    whose sizes must agree; a ValueError names an axis out of range, a size that differs (by the
    tensor's position in the batch) or a structure that does not match.
    """
    paths_leaves, spec = pytree.tree_flatten_with_path(batch)
    tensors = [(path, leaf) for path, leaf in paths_leaves if torch.is_tensor(leaf)]
    if example_axis is None:
        sizes = {leaf.shape[0] if leaf.dim() else None for _, leaf in tensors}
        n = sizes.pop() if len(sizes) == 1 else None
        return [0 if n is not None and torch.is_tensor(leaf) else None for _, leaf in paths_leaves], n
    given = pytree._broadcast_to_and_flatten(example_axis, spec)
    if given is None:
        shapes = pytree.tree_map(lambda leaf: tuple(leaf.shape) if torch.is_tensor(leaf) else leaf, batch)
        raise ValueError(
            f"example_axis {example_axis!r} does not match the structure of the batch (shapes {shapes}): give one "
            "int for every tensor, or a pytree of ints with the batch's structure (a tuple (inputs axis, targets "
            "axis) for a batch (inputs, targets))"
        )
    axes: list[int | None] = []
    found: list[tuple[str, int, int]] = []  # (tensor, its size along its axis, the axis)
    for (path, leaf), axis in zip(paths_leaves, given):
        if not torch.is_tensor(leaf):
            axes.append(None)
            continue
        name = _tensor_name(path)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"example_axis for {name} must be an int, got {axis!r}")
        if not -leaf.dim() <= axis < leaf.dim():
            raise ValueError(
                f"example_axis {axis} is out of range for {name} of shape {tuple(leaf.shape)} ({leaf.dim()} dims)"
            )
        axis %= leaf.dim()
        axes.append(axis)
        found.append((name, leaf.shape[axis], axis))
    if not found:
        raise ValueError("example_axis is given but the batch holds no tensors to take examples from")
    if len({size for _, size, _ in found}) > 1:
        listed = ", ".join(f"{name} has {size} along axis {axis}" for name, size, axis in found)
        raise ValueError(f"the batch's example axes disagree on the number of examples: {listed}")
    return axes, found[0][1]


def leading_size(batch: Batch) -> int:
    """N, the leading size every tensor of the batch shares (a ValueError naming the sizes otherwise)."""
    sizes = {leaf.shape[0] for leaf in pytree.tree_leaves(batch) if torch.is_tensor(leaf) and leaf.dim()}
    if len(sizes) != 1:
        raise ValueError(
            f"microbatch splits the batch's rows, but its tensors have leading sizes {sorted(sizes)}: give a "
            "batch whose tensors share their leading (example) axis, or no microbatch"
        )
    return sizes.pop()


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows start..stop-1 of every tensor of the batch."""
    return pytree.tree_map(lambda t: t[start:stop] if torch.is_tensor(t) else t, batch)


def row_chunks(batch: Batch, size: int) -> list[tuple[float, Batch]]:
    """[(n_c / N, rows of chunk c)] over consecutive chunks of ``size`` rows of the batch."""
    n = leading_size(batch)
    return [(min(size, n - start) / n, rows(batch, start, start + size)) for start in range(0, n, size)]


def chunked_products(
    multiply: Callable[[torch.Tensor, torch.Tensor, Batch], torch.Tensor],
    w: torch.Tensor,
    vectors: torch.Tensor,
    batch: Batch,
    microbatch: int | None,
) -> torch.Tensor:
    """sum_c (n_c / N) multiply(w, V, chunk_c) over consecutive chunks of ``microbatch`` rows of the batch (the
    batch itself for None): a product of a mean-over-examples loss, one chunk's activations at a time."""
    chunks = [(1.0, batch)] if microbatch is None else row_chunks(batch, microbatch)
    image = torch.zeros_like(vectors)
    for weight, chunk in chunks:
        image += weight * multiply(w, vectors, chunk)
    return image


def _fallback_warning(objective: TorchObjective, what: str) -> str:
    """What eosflow does when torch.func.vmap cannot batch the model (``objective.vmap_error``): the
    model's class, what it loops over, vmap's first line, and the known remedy if there is one."""
    error = (objective.vmap_error or "").strip()
    first = error.splitlines()[0] if error else "(no message)"
    model = objective.model
    if "data-dependent control flow" in error:
        remedy = (
            "the forward branches on a tensor's value (`if`, `.item()`), which vmap cannot batch: write the "
            "branch with torch.where, which it batches"
        )
    elif objective.dtype == torch.float64 and any(isinstance(m, torch.nn.LSTM) for m in model.modules()):
        remedy = (
            "vmap cannot batch nn.LSTM in float64; in float32 (model.float() and a float32 batch) torch runs "
            "its oneDNN LSTM kernel, which vmap batches"
        )
    elif "does not have vmap support" in error:
        remedy = (
            "give the torch.autograd.Function a vmap rule (`generate_vmap_rule = True` on the class, or its own "
            "`vmap` staticmethod)"
        )
    else:
        remedy = "no known remedy: see docs/torch.md"
    return (
        f"torch.func.vmap cannot batch {type(model).__name__} ({first}); eosflow evaluates the {what} "
        f"in a Python loop, one torch call per lane: the same numbers, often 10-100x slower. "
        f"To avoid it: {remedy}. (Said once per objective; the error is kept in objective.vmap_error.)"
    )


def _own_precision(method: Callable) -> Callable:
    """``method`` with the caller's ``torch.autocast`` off (a training loop's, around a tracker update) and
    float32 products in float32, so that every evaluation computes in the model's own precision wherever
    it is called; autocast inside the model's forward still applies. ``torch.set_float32_matmul_precision
    ("high")``, common in training scripts, lets matmuls use TF32 on NVIDIA GPUs (and bfloat16 on CPUs
    with AMX), and cuDNN's convolutions use TF32 by default: both are process-wide settings, so they are
    set to full precision for the call and restored after (:func:`_float32_products`)."""

    @functools.wraps(method)
    def evaluate(self, *args, **kwargs):
        with _in_own_precision(self.device):
            return method(self, *args, **kwargs)

    return evaluate


@contextlib.contextmanager
def _in_own_precision(device: torch.device) -> Iterator[None]:
    """The block with autocast off on ``device``, float32 products in float32 (:func:`_own_precision`) and
    autograd on: a caller's ``torch.no_grad()`` or ``torch.inference_mode()`` (an evaluation loop) would
    otherwise leave the graphs of :class:`LinearizedHessian` and :class:`LinearizedGaussNewton` unbuilt."""
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(device.type, enabled=False),
        _float32_products(),
    ):
        yield


@contextlib.contextmanager
def _float32_products() -> Iterator[None]:
    """torch's float32 matmul precision "highest" and cuDNN without TF32 inside the block, the caller's
    settings restored on exit (they are process-wide: another thread's products meanwhile get them too)."""
    matmul, convolution = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = convolution


class _HalfPrecisionOps(TorchFunctionMode):
    """Records the torch functions whose results are bfloat16 or float16 ({dtype: names}): compute under
    ``torch.autocast`` or ``.half()`` inside a forward whose parameters are float32."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, dict[str, None]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, tuple | list) else (result,):
            dtype = str(getattr(tensor, "dtype", "")).removeprefix("torch.")
            if isinstance(tensor, torch.Tensor) and dtype in HALF_PRECISION:
                self.found.setdefault(dtype, {})[getattr(func, "__name__", str(func))] = None
        return result


class TorchObjective:
    """L(w) = loss_fn(model(inputs; w), targets) for the flat vector w of ``model``'s parameters.

    Attributes:
        model: the module (its trainable parameters give the layout of w and w0; those with
            ``requires_grad=False`` keep their values; it is not modified). A ``DataParallel`` or
            ``DistributedDataParallel`` wrapper is measured as the module it wraps (:func:`unwrapped`).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (e.g. ``torch.nn.functional.mse_loss``).
        batch: ``(inputs, targets)``, the data the loss is evaluated on (full batch); the slices of
            its tensors along their example axes are the examples minibatches are drawn from.
        example_axis: None (the rows: a leading axis the tensors share, else no examples), an int
            for every tensor, or a pytree of ints matching the batch (``(1, 0)``: inputs (T, N, F),
            targets (N,)); see :func:`example_axes`.
        names, shapes: the parameters' names and shapes, in the order they occupy w.

    The model's train/eval modes are read at every call (the evaluated module is rebuilt when they
    change): BatchNorm in train mode gives batch statistics, in eval mode its running statistics,
    a fixed affine map. Dropout in train mode raises a ValueError naming the modules.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        batch: Batch,
        example_axis: ExampleAxis = None,
    ):
        check_pair(batch, "the batch")
        model = unwrapped(model)
        self.model = model
        self.loss_fn = loss_fn
        self.batch = batch
        self.example_axis = example_axis
        self.axes, self._num_examples = example_axes(batch, example_axis)  # per leaf of the batch
        self.vmap_error: str | None = None  # torch.func.vmap's error if it cannot batch the model (map_lanes loops)
        params = trainable(model)
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad): nothing to differentiate")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            kinds = ", ".join(f"{name}: {p.dtype}" for name, p in params.items())
            raise ValueError(f"the model's parameters mix dtypes ({kinds}); cast the model with .float() or .double()")
        if any(dtype.is_complex for dtype in dtypes):
            raise ValueError(
                f"the model's parameters are {next(iter(dtypes))}: eosflow measures the Hessian of a real loss of "
                "real weights, and a complex parameter's curvature is not one symmetric matrix over them; hold "
                "each complex weight as a real parameter of twice the size (torch.view_as_complex of a (..., 2) "
                "float tensor in the forward)"
            )
        if dtypes - {torch.float32, torch.float64}:
            (dtype,) = dtypes
            raise ValueError(
                f"the model's parameters are {dtype}: eosflow measures curvature in torch.float32 or torch.float64 "
                f"(its eigensolver's relative-residual contract needs more precision than {dtype} has); measure a "
                "float32 copy, e.g. `copy.deepcopy(model).float()` with the batch cast by `.float()`"
            )
        self.names = tuple(params)
        self.shapes = tuple(tuple(p.shape) for p in params.values())
        self.sizes = tuple(math.prod(shape) for shape in self.shapes)
        self.dtype = next(iter(dtypes))
        self.device = next(iter(params.values())).device
        check_not_meta(self.device, "the model's parameters")
        for name, leaf in zip(("inputs", "targets"), batch):
            if torch.is_tensor(leaf) and leaf.is_floating_point() and leaf.dtype != self.dtype:
                raise ValueError(
                    f"batch {name} are {leaf.dtype} but the model's parameters are {self.dtype}; "
                    f"cast them with .to({self.dtype})"
                )
        self._modes: tuple[bool, ...] | None = None  # the modes the evaluated module was built for
        self._module: torch.nn.Module = model
        self._fixed: tuple[str, ...] = ()  # tensors read from the model at each call (a private copy's)
        self._slots: dict[str, str] = {}  # the evaluated module's call_slots, set with it

    def _evaluated(self) -> tuple[torch.nn.Module, tuple[str, ...]]:
        """The module the loss calls, for the model's current modes, and the names of the tensors
        (frozen parameters, buffers) it takes from the model at each call."""
        modes = train_modes(self.model)
        if modes == self._modes:
            return self._module, self._fixed
        dropout = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, _DropoutNd) and module.training and module.p > 0
        ]
        if dropout:
            raise ValueError(
                f"the model has dropout in train mode ({', '.join(dropout)}): its loss is random, a different "
                "function at every evaluation, so its Hessian-vector products and eigenvalues are of no one "
                "function. Call model.eval() (dropout off; BatchNorm then uses its running statistics) to "
                "measure the deterministic loss, or .eval() on the dropout modules only (BatchNorm keeps the "
                "batch's statistics); see docs/torch.md"
            )
        batch_statistics = [name for name, training in running_stats_layers(self.model).items() if training]
        if batch_statistics:
            private = batch_statistics_copy(self.model, batch_statistics)
            fixed = [name for name, _ in private.named_parameters() if name not in self.names]
            self._module, self._fixed = private, tuple(fixed + [name for name, _ in private.named_buffers()])
        else:
            self._module, self._fixed = self.model, ()
        self._slots = call_slots(self._module)
        self._modes = modes
        return self._module, self._fixed

    def norm_layers(self) -> str | None:
        """Which statistics the norm layers with running statistics use, in the model's current modes
        (None without such layers): for a run's record of which loss it measured."""
        layers = running_stats_layers(self.model)
        batch = [name for name, training in layers.items() if training]
        running = [name for name, training in layers.items() if not training]
        if not layers:
            return None
        if not running:
            return "batch statistics (train mode)"
        if not batch:
            return "running statistics (eval mode)"
        return (
            f"batch statistics (train mode): {', '.join(batch)}; running statistics (eval mode): {', '.join(running)}"
        )

    @_own_precision
    def check(self, batch: Batch | None = None) -> None:
        """Two losses, a gradient and a Hessian-vector product at the module's weights on ``batch``: a
        ValueError naming the fault if the model uses weight norm while torch's second derivative of it is
        wrong (:func:`weight_norm_second_derivative_error`), the loss is not a scalar, is random (the two
        values differ by more than 1000 ulps), updates the model's buffers (they are restored and named),
        or torch.func cannot differentiate the model once or twice (instead of an error from inside a JAX
        callback, or a silently wrong result, later)."""
        normalized = weight_norm_layers(self.model)
        if normalized and (error := weight_norm_second_derivative_error()) > 1e-6:
            raise ValueError(
                f"the model normalizes weights with torch._weight_norm ({', '.join(normalized)}), whose second "
                f"derivative torch {torch.__version__} gets wrong (off by {error:.0%} on a 3 x 2 example against "
                "differences of its first), so every Hessian-vector product of this model would be too. Measure it "
                "with the weight written out, g * v / v.norm(dim=1, keepdim=True), or with the parametrization "
                "folded in (torch.nn.utils.parametrize.remove_parametrizations(module, 'weight'))"
            )
        w = self.flat_parameters()
        before = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        try:  # a random forward is refused below: the caller's generators are left as they were
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                with _HalfPrecisionOps() as half:
                    value = self.value(w, batch)
                again = self.value(w, batch)
        except RuntimeError as error:
            others = [
                f"{_tensor_name(path)} is {leaf.dtype}"
                for path, leaf in pytree.tree_flatten_with_path(self._data(batch))[0]
                if torch.is_tensor(leaf) and leaf.is_floating_point() and leaf.dtype != self.dtype
            ]
            if not others:
                raise
            raise TypeError(
                f"{error}. The model's parameters are {self.dtype} and {', '.join(others)}: cast the batch to the "
                f"model's dtype (torch.from_numpy gives float64: `.to({self.dtype})`) or the model to the batch's"
            ) from error
        except TypeError as error:
            arrays = [
                _tensor_name(path)
                for path, leaf in pytree.tree_flatten_with_path(self._data(batch))[0]
                if isinstance(leaf, np.ndarray)
            ]
            if arrays:
                raise TypeError(
                    f"{error}. {', '.join(arrays)} {'is a NumPy array' if len(arrays) == 1 else 'are NumPy arrays'}: "
                    f"the model gets the batch as given, so make it tensors, torch.as_tensor(x, dtype={self.dtype}) "
                    "(and torch.as_tensor(labels))"
                ) from error
            inputs = self._data(batch)[0]
            if not isinstance(inputs, tuple | list):
                raise
            raise TypeError(
                f"{error}. eosflow calls model(inputs) with the batch's inputs as one argument, here a "
                f"{type(inputs).__name__} of {len(inputs)}: if the forward takes them as separate arguments, pass "
                "them by name as a dict, ({'x': x, 'mask': mask}, targets), which eosflow calls as model(**inputs)"
            ) from error
        finally:
            changed = restore_buffers(self.model, before)
        value, again = value.detach(), again.detach()  # inputs that require grad give a loss that does too
        warn_half_precision_ops(half.found, "loss_fn(model(inputs), targets)")
        if changed:
            raise ValueError(
                f"the model's forward updates its buffers ({', '.join(changed)}; restored): in train mode a "
                "module such as torch.nn.utils.parametrizations.spectral_norm runs a step of its own (a power "
                "iteration) at every call, so the loss depends on state that each evaluation changes, and "
                "eosflow's derivatives would not be those of one function. Call .eval() on those modules (the "
                "state then stays fixed)"
            )
        if value.dim() != 0:
            raise ValueError(
                f"loss_fn(model(inputs), targets) returns shape {tuple(value.shape)}, not a scalar: the loss "
                "must reduce over examples (e.g. reduction='mean')"
            )
        if abs(float(again - value)) > 1000 * torch.finfo(self.dtype).eps * abs(float(value)):
            raise ValueError(
                f"the model's forward is random: two evaluations of the loss at the same weights on the same "
                f"batch gave {float(value)!r} and {float(again)!r} (dropout called as a function, e.g. "
                "F.dropout(x, p, self.training), other sampling such as torch.randn, or a module that updates "
                "state it reads). eosflow needs a deterministic loss: call model.eval() if the forward is "
                "deterministic in eval mode, or make the sampling a fixed input"
            )
        try:
            self.grad(w, batch)
        except RuntimeError as error:
            if "mutate a captured Tensor" not in str(error):
                raise
            raise ValueError(
                "eosflow cannot differentiate the model functionally: a module updates its buffers in place "
                "from the parameters (a running average of its own; eosflow evaluates BatchNorm and "
                "InstanceNorm in train mode without their running statistics, but not others). Call "
                f"model.eval() first if that stops it, or use a model without it. torch said: {error}"
            ) from error
        try:
            self._hvp(self.unflatten(w), torch.ones_like(w), self._data(batch))
        except RuntimeError as error:
            if "derivative for" not in str(error):
                raise
            raise ValueError(
                "torch cannot differentiate this model (or loss) twice, and eosflow's Hessian-vector products "
                f"are double backward: {str(error).splitlines()[0].rstrip('.')}. Write that operation with ops torch "
                "differentiates twice (attention through F.scaled_dot_product_attention is: eosflow selects its "
                "math kernel)"
            ) from error

    @classmethod
    def from_module(
        cls, model: torch.nn.Module, loss_fn: Callable, batch: Batch, example_axis: ExampleAxis = None
    ) -> TorchObjective:
        return cls(model, loss_fn, batch, example_axis)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flat_parameters(self) -> torch.Tensor:
        """The module's current trainable parameters as one flat vector w (a detached copy)."""
        params = dict(self.model.named_parameters())
        return torch.cat([params[name].detach().reshape(-1) for name in self.names])

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """w -> {name: tensor} in the module's layout (views of w)."""
        pieces = torch.split(w, list(self.sizes))
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def flatten(self, tree: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: tensor} -> the flat vector (the inverse of ``unflatten``)."""
        return torch.cat([tree[name].reshape(-1) for name in self.names])

    # ---- the loss and its derivatives -------------------------------------------------------
    # Transforms act on the parameter dict; flat vectors are split before and concatenated after,
    # outside every transform. Higher derivatives are reverse-over-reverse (double backward): in
    # torch 2.13 forward-over-reverse fails inside common losses (F.mse_loss: "ZeroTensors are
    # immutable"), and double backward is what every torch op supports.
    def _outputs(self, params: dict[str, torch.Tensor], inputs: Any) -> Any:
        module, fixed = self._evaluated()
        if fixed:  # a private copy: its frozen parameters and buffers are the model's, now
            model = dict(itertools.chain(self.model.named_parameters(), self.model.named_buffers()))
            params = {**{name: model[name] for name in fixed}, **params}
        tensors = {path: params[name] for path, name in self._slots.items() if name in params}
        # a mapping of inputs is the model's keyword arguments: model(input_ids=..., attention_mask=...), as a
        # Hugging Face model takes its batch
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), None)
        with sdpa_kernel([SDPBackend.MATH]):  # the one attention kernel torch differentiates twice
            return functional_call(module, tensors, args, kwargs, tie_weights=False)

    def _loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(self._outputs(params, inputs), targets)

    def _grad(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return self.flatten(grad(self._loss)(params, batch))

    def _hvp(self, params: dict[str, torch.Tensor], direction: torch.Tensor, batch: Batch) -> torch.Tensor:
        image = self.flatten(grad(lambda p: torch.dot(self._grad(p, batch), direction))(params))
        # where g does not depend on w (a piecewise-linear model and loss: H = 0) the image does not depend
        # on the direction either, and vmap over directions could not lay it out (torch 2.13): tie it on
        return image + 0 * direction

    def _data(self, batch: Batch | None) -> Batch:
        return self.batch if batch is None else batch

    # ---- examples and minibatches ----------------------------------------------------------
    @property
    def num_examples(self) -> int | None:
        """N, the size every tensor of the batch has along its example axis (by default the leading
        one; None if they disagree, or there are no tensors): the examples minibatches are drawn from."""
        return self._num_examples

    def example_dims(self) -> Any:
        """The example axis of every leaf of the batch, in its structure (None for leaves that are not
        tensors, or without examples): the ``in_dims`` that map over the examples of minibatches."""
        return pytree.tree_unflatten(self.axes, pytree.tree_structure(self.batch))

    def examples(self, indices: Any) -> Batch:
        """The minibatch of examples ``indices`` of every tensor of the batch, x[..., indices, ...] along
        its example axis (an index array of any shape: the example axis becomes those axes, in
        place). The indices 0, ..., N-1 in order are the batch itself, not a gathered copy."""
        index = indices if torch.is_tensor(indices) else torch.from_numpy(np.array(indices, dtype=np.int64))
        index = index.to(device=self.device, dtype=torch.long)
        n = self.num_examples
        if n is None:
            raise ValueError(
                "the batch's tensors do not share a leading (example) axis, so there are no examples to select "
                "(name the example axes with example_axis)"
            )
        if index.shape == (n,) and torch.equal(index, torch.arange(n, device=self.device)):
            return self.batch
        leaves, spec = pytree.tree_flatten(self.batch)
        # one advanced index at position `axis`: its axes replace that axis, in place
        selected = [
            leaf if axis is None else leaf[(slice(None),) * axis + (index,)] for leaf, axis in zip(leaves, self.axes)
        ]
        return pytree.tree_unflatten(selected, spec)

    def check_microbatch_mean(self, batch: Batch, microbatch: int | None) -> None:
        """A SpecError unless the loss is a mean over examples, when ``microbatch`` splits the batch's rows
        (:func:`eosflow.objective.check_mean_over_examples` on every chunk, at the current weights: about two
        forward passes over the batch, at weights that do not require grad)."""
        if microbatch is not None:
            start = self.flat_parameters()
            count = leading_size(batch)
            check_mean_over_examples(
                lambda a, b: float(self.value(start, rows(batch, a, b)).detach()), count, microbatch, "microbatch"
            )

    def check_minibatch(self, size: int) -> None:
        """A ValueError when BatchNorm in train mode would normalize a minibatch of one example by
        that example's own statistics (per-example gradients, or a batch size of 1): a loss no
        training loop of several examples per batch descends."""
        if size != 1:
            return
        layers = [name for name, m in self.model.named_modules() if isinstance(m, _BatchNorm) and m.training]
        if layers:
            raise one_example_batch_statistics(layers, "train mode", "call model.eval()")

    @_own_precision
    def value(self, w: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """L(w)."""
        return self._loss(self.unflatten(w), self._data(batch))

    @_own_precision
    def grad(self, w: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """g(w)."""
        return self._grad(self.unflatten(w), self._data(batch))

    @_own_precision
    def value_and_grad(self, w: torch.Tensor, batch: Batch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(w), g(w)) in one pass."""
        g, value = grad_and_value(self._loss)(self.unflatten(w), self._data(batch))
        return value, self.flatten(g)

    @_own_precision
    def hvp(self, w: torch.Tensor, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """H(w) v = grad_w <g(w), v>."""
        return self._hvp(self.unflatten(w), v, self._data(batch))

    @_own_precision
    def map_lanes(self, call: Callable[..., torch.Tensor], in_dims: tuple, args: list, lanes: int, what: str):
        """``torch.func.vmap(call, in_dims)(*args)`` over ``lanes`` lanes, or the same as a loop over the lanes,
        stacked, for a model vmap cannot batch: ``nn.LSTM``/``nn.GRU`` with their default initial state
        (zeros of the unbatched size) fail under vmap when the inputs are batched (per-example lanes), and a
        ``torch.autograd.Function`` without a vmap rule under any vmap. The first failure is kept in
        ``vmap_error``, warned about once (:func:`_fallback_warning`; ``what`` names the lanes) and the loop
        serves every later call."""
        if self.vmap_error is None:
            try:
                return vmap(call, in_dims=in_dims)(*args)
            except RuntimeError as error:
                self.vmap_error = str(error)
                warnings.warn(_fallback_warning(self, what), UserWarning, stacklevel=3)

        def lane(i: int) -> list:
            select = lambda leaf, dim: leaf if dim is None else leaf.select(dim, i)  # noqa: E731
            return [pytree.tree_map(select, arg, dims) for arg, dims in zip(args, in_dims)]

        return torch.stack([call(*lane(i)) for i in range(lanes)])

    @_own_precision
    def grad_and_hvp_along_grad(self, w: torch.Tensor, batch: Batch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(g(w), H(w) g(w)) from one gradient pass: H g is the vjp of w -> g(w) with cotangent g (H symmetric)."""
        data = self._data(batch)
        gradient, pullback = vjp(lambda p: grad(self._loss)(p, data), self.unflatten(w))[:2]  # (out, vjp_fn)
        (image,) = pullback(gradient)
        return self.flatten(gradient), self.flatten(image)

    @_own_precision
    def hvp_batch(self, w: torch.Tensor, vectors: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """H(w) V for the columns of V (d x k), vectorized over columns (:meth:`map_lanes`)."""
        params, data = self.unflatten(w), self._data(batch)
        columns = vectors.T  # (k, d)
        what = "HVPs of a block of vectors"
        return self.map_lanes(lambda v: self._hvp(params, v, data), (0,), [columns], len(columns), what).T

    def linearized(self, w: torch.Tensor, batch: Batch | None = None) -> LinearizedHessian:
        """H(w) on ``batch`` for many products at one w: the gradient's graph built once and kept."""
        return LinearizedHessian(self, w, self._data(batch))

    def linearized_gauss_newton(self, w: torch.Tensor, batch: Batch | None = None) -> LinearizedGaussNewton:
        """G(w) on ``batch`` for many products at one w: the outputs' graph built once and kept."""
        return LinearizedGaussNewton(self, w, self._data(batch))

    @_own_precision
    def gauss_newton_batch(self, w: torch.Tensor, vectors: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """G(w) V = J^T H_out J V for the columns of V (d x k), with J = d outputs / dw and H_out the Hessian of
        ``loss_fn`` in the outputs: J v is the vjp of the (linear) pullback u -> J^T u along v, so every step is
        reverse mode, as the HVPs are; vectorized over columns (:meth:`map_lanes`)."""
        inputs, targets = self._data(batch)
        outputs, pullback = vjp(lambda p: self._outputs(p, inputs), self.unflatten(w))[:2]
        outputs = pytree.tree_map(torch.Tensor.detach, outputs)
        zeros = pytree.tree_map(torch.zeros_like, outputs)
        loss_grad = grad(lambda f: self.loss_fn(f, targets))

        def product(v: torch.Tensor) -> torch.Tensor:
            (jv,) = vjp(lambda u: self.flatten(pullback(u)[0]), zeros)[1](v)

            def inner(f: Any) -> torch.Tensor:  # <grad_f loss, J v>, whose gradient in f is H_out J v
                pairs = zip(pytree.tree_leaves(loss_grad(f)), pytree.tree_leaves(jv))
                return torch.stack([torch.sum(a * b) for a, b in pairs]).sum()

            (image,) = pullback(grad(inner)(outputs))
            return self.flatten(image) + 0 * v  # tie the image to v where G = 0, as _hvp does

        what = "Gauss-Newton products of a block of vectors"
        return self.map_lanes(product, (0,), [vectors.T], vectors.shape[1], what).T

    @_own_precision
    def third_derivative(
        self, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, batch: Batch | None = None
    ) -> torch.Tensor:
        """D^3 L(w)[u, v, .] = grad_w <H(w) v, u>."""
        data = self._data(batch)
        return self.flatten(grad(lambda p: torch.dot(self._hvp(p, v, data), u))(self.unflatten(w)))


class LinearizedHessian:
    """H(w) V at one w on one batch, from one gradient graph: g(w) is built with ``create_graph`` once and every
    product is one backward pass through it (``retain_graph``), column by column; where a fresh
    :meth:`TorchObjective.hvp_batch` recomputes the forward and the gradient for every block (5x the cost of a
    block of one on a small MLP). It holds the graph (the batch's activations) while it lives: the same numbers,
    bitwise."""

    def __init__(self, objective: TorchObjective, w: torch.Tensor, batch: Batch):
        self.objective = objective
        with _in_own_precision(objective.device):
            self.w = w.detach().clone().requires_grad_(True)
            loss = objective._loss(objective.unflatten(self.w), batch)
            (self.gradient,) = torch.autograd.grad(loss, self.w, create_graph=True)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """H(w) V for the columns of V (d x k)."""
        if not self.gradient.requires_grad:  # g does not depend on w (a piecewise-linear model and loss): H = 0
            return torch.zeros_like(vectors)
        with _in_own_precision(self.objective.device):
            images = [
                torch.autograd.grad(self.gradient, self.w, grad_outputs=column, retain_graph=True, allow_unused=True)[0]
                for column in vectors.T
            ]
        return torch.stack([torch.zeros_like(self.w) if image is None else image for image in images], dim=1)


class LinearizedGaussNewton:
    """G(w) V = J^T H_out J V at one w on one batch, from one forward: the outputs f(w) keep their graph, the
    pullback u -> J^T u is built once with ``create_graph`` (linear in u), and each column costs J v (the
    pullback's backward along v), H_out J v (a backward through grad_f loss, in the outputs alone) and J^T of it
    (a backward through the outputs' graph); where :meth:`TorchObjective.gauss_newton_batch` recomputes the
    forward and the pullback's graph for every block. It holds both graphs (the batch's activations) while it
    lives: :class:`LinearizedHessian`'s trade, for G."""

    def __init__(self, objective: TorchObjective, w: torch.Tensor, batch: Batch):
        inputs, targets = batch
        self.objective = objective
        with _in_own_precision(objective.device):
            self.w = w.detach().clone().requires_grad_(True)
            leaves, spec = pytree.tree_flatten(objective._outputs(objective.unflatten(self.w), inputs))
            moving = [torch.is_tensor(leaf) and leaf.requires_grad for leaf in leaves]  # the leaves J maps to
            self.outputs = [leaf for leaf, moves in zip(leaves, moving) if moves]
            free = [leaf.detach().requires_grad_() if moves else leaf for leaf, moves in zip(leaves, moving)]
            self.free = [leaf for leaf, moves in zip(free, moving) if moves]
            self.cotangents = [torch.zeros_like(leaf, requires_grad=True) for leaf in self.outputs]
            self.pullback = None  # J^T u, a graph in u; None where no output depends on w (G = 0)
            if self.outputs:
                self.pullback = torch.autograd.grad(
                    self.outputs, self.w, self.cotangents, create_graph=True, allow_unused=True
                )[0]
            loss = objective.loss_fn(pytree.tree_unflatten(free, spec), targets)
            gradients = torch.autograd.grad(loss, self.free, create_graph=True, allow_unused=True) if self.free else ()
            # (leaf index, grad_f loss there) where it depends on f (a loss linear in an output has H_out = 0 there)
            self.loss_grad = [(i, g) for i, g in enumerate(gradients) if g is not None and g.requires_grad]

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        """G(w) V for the columns of V (d x k)."""
        if self.pullback is None or not self.pullback.requires_grad or not self.loss_grad:
            return torch.zeros_like(vectors)
        with _in_own_precision(self.objective.device):
            images = [self._product(column) for column in vectors.T]
        return torch.stack(images, dim=1)

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        """J^T H_out J v for one column v (d,)."""
        assert self.pullback is not None, "__call__ returns G = 0 without a pullback"
        pushed = torch.autograd.grad(self.pullback, self.cotangents, v, retain_graph=True, allow_unused=True)
        jv = [torch.zeros_like(u) if j is None else j for j, u in zip(pushed, self.cotangents)]
        gradients = [g for _, g in self.loss_grad]
        along = [jv[i] for i, _ in self.loss_grad]
        h_jv = torch.autograd.grad(gradients, self.free, along, retain_graph=True, allow_unused=True)
        pairs = [(out, h) for out, h in zip(self.outputs, h_jv) if h is not None]
        if not pairs:
            return torch.zeros_like(self.w)
        outputs, cotangents = zip(*pairs)
        image = torch.autograd.grad(outputs, self.w, cotangents, retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(self.w) if image is None else image.detach()
