"""The Hessian, or the Gauss-Newton matrix, of a torch model's loss as a ``scipy.sparse.linalg.LinearOperator``.

    H = eosflow.torch.hessian_operator(model, loss_fn, (inputs, targets))   # at the model's weights now
    values, vectors = scipy.sparse.linalg.eigsh(H, k=3, which="LA")
    density = eosflow.spectral_density.stochastic_lanczos(H, order=80, probes=8)   # PyHessian's density
    G = eosflow.torch.gauss_newton_operator(model, loss_fn, (inputs, targets))   # J^T H_out J
    H.products                                                                # products spent

``H @ v`` is one double-backward HVP of the :class:`TorchObjective` (no JAX bridge); ``G @ v`` is
J^T H_out J v with J the Jacobian of the model's outputs and H_out the Hessian of ``loss_fn`` in them
(:meth:`TorchObjective.gauss_newton_batch`; H = G + sum_o (d loss / d f_o) d^2 f_o / dw^2,
docs/monitor.md). ``@ V`` vectorizes the columns (``torch.func.vmap``, or a loop for a model vmap cannot
batch); vectors are in the order of ``model.named_parameters()`` that require grad. The weights are read
once, when the operator is built: a later training step does not move it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch

from eosflow.torch.objective import Batch, ExampleAxis, TorchObjective


class TorchCurvatureOperator(scipy.sparse.linalg.LinearOperator):
    """H(w) or G(w) (d x d, symmetric) of ``objective`` at the flat weights ``w``; ``products`` counts them."""

    def __init__(self, objective: TorchObjective, w: torch.Tensor, gauss_newton: bool = False):
        self.objective = objective
        self.w = w
        self.gauss_newton = gauss_newton
        self.products = 0
        super().__init__(dtype=np.dtype(str(w.dtype).removeprefix("torch.")), shape=(w.numel(), w.numel()))

    def _matmat(self, vectors: np.ndarray) -> np.ndarray:
        self.products += vectors.shape[1]
        columns = torch.as_tensor(np.asarray(vectors, dtype=self.dtype), device=self.w.device)
        multiply = self.objective.gauss_newton_batch if self.gauss_newton else self.objective.hvp_batch
        return multiply(self.w, columns).detach().cpu().numpy()

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        if self.gauss_newton:
            return self._matmat(np.reshape(v, (-1, 1)))[:, 0]
        self.products += 1
        column = torch.as_tensor(np.asarray(np.ravel(v), dtype=self.dtype), device=self.w.device)
        return self.objective.hvp(self.w, column).detach().cpu().numpy()

    def _adjoint(self) -> TorchCurvatureOperator:
        return self  # symmetric


def _checked(model: torch.nn.Module, loss_fn: Callable, batch: Batch, example_axis: ExampleAxis) -> TorchObjective:
    """The objective of ``loss_fn(model(inputs), targets)``, checked as the tracker's first update is (a loss
    that is not a scalar, a random forward, a forward that updates buffers, what torch cannot differentiate
    twice: each a ValueError naming it)."""
    objective = TorchObjective(model, loss_fn, batch, example_axis)
    objective.check(batch)
    return objective


def hessian_operator(
    model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batch: Batch, example_axis: ExampleAxis = None
) -> TorchCurvatureOperator:
    """H of ``loss_fn(model(inputs), targets)`` over the model's trainable parameters at their current values."""
    objective = _checked(model, loss_fn, batch, example_axis)
    return TorchCurvatureOperator(objective, objective.flat_parameters())


def gauss_newton_operator(
    model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batch: Batch, example_axis: ExampleAxis = None
) -> TorchCurvatureOperator:
    """G = J^T H_out J of ``loss_fn(model(inputs), targets)`` over the model's trainable parameters, at their
    current values (PSD for a loss convex in the outputs: MSE, cross-entropy)."""
    objective = _checked(model, loss_fn, batch, example_axis)
    return TorchCurvatureOperator(objective, objective.flat_parameters(), gauss_newton=True)
