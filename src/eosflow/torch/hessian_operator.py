"""The Hessian of a torch model's loss as a ``scipy.sparse.linalg.LinearOperator``, by torch's own HVPs.

    H = eosflow.torch.hessian_operator(model, loss_fn, (inputs, targets))   # at the model's weights now
    values, vectors = scipy.sparse.linalg.eigsh(H, k=3, which="LA")
    density = eosflow.spectral_density.stochastic_lanczos(H, order=80, probes=8)   # PyHessian's density
    H.hvps                                                                    # products spent

``H @ v`` is one double-backward HVP of the :class:`TorchObjective` (no JAX bridge), ``H @ V`` the columns
vectorized (``torch.func.vmap``, or a loop for a model vmap cannot batch); vectors are in the order of
``model.named_parameters()`` that require grad. The weights are read once, when the operator is built: a
later training step does not move it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch

from eosflow.torch.objective import Batch, ExampleAxis, TorchObjective


class TorchHessianOperator(scipy.sparse.linalg.LinearOperator):
    """H(w) (d x d, symmetric) of ``objective`` at the flat weights ``w``; ``hvps`` counts the products."""

    def __init__(self, objective: TorchObjective, w: torch.Tensor):
        self.objective = objective
        self.w = w
        self.hvps = 0
        super().__init__(dtype=np.dtype(str(w.dtype).removeprefix("torch.")), shape=(w.numel(), w.numel()))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, dtype=self.dtype), device=self.w.device)

    def _matvec(self, v: np.ndarray) -> np.ndarray:
        self.hvps += 1
        return self.objective.hvp(self.w, self._tensor(np.ravel(v))).detach().cpu().numpy()

    def _matmat(self, vectors: np.ndarray) -> np.ndarray:
        self.hvps += vectors.shape[1]
        return self.objective.hvp_batch(self.w, self._tensor(vectors)).detach().cpu().numpy()

    def _adjoint(self) -> TorchHessianOperator:
        return self  # symmetric


def hessian_operator(
    model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batch: Batch, example_axis: ExampleAxis = None
) -> TorchHessianOperator:
    """H of ``loss_fn(model(inputs), targets)`` over the model's trainable parameters at their current values,
    checked first as the tracker's first update is (a loss that is not a scalar, a random forward, a forward
    that updates buffers, what torch cannot differentiate twice: each a ValueError naming it)."""
    objective = TorchObjective(model, loss_fn, batch, example_axis)
    objective.check(batch)
    return TorchHessianOperator(objective, objective.flat_parameters())
