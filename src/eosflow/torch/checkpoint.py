"""A torch training run's state as an :class:`eosflow.checkpoint.Checkpoint`: models from your torch loop.

    problem = eosflow.torch.problem(model, loss_fn, (x, y))
    ds = eosflow.anchored.anchored(table, at=2, problem=problem, start=eosflow.torch.checkpoint(model, optimizer))

The model's trainable parameters, flattened in the layout of :func:`eosflow.torch.problem`, and the
optimizer's buffers as the optax states they equal (the update rules agree term by term):
``torch.optim.SGD`` with momentum (dampening 0; Nesterov too) keeps ``momentum_buffer``, optax's trace;
``torch.optim.RMSprop`` (not centered, no momentum) ``square_avg``, optax's nu with eps outside the root
(eosflow's ``[rmsprop] eps``); ``torch.optim.Adam`` ``exp_avg``, ``exp_avg_sq`` and ``step``, optax's mu,
nu and count. What eosflow's optimizers do not have is refused by name: weight decay, AMSGrad, a centered
or momentum RMSprop, dampening, several parameter groups with different hyperparameters.
"""

from __future__ import annotations

import numpy as np
import optax
import torch

from eosflow.checkpoint import Checkpoint


def checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Checkpoint:
    """The :class:`Checkpoint` of ``model`` trained by ``optimizer`` (None: GD, no state) at its current step."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def flat(tensors: list[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1) for t in tensors]).cpu().numpy()

    w = flat(list(params.values()))
    if optimizer is None:
        return Checkpoint(w)
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in groups]
    if missing:
        raise ValueError(f"the optimizer does not hold the model's trainable parameter(s) {', '.join(missing)}")
    settings = {k: v for k, v in groups[id(next(iter(params.values())))].items() if k != "params"}
    for name, p in params.items():
        other = {k: v for k, v in groups[id(p)].items() if k != "params"}
        if other != settings:
            raise ValueError(f"parameter {name!r} is in a group with other hyperparameters: eosflow's run has one")
    if settings.get("maximize", False):
        raise ValueError("maximize = True: eosflow's optimizers descend")
    if settings.get("weight_decay", 0.0):
        raise ValueError(f"weight_decay = {settings['weight_decay']}: eosflow's optimizers have no weight decay")

    def buffer(key: str) -> np.ndarray:
        absent = [name for name, p in params.items() if key not in optimizer.state.get(p, {})]
        if absent:
            raise ValueError(f"the optimizer has no `{key}` for {absent[0]!r} yet: take the checkpoint after a step")
        return flat([optimizer.state[p][key] for p in params.values()])

    if isinstance(optimizer, torch.optim.SGD):
        if not settings.get("momentum", 0.0):
            return Checkpoint(w)
        if settings.get("dampening", 0.0):
            raise ValueError(f"dampening = {settings['dampening']}: eosflow's momentum has none")
        return Checkpoint(w, optax.TraceState(trace=buffer("momentum_buffer")))
    if isinstance(optimizer, torch.optim.RMSprop):
        if settings.get("centered", False) or settings.get("momentum", 0.0):
            raise ValueError("a centered RMSprop or one with momentum: eosflow's rmsprop is neither")
        return Checkpoint(w, optax.ScaleByRmsState(nu=buffer("square_avg")))
    if type(optimizer) is torch.optim.Adam:
        if settings.get("amsgrad", False):
            raise ValueError("AMSGrad (a running max of nu): eosflow's adam has none")
        steps = {float(optimizer.state[p]["step"]) for p in params.values() if "step" in optimizer.state.get(p, {})}
        mu, nu = buffer("exp_avg"), buffer("exp_avg_sq")
        if len(steps) != 1:
            raise ValueError(f"the parameters' step counts differ ({sorted(steps)}): take the checkpoint after a step")
        return Checkpoint(w, optax.ScaleByAdamState(count=np.int32(steps.pop()), mu=mu, nu=nu))
    raise ValueError(f"no eosflow optimizer for {type(optimizer).__name__}: use SGD, RMSprop or Adam")
