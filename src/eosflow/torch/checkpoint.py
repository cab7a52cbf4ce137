"""A torch training run's state as an :class:`eosflow.checkpoint.Checkpoint`: models from your torch loop.

    problem = eosflow.torch.problem(model, loss_fn, (x, y))
    ds = eosflow.anchored.anchored(table, at=2, problem=problem, start=eosflow.torch.checkpoint(model, optimizer))

The model's trainable parameters, flattened in the layout of :func:`eosflow.torch.problem`, and the
optimizer's buffers as the optax states they equal (the update rules agree term by term):
``torch.optim.SGD`` with momentum (dampening 0; Nesterov too) keeps ``momentum_buffer``, optax's trace;
``torch.optim.RMSprop`` (not centered, no momentum) ``square_avg``, optax's nu with eps outside the root
(eosflow's ``[rmsprop] eps``); ``torch.optim.Adam`` (and ``AdamW`` without decay) ``exp_avg``, ``exp_avg_sq``
and ``step``, optax's mu, nu and count. What eosflow's optimizers do not have is refused by name: weight decay,
AMSGrad, a centered or momentum RMSprop, dampening, several parameter groups with different hyperparameters.
"""

from __future__ import annotations

import numpy as np
import optax
import torch

from eosflow.checkpoint import Checkpoint
from eosflow.torch.objective import check_not_meta, trainable
from eosflow.torch.tracker import never_stepped, parameter_groups, state_buffer


def checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Checkpoint:
    """The :class:`Checkpoint` of ``model`` trained by ``optimizer`` (None: GD, no state) at its current step."""
    params = trainable(model)
    if params:
        check_not_meta(next(iter(params.values())).device, "the model's parameters")

    def flat(tensors: list[torch.Tensor]) -> np.ndarray:
        return torch.cat([t.detach().reshape(-1) for t in tensors]).cpu().numpy()

    w = flat(list(params.values()))
    if optimizer is None:
        return Checkpoint(w)
    groups = parameter_groups(optimizer, params)
    settings = [{k: v for k, v in group.items() if k != "params"} for _, group in groups.values()]
    for name, other in zip(params, settings):
        if other != settings[0]:
            raise ValueError(f"parameter {name!r} is in a group with other hyperparameters: eosflow's run has one")
    if settings[0].get("maximize", False):
        raise ValueError("maximize = True: eosflow's optimizers descend")
    if settings[0].get("weight_decay", 0.0):
        raise ValueError(f"weight_decay = {settings[0]['weight_decay']}: eosflow's optimizers have no weight decay")

    def buffer(key: str) -> tuple[np.ndarray, set[float]]:
        """The buffer ``key`` of every parameter, flattened as w, and their step counts; zeros for a parameter
        the optimizer never stepped (its gradient, in the loss trained, is zero: so are its moments)."""
        read = [
            (np.zeros(p.numel(), w.dtype), None)
            if never_stepped(optimizer, p)
            else state_buffer(optimizer.state.get(p, {}), key, name)
            for name, p in params.items()
        ]
        return np.concatenate([values for values, _ in read]), {steps for _, steps in read if steps is not None}

    group = settings[0]
    lr = float(group["lr"])

    def run(process: str, **options) -> dict:  # the optimizer in the spec's terms (checked by anchored)
        return {"process": process, "lr": lr, "options": options}

    if isinstance(optimizer, torch.optim.SGD):
        if not group.get("momentum", 0.0):
            return Checkpoint(w, settings=run("gd"))
        if group.get("dampening", 0.0):
            raise ValueError(f"dampening = {group['dampening']}: eosflow's momentum has none")
        beta = float(group["momentum"])
        spec = run("nesterov", beta=beta) if group.get("nesterov") else run("momentum", beta=beta, form="classical")
        return Checkpoint(w, optax.TraceState(trace=buffer("momentum_buffer")[0]), settings=spec)
    if isinstance(optimizer, torch.optim.RMSprop):
        if group.get("centered", False) or group.get("momentum", 0.0):
            raise ValueError("a centered RMSprop or one with momentum: eosflow's rmsprop is neither")
        spec = run(
            "rmsprop",
            beta2=float(group["alpha"]),
            eps=float(group["eps"]),
            eps_root=0.0,
            second_moment="diagonal",
            bias_correction=False,
        )
        return Checkpoint(w, optax.ScaleByRmsState(nu=buffer("square_avg")[0]), settings=spec)
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):  # (weight decay, AdamW's too, refused above)
        if group.get("amsgrad", False):
            raise ValueError("AMSGrad (a running max of nu): eosflow's adam has none")
        (mu, _), (nu, steps) = buffer("exp_avg"), buffer("exp_avg_sq")
        if len(steps) != 1:
            raise ValueError(f"the parameters' step counts differ ({sorted(steps)}): take the checkpoint after a step")
        beta1, beta2 = (float(b) for b in group["betas"])
        spec = run("adam", beta1=beta1, beta2=beta2, eps=float(group["eps"]), eps_root=0.0, bias_correction=True)
        return Checkpoint(w, optax.ScaleByAdamState(count=np.int32(steps.pop()), mu=mu, nu=nu), settings=spec)
    raise ValueError(f"no eosflow optimizer for {type(optimizer).__name__}: use SGD, RMSprop or Adam")
