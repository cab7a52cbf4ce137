"""Batch sharpness of a PyTorch model at its current parameters (eosflow.batch_sharpness for torch loops).

    value, quotients = eosflow.torch.batch_sharpness(model, loss_fn, batches)   # batches: [(x, y), ...]

value = E_B[g_B^T H_B g_B / |g_B|^2] over the given batches, each along its own gradient (as a plain SGD step
takes it): the batch sharpness of Andreyev & Beneventano (arXiv:2412.20553); ``quotients`` holds every batch's
numerator and denominator (their ratio of sums is the other estimate their code offers). One gradient pass
and its double backward (the HVP along it) per batch, in the TorchObjective's own precision (the caller's
autocast and TF32 off), the model untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from eosflow.batch_sharpness import BatchQuotient
from eosflow.torch.objective import TorchObjective


def batch_sharpness(
    model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batches: Iterable[Any]
) -> tuple[float, BatchQuotient]:
    """E_B[g_B^T H_B g_B / |g_B|^2] over ``batches`` ((inputs, targets) pairs, e.g. drawn from your
    DataLoader) at the model's current trainable parameters, with every batch's (curvature, descent)."""
    batches = list(batches)
    if not batches:
        raise ValueError("batch_sharpness needs at least one batch")
    objective = TorchObjective(model, loss_fn, batches[0])
    w = objective.flat_parameters()
    curvature, descent = [], []
    for batch in batches:
        gradient, image = objective.grad_and_hvp_along_grad(w, batch)
        curvature.append(float(torch.dot(gradient, image)))
        descent.append(float(torch.dot(gradient, gradient)))
    quotients = BatchQuotient(np.asarray(curvature), np.asarray(descent))
    return float(np.mean(quotients.value)), quotients
