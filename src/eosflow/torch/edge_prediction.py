"""What the central flow predicts at a torch model's GD iterate (:mod:`eosflow.edge_prediction` for torch).

    previous = [p.detach().clone() for p in model.parameters()]
    optimizer.step()                                                  # plain SGD at lr: GD on the batch
    with eosflow.torch.midpoint(model, previous):                     # the centre of GD's period-2 oscillation
        eig = tracker.update(batch)
        prediction = eosflow.torch.edge_prediction(model, loss_fn, batch, eig, lr)
    x = eosflow.torch.edge_offsets(model, previous, eig)             # u_i . (w_t - w_{t-1}) / 2

With ``torch.optim.RMSprop`` (no momentum, weight decay or centering), ``eig`` from the tracker given the optimizer
(the top of P^-1/2 H P^-1/2) and ``optimizer=`` to both calls, the reading is RMSProp's central flow's, nu fed by
the oscillation (:mod:`eosflow.edge_prediction`), with P = sqrt(square_avg) + eps and nu's rate 1 - alpha. The same
for ``torch.optim.Adam`` at betas[0] = 0, RMSProp with bias correction (nu_hat = exp_avg_sq / (1 - b2^t)).

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
from eosflow.optimizer_edges import SecondMoment, ema_second_moment
from eosflow.precision import precision
from eosflow.torch.objective import Batch, TorchObjective, numpy_dtype, trainable, unwrapped
from eosflow.torch.tracker import host_array, parameter_groups, state_buffer
from eosflow.tracker import eigenpairs_of


def edge_prediction(
    model: torch.nn.Module,
    loss_fn: Callable,
    batch: Batch,
    eig: Any,
    lr: float,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    margin: float = 0.03,
) -> EdgePrediction:
    """:class:`eosflow.edge_prediction.EdgePrediction` of GD at step size ``lr`` at the model's current
    parameters, on ``batch`` = (inputs, targets) with ``loss_fn(outputs, targets)``, from ``eig``
    (:class:`eosflow.torch.TrackedEigenpairs` of a tracker without a preconditioner, or anything with
    ``.values`` (k,) and ``.vectors`` (d, k) in the tracker's layout) measured there. With a
    ``torch.optim.RMSprop`` ``optimizer`` (or ``torch.optim.Adam`` at betas[0] = 0; ``eig`` of the tracker given it),
    RMSProp's reading. One gradient and
    k(k + 1)/2 third derivatives; the model is not changed. NumPy arrays in the model's dtype."""
    objective = TorchObjective(model, loss_fn, batch)
    values, vectors = eigenpairs_of(eig, "eosflow.torch.edge_prediction")
    values, vectors = check_inputs(
        host_array(values), host_array(vectors), objective.dim, lr, margin, "eosflow.torch.edge_prediction"
    )
    objective.check(batch)
    w = objective.flat_parameters()
    dtype = numpy_dtype(w.dtype)
    moment = None if optimizer is None else second_moment(model, optimizer, lr, dtype)
    if moment is not None:
        if np.isnan(getattr(eig, "threshold", 0.0)):  # a tracker updated without the optimizer: the top of H
            raise ValueError(
                "eosflow.torch.edge_prediction: eig was measured without an optimizer (its threshold is nan), so it "
                f"holds the top of H, not of P^-1/2 H P^-1/2: measure it with tracker.update(batch, optimizer) for "
                f"the {type(optimizer).__name__} given here"
            )
        vectors = vectors / np.sqrt(moment.preconditioner)[:, None]  # V = P^-1/2 U
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
    with precision(dtype.name):
        prediction = reading(
            jnp.asarray(loss.detach().cpu().numpy()),
            jnp.asarray(gradient.detach().cpu().numpy()),
            jnp.asarray(scaled.detach().cpu().numpy()),
            jnp.asarray(values.astype(dtype)),
            jnp.asarray(vectors.astype(dtype)),
            jnp.asarray(lr, dtype),
            jnp.asarray(margin, dtype),
            None if moment is None else SecondMoment(*map(jnp.asarray, moment)),
        )
        return jax.tree.map(np.asarray, prediction)  # the same EdgePrediction, of NumPy arrays


def second_moment(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float | None, dtype: np.dtype
) -> SecondMoment | None:
    """RMSprop's (nu, P = sqrt(nu) + eps, dP/dnu, nu's rate 1 - alpha), each (d,) in the tracker's layout, from its
    state, or Adam's at betas[0] = 0 (RMSProp with bias correction: nu_hat = v / (1 - b2^t), P = sqrt(nu_hat) + eps,
    rate (1 - b2) / (1 - b2^(t+1))); None for plain SGD (GD). Momentum, weight decay, centering, AMSGrad, another
    optimizer, a parameter it does not hold or (``lr`` given) a group stepping at another lr: a ValueError that
    names it."""
    where = "eosflow.torch.edge_prediction"
    adam = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
    if not (adam or isinstance(optimizer, torch.optim.SGD | torch.optim.RMSprop)):
        raise ValueError(
            f"{where}: the central flow at a point is derived for GD (torch.optim.SGD) and RMSProp "
            f"(torch.optim.RMSprop, or torch.optim.Adam at betas[0] = 0), without momentum; "
            f"got {type(optimizer).__name__}"
        )
    params = trainable(unwrapped(model))
    groups = parameter_groups(optimizer, params)  # a ValueError naming any parameter it does not hold
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for name, p in params.items():
        group = groups[name][1]
        momentum = ("betas[0]", group["betas"][0]) if adam else ("momentum", group.get("momentum"))
        off = ("weight_decay", "centered", "amsgrad", "maximize")
        for key, value in (momentum, *((key, group.get(key)) for key in off)):
            if value:
                raise ValueError(f"{where}: {key} = {value!r} in the group of {name!r}; set it off (0 / False)")
        if lr is not None and not np.isclose(float(group["lr"]), lr, rtol=1e-6):
            raise ValueError(f"{where}: lr = {lr!r}, but the group of {name!r} steps with lr = {group['lr']!r}")
        if isinstance(optimizer, torch.optim.SGD):
            continue
        nu, steps = state_buffer(optimizer.state.get(p, {}), "exp_avg_sq" if adam else "square_avg", name)
        decay = float(group["betas"][1] if adam else group["alpha"])
        # P = sqrt(nu_hat) + eps; Adam's nu_hat is bias-corrected at its step count, RMSprop's is nu itself
        moment = ema_second_moment(nu.astype(np.float64), steps if adam else None, decay, 0.0, float(group["eps"]))
        values = (moment.nu, moment.preconditioner, moment.slope, np.full(nu.size, float(moment.rate)))
        for part, value in zip(parts, values, strict=True):
            part.append(value)
    if isinstance(optimizer, torch.optim.SGD):
        return None
    return SecondMoment(*(np.concatenate(part).astype(dtype) for part in parts))


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


def edge_offsets(
    model: torch.nn.Module,
    previous: Sequence[torch.Tensor],
    eig: Any,
    optimizer: torch.optim.Optimizer | None = None,
) -> np.ndarray:
    """x_i = u_i . (w_t - w_{t-1}) / 2 for the tracked eigenvectors (the tracker's layout: the trainable
    parameters in ``named_parameters`` order), w_t the model's parameters and ``previous`` w_{t-1}. With a
    ``torch.optim.RMSprop`` ``optimizer``, x_i = u_i . P^{1/2} (w_t - w_{t-1}) / 2 with its P now: X's coordinates."""
    step = [
        (p.detach() - before.to(p.device, p.dtype)).reshape(-1)
        for p, before in _parameter_pairs(model, previous)
        if p.requires_grad
    ]
    flat = torch.cat(step)
    vectors = eigenpairs_of(eig, "eosflow.torch.edge_offsets", flat.numel())[1]
    vectors = vectors if torch.is_tensor(vectors) else torch.from_numpy(np.ascontiguousarray(vectors))
    moment = None if optimizer is None else second_moment(model, optimizer, None, numpy_dtype(flat.dtype))
    if moment is not None:
        flat = flat * torch.from_numpy(np.sqrt(moment.preconditioner)).to(flat.device)
    return (vectors.to(flat.device, flat.dtype).T @ flat / 2).cpu().numpy()
