"""The loss of a ``torch.nn.Module`` over one flat parameter vector, with its derivatives.

    L(w)        = loss_fn(model_w(inputs), targets)      (torch.func.functional_call)
    g(w)        = grad L(w)                               (torch.func.grad)
    H(w) v      = grad_w <g(w), v>                          (reverse-over-reverse)
    D^3 L[u, v] = grad_w <H(w) v, u>                        (one more reverse pass; a vector)

Every derivative is one composable ``torch.func`` transform of the module's functional form, so
the module is never mutated and nothing is accumulated in ``.grad``. Batched forms (``hvp_batch``)
vectorize over columns with ``torch.func.vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad, grad_and_value, vmap

Batch = tuple[Any, Any]


class TorchObjective:
    """L(w) = loss_fn(model(inputs; w), targets) for the flat vector w of ``model``'s parameters.

    Attributes:
        model: the module (its trainable parameters give the layout of w and w0; those with
            ``requires_grad=False`` keep their values; it is not modified).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (e.g. ``torch.nn.functional.mse_loss``).
        batch: ``(inputs, targets)``, the data the loss is evaluated on (full batch).
        names, shapes: the parameters' names and shapes, in the order they occupy w.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batch: Batch):
        self.model = model
        self.loss_fn = loss_fn
        self.batch = batch
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # frozen ones stay fixed
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad): nothing to differentiate")
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            kinds = ", ".join(f"{name}: {p.dtype}" for name, p in params.items())
            raise ValueError(f"the model's parameters mix dtypes ({kinds}); cast the model with .float() or .double()")
        self.names = tuple(params)
        self.shapes = tuple(tuple(p.shape) for p in params.values())
        self.sizes = tuple(math.prod(shape) for shape in self.shapes)
        self.dtype = next(iter(dtypes))
        self.device = next(iter(params.values())).device
        for name, leaf in zip(("inputs", "targets"), batch):
            if torch.is_tensor(leaf) and leaf.is_floating_point() and leaf.dtype != self.dtype:
                raise ValueError(
                    f"batch {name} are {leaf.dtype} but the model's parameters are {self.dtype}; "
                    f"cast them with .to({self.dtype})"
                )

    def check(self, batch: Batch | None = None) -> None:
        """One loss and gradient at the module's weights on ``batch``: a ValueError naming the fault if
        the loss is not a scalar or torch.func cannot differentiate the model (instead of an error
        from inside a JAX callback, later)."""
        w = self.flat_parameters()
        value = self.value(w, batch)
        if value.dim() != 0:
            raise ValueError(
                f"loss_fn(model(inputs), targets) returns shape {tuple(value.shape)}, not a scalar: the loss "
                "must reduce over examples (e.g. reduction='mean')"
            )
        try:
            self.grad(w, batch)
        except RuntimeError as error:
            if "mutate a captured Tensor" not in str(error):
                raise
            raise ValueError(
                "eosflow cannot differentiate the model functionally: a module updates its buffers in place "
                "(BatchNorm's running statistics in train mode). Call model.eval() first (BatchNorm then "
                f"applies its running statistics), or use a model without it. torch said: {error}"
            ) from error

    @classmethod
    def from_module(cls, model: torch.nn.Module, loss_fn: Callable, batch: Batch) -> TorchObjective:
        return cls(model, loss_fn, batch)

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
    def _loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(functional_call(self.model, params, (inputs,)), targets)

    def _grad(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return self.flatten(grad(self._loss)(params, batch))

    def _hvp(self, params: dict[str, torch.Tensor], direction: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.flatten(grad(lambda p: torch.dot(self._grad(p, batch), direction))(params))

    def _data(self, batch: Batch | None) -> Batch:
        return self.batch if batch is None else batch

    def value(self, w: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """L(w)."""
        return self._loss(self.unflatten(w), self._data(batch))

    def grad(self, w: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """g(w)."""
        return self._grad(self.unflatten(w), self._data(batch))

    def value_and_grad(self, w: torch.Tensor, batch: Batch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(w), g(w)) in one pass."""
        g, value = grad_and_value(self._loss)(self.unflatten(w), self._data(batch))
        return value, self.flatten(g)

    def hvp(self, w: torch.Tensor, v: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """H(w) v = grad_w <g(w), v>."""
        return self._hvp(self.unflatten(w), v, self._data(batch))

    def hvp_batch(self, w: torch.Tensor, vectors: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """H(w) V for the columns of V (d x k), vectorized over columns."""
        params, data = self.unflatten(w), self._data(batch)
        return vmap(lambda v: self._hvp(params, v, data), in_dims=1, out_dims=1)(vectors)

    def third_derivative(self, w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """D^3 L(w)[u, v, .] = grad_w <H(w) v, u>."""
        data = self._data(None)
        return self.flatten(grad(lambda p: torch.dot(self._hvp(p, v, data), u))(self.unflatten(w)))
