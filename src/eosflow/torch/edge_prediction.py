"""What the central flow predicts at a torch model's GD iterate (:mod:`eosflow.edge_prediction` for torch).

    previous = [p.detach().clone() for p in model.parameters()]
    optimizer.step()                                                  # plain SGD at lr: GD on the batch
    with eosflow.torch.midpoint(model, previous):                     # the centre of GD's period-2 oscillation
        eig = tracker.update(batch)
        prediction = eosflow.torch.edge_prediction(model, loss_fn, batch, eig, lr)
    x = eosflow.torch.edge_offsets(model, previous, eig)             # u_i . (w_t - w_{t-1}) / 2

The third derivatives G_ij = grad_w (u_i^T H u_j) are torch's own (double backward, then one more backward);
the rest, the complementarity problem for X, is :func:`eosflow.edge_prediction.reading`, the JAX path's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from eosflow.edge_prediction import EdgePrediction, check_inputs, reading
from eosflow.flows.sdcp import pair_indices, pair_scale
from eosflow.precision import precision
from eosflow.torch.objective import Batch, TorchObjective, numpy_dtype


def edge_prediction(
    model: torch.nn.Module, loss_fn: Callable, batch: Batch, eig: Any, lr: float, *, margin: float = 0.03
) -> EdgePrediction:
    """:class:`eosflow.edge_prediction.EdgePrediction` of GD at step size ``lr`` at the model's current
    parameters, on ``batch`` = (inputs, targets) with ``loss_fn(outputs, targets)``, from ``eig``
    (:class:`eosflow.torch.TrackedEigenpairs` of a tracker without a preconditioner, or anything with
    ``.values`` (k,) and ``.vectors`` (d, k) in the tracker's layout) measured there. One gradient and
    k(k + 1)/2 third derivatives; the model is not changed. NumPy arrays in the model's dtype."""
    objective = TorchObjective(model, loss_fn, batch)
    vectors = eig.vectors.detach().cpu().numpy() if torch.is_tensor(eig.vectors) else np.asarray(eig.vectors)
    values, vectors = check_inputs(
        np.asarray(eig.values), vectors, objective.dim, lr, margin, "eosflow.torch.edge_prediction"
    )
    objective.check(batch)
    w = objective.flat_parameters()
    columns = torch.from_numpy(np.ascontiguousarray(vectors)).to(device=w.device, dtype=w.dtype)
    loss, gradient = objective.value_and_grad(w)
    k = values.shape[0]
    rows, cols = pair_indices(k)
    scaled = torch.stack(
        [
            float(scale) * objective.third_derivative(w, columns[:, i], columns[:, j])
            for i, j, scale in zip(rows, cols, pair_scale(k), strict=True)
        ]
    )
    dtype = numpy_dtype(w.dtype)
    with precision(dtype.name):
        prediction = reading(
            jnp.asarray(loss.detach().cpu().numpy()),
            jnp.asarray(gradient.detach().cpu().numpy()),
            jnp.asarray(scaled.detach().cpu().numpy()),
            jnp.asarray(values.astype(dtype)),
            jnp.asarray(vectors.astype(dtype)),
            jnp.asarray(lr, dtype),
            jnp.asarray(margin, dtype),
        )
        return jax.tree.map(np.asarray, prediction)  # the same EdgePrediction, of NumPy arrays


def _parameter_pairs(
    model: torch.nn.Module, previous: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its previous value) for every parameter of ``model.parameters()``, checked against
    ``previous`` (a list in that order, as ``[p.detach().clone() for p in model.parameters()]`` makes it)."""
    params = list(model.parameters())
    if len(previous) != len(params):
        raise ValueError(
            f"previous has {len(previous)} tensors, the model {len(params)} parameters: pass "
            "[p.detach().clone() for p in model.parameters()] taken before the step"
        )
    for index, (p, before) in enumerate(zip(params, previous, strict=True)):
        if tuple(before.shape) != tuple(p.shape):
            raise ValueError(
                f"previous[{index}] has shape {tuple(before.shape)}, the model's parameter {index} {tuple(p.shape)}"
            )
    return list(zip(params, previous, strict=True))


@contextlib.contextmanager
def midpoint(model: torch.nn.Module, previous: Sequence[torch.Tensor]) -> Iterator[torch.nn.Module]:
    """The model with its parameters at (w_t + w_{t-1}) / 2 inside the block, ``previous`` holding w_{t-1} (a list in
    ``model.parameters()``'s order); w_t is put back bitwise on leaving, however the block ends."""
    pairs = _parameter_pairs(model, previous)
    saved = [p.detach().clone() for p, _ in pairs]
    with torch.no_grad():
        for p, before in pairs:
            p.copy_((p + before.to(p.device, p.dtype)) / 2)
    try:
        yield model
    finally:
        with torch.no_grad():
            for (p, _), value in zip(pairs, saved, strict=True):
                p.copy_(value)


def edge_offsets(model: torch.nn.Module, previous: Sequence[torch.Tensor], eig: Any) -> np.ndarray:
    """x_i = u_i . (w_t - w_{t-1}) / 2 for the tracked eigenvectors (the tracker's layout: the trainable
    parameters in ``named_parameters`` order), w_t the model's parameters and ``previous`` w_{t-1}."""
    step = [
        (p.detach() - before.to(p.device, p.dtype)).reshape(-1)
        for p, before in _parameter_pairs(model, previous)
        if p.requires_grad
    ]
    vectors = eig.vectors if torch.is_tensor(eig.vectors) else torch.from_numpy(np.asarray(eig.vectors))
    flat = torch.cat(step)
    return (vectors.to(flat.device, flat.dtype).T @ flat / 2).cpu().numpy()
