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
once, when the operator is built: a later training step does not move it. H's products share one gradient
graph, built at the first and held while the operator lives (the batch's activations: PyHessian's way, 2-5x
faster than recomputing it per product), and G's one graph of the outputs and their pullback
(:class:`LinearizedGaussNewton`); ``microbatch=B`` multiplies on chunks of B rows of the batch instead,
recomputed per product, one chunk's activations at a time, as the tracker's ``microbatch`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch

from eosflow.objective import check_example_count
from eosflow.torch.objective import (
    Batch,
    ExampleAxis,
    LinearizedGaussNewton,
    LinearizedHessian,
    TorchObjective,
    chunked_products,
    numpy_dtype,
)


class TorchCurvatureOperator(scipy.sparse.linalg.LinearOperator):
    """H(w) or G(w) (d x d, symmetric) of ``objective`` at the flat weights ``w``; ``products`` counts them.
    ``microbatch``: multiply on consecutive chunks of that many rows of the batch, sum_c (n_c / N) H_c (one
    chunk's activations at a time; the loss must be a mean over examples)."""

    def __init__(
        self, objective: TorchObjective, w: torch.Tensor, gauss_newton: bool = False, microbatch: int | None = None
    ):
        self.objective = objective
        self.w = w
        self.gauss_newton = gauss_newton
        self.microbatch = microbatch
        self._curvature: LinearizedHessian | LinearizedGaussNewton | None = None  # its graph, from the first product
        self.products = 0
        super().__init__(dtype=numpy_dtype(w.dtype), shape=(w.numel(), w.numel()))

    def _matmat(self, vectors: np.ndarray) -> np.ndarray:
        self.products += vectors.shape[1]
        # a copy where NumPy's strides are negative (eigh's columns reversed), which torch cannot view
        columns = torch.as_tensor(np.ascontiguousarray(vectors, dtype=self.dtype), device=self.w.device)
        if self.microbatch is None:  # one graph for every product
            if self._curvature is None:
                linearize = self.objective.linearized_gauss_newton if self.gauss_newton else self.objective.linearized
                self._curvature = linearize(self.w)
            return self._curvature(columns).detach().cpu().numpy()
        multiply = self.objective.gauss_newton_batch if self.gauss_newton else self.objective.hvp_batch
        image = chunked_products(multiply, self.w, columns, self.objective.batch, self.microbatch)
        return image.detach().cpu().numpy()

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(v, (-1, 1)))[:, 0]

    def _adjoint(self) -> TorchCurvatureOperator:
        return self  # symmetric


def _operator(
    model: torch.nn.Module,
    loss_fn: Callable,
    batch: Batch,
    example_axis: ExampleAxis,
    microbatch: int | None,
    gauss_newton: bool,
) -> TorchCurvatureOperator:
    """The operator at the model's current weights, its loss checked as the tracker's first update checks it (a
    loss that is not a scalar, a random forward, a forward that updates buffers, what torch cannot differentiate
    twice, a loss that is not a mean over examples when ``microbatch`` splits it: each an error naming it)."""
    check_example_count(microbatch, "microbatch")
    objective = TorchObjective(model, loss_fn, batch, example_axis)
    objective.check(batch)
    objective.check_microbatch_mean(batch, microbatch)
    return TorchCurvatureOperator(objective, objective.flat_parameters(), gauss_newton, microbatch)


def hessian_operator(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Batch,
    example_axis: ExampleAxis = None,
    microbatch: int | None = None,
) -> TorchCurvatureOperator:
    """H of ``loss_fn(model(inputs), targets)`` over the model's trainable parameters at their current values."""
    return _operator(model, loss_fn, batch, example_axis, microbatch, gauss_newton=False)


def gauss_newton_operator(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Batch,
    example_axis: ExampleAxis = None,
    microbatch: int | None = None,
) -> TorchCurvatureOperator:
    """G = J^T H_out J of ``loss_fn(model(inputs), targets)`` over the model's trainable parameters, at their
    current values (PSD for a loss convex in the outputs: MSE, cross-entropy)."""
    return _operator(model, loss_fn, batch, example_axis, microbatch, gauss_newton=True)
