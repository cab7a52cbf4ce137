"""The live sharpness tracker for a torch model, inside an ordinary PyTorch training loop.

    tracker = eosflow.torch.SharpnessTracker(model, loss_fn, k=3, tol=1e-3)
    for step, batch in enumerate(loader):
        ...                                       # the user's own optimizer step
        if step % 10 == 0:
            eig = tracker.update(batch, optimizer)  # top-k of P^{-1/2} H P^{-1/2} (H for SGD)
            print(step, eig.values[0], eig.edge_ratio)

It runs eosflow's warm-started LOBPCG (:func:`eosflow.spectrum.lobpcg`, jitted, the same code as
the JAX tracker, so the same relative-residual contract ||A x - theta x|| <= tol |theta| per
pair) with one torch call per Hessian-vector product (LOBPCG's loop over the block's unconverged
columns), a backward pass through the update's gradient graph. The preconditioner and the
edge-of-stability threshold are read from the optimizer's state: torch.optim.SGD (momentum,
Nesterov), RMSprop (centered, momentum) and Adam/AdamW (bias-corrected second moment):

    Adam    P = sqrt(v / (1 - beta2^t)) + eps     threshold (2 + 2 beta1) / ((1 - beta1) lr)
    RMSprop P = sqrt(v [- m^2]) + eps             threshold 2 (1 + momentum) / lr
    SGD     P = I                                 threshold 2 (1 + mu) / lr (Nesterov: / (1 + 2 mu))

Weight decay as the optimizer applies it: coupled (``weight_decay`` of SGD, RMSprop and Adam) adds
wd w to the gradient, so the optimizer trains L + wd |w|^2 / 2 and the tracker measures the top of
P^{-1/2} (H + wd I) P^{-1/2}; decoupled (AdamW, or Adam with ``decoupled_weight_decay=True``),
w <- (1 - lr wd) w - lr m_hat / P, leaves H alone and lowers the threshold by 1 - lr wd / 2
(:func:`eosflow.preconditioning.decoupled_decay_factor`).

It measures the loss of the model's modes at each update (BatchNorm in train mode: the batch's
statistics; dropout in train mode is refused) and changes nothing in the model.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.utils import _pytree as pytree

from eosflow.compiled import BoundedJit
from eosflow.objective import check_example_count
from eosflow.precision import precision
from eosflow.preconditioning import (
    MomentumForm,
    decoupled_decay_factor,
    diagonal_preconditioner,
    preconditioned_matvec,
    stability_constant,
)
from eosflow.seeds import seed_key
from eosflow.spectrum import Carry, carried, lobpcg, random_vectors
from eosflow.torch.bridge import host_callback
from eosflow.torch.objective import (
    Batch,
    LinearizedHessian,
    TorchObjective,
    check_pair,
    chunked_products,
    numpy_dtype,
    train_modes,
    trainable,
    unwrapped,
)
from eosflow.tracker import (
    WarmStart,
    check_start_options,
    eigenpairs_of,
    shares_by_block,
    tracked_warm_start,
    warm_start_memory,
)


class Preconditioning(NamedTuple):
    """What an optimizer's state says about its edge, per coordinate of w (d,).

    Each parameter group's step size is folded into P (P lr_max / lr_g), so that one threshold c / lr_max
    holds for every group: the iteration w <- w - lr_g P^{-1} m is w <- w - lr_max (P lr_max / lr_g)^{-1} m.
    """

    diagonal: np.ndarray | None  # (d,) P with the groups' step sizes folded in; None: P = I
    threshold: float  # c / lr_max, before any decoupled decay
    coupled_decay: np.ndarray | None = None  # (d,) wd of coupled weight decay: the curvature is H + diag(wd)
    decoupled_decay: np.ndarray | None = None  # (d,) lr_g wd_g of decoupled decay (AdamW)

    def edge(self, top_vector: np.ndarray) -> float:
        """The threshold along the top eigenvector u of the measured operator: decoupled decay delta
        lowers it by 1 - delta / 2, with delta = sum_i delta_i u_i^2 / |u|^2 (exact for one delta, first
        order in lr wd when groups differ)."""
        if self.decoupled_decay is None:
            return self.threshold
        u2 = np.square(np.asarray(top_vector, dtype=np.float64))
        return self.threshold * decoupled_decay_factor(float(u2 @ self.decoupled_decay / u2.sum()))


class TrackedEigenpairs(NamedTuple):
    values: np.ndarray  # (k,) top eigenvalues of P^{-1/2} H P^{-1/2}, descending
    vectors: torch.Tensor  # (d, k) their eigenvectors u (P^{-1/2} u are those of P^{-1} H)
    residuals: np.ndarray  # (k,) ||A u - theta u|| / |theta|
    hvps: int  # Hessian-vector products spent
    threshold: float  # the optimizer's edge-of-stability threshold (nan without an optimizer)
    adaptive: bool = False  # P estimated from the gradients (Adam, AdamW, RMSprop): a start transient, edge_log
    tol: float = float("nan")  # the tracker's tol: every pair with a residual <= it is converged

    @property
    def converged(self) -> bool:
        """Every residual <= tol (False where LOBPCG stopped at ``max_iters`` first: then the values are Ritz values,
        lower bounds of the top eigenvalues, possibly off by more than tol)."""
        return bool(np.all(self.residuals <= np.asarray(self.tol, self.residuals.dtype)))

    @property
    def sharpness(self) -> float:
        return float(self.values[0])

    @property
    def edge_ratio(self) -> float:
        """Preconditioned sharpness / threshold: 1.0 at the edge of stability."""
        return float(self.values[0] / self.threshold)


def host_array(values: Any) -> np.ndarray:
    """A torch tensor (on any device) or an array as a NumPy array on the host."""
    return values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)


def parameter_shares(model: torch.nn.Module, eig: TrackedEigenpairs) -> dict[str, np.ndarray]:
    """Where the tracked eigenvectors live: for every trainable parameter of ``model`` (by its name in
    ``named_parameters``, the tracker's layout), the share sum_{j in it} u_ij^2 of each unit eigenvector u_i, (k,);
    over the parameters a vector's shares sum to 1."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"eosflow.torch.parameter_shares(model, eig) takes the model first, got {type(model).__name__} "
            "(the JAX one is eosflow.tracker.parameter_shares(eig, params))"
        )
    params = trainable(unwrapped(model))
    vectors = host_array(eigenpairs_of(eig, "eosflow.torch.parameter_shares")[1])
    return shares_by_block(vectors, list(params), [p.numel() for p in params.values()])


def optimizer_preconditioning(optimizer: torch.optim.Optimizer, objective: TorchObjective) -> Preconditioning:
    """P's diagonal (in the flat layout of ``objective``), the threshold and the weight decay, from a torch
    optimizer with any number of parameter groups (their step sizes and weight decays may differ; the
    momentum, which sets c, may not)."""
    if not isinstance(optimizer, torch.optim.SGD | torch.optim.Adam | torch.optim.AdamW | torch.optim.RMSprop):
        raise ValueError(f"no preconditioner known for {type(optimizer).__name__}; use SGD, RMSprop, Adam or AdamW")
    ascending = [index for index, group in enumerate(optimizer.param_groups) if group.get("maximize", False)]
    if ascending:
        raise ValueError(
            f"the optimizer's parameter group(s) {ascending} have maximize = True: they ascend loss_fn, whose edge "
            "is set by the Hessian of -loss_fn. Measure that: give the tracker loss_fn = lambda outputs, targets: "
            "-score(outputs, targets) and an optimizer with maximize = False on it (the same steps)"
        )
    params = dict(objective.model.named_parameters())
    group_of = parameter_groups(optimizer, {name: params[name] for name in objective.names})
    edges = [_parameter_edge(optimizer, *group_of[name], params[name], name) for name in objective.names]
    constants = {(edge.group, edge.c) for edge in edges}
    if len({c for _, c in constants}) > 1:
        listed = ", ".join(f"group {index}: c = {c:g}" for index, c in sorted(constants))
        raise ValueError(
            f"the parameter groups' momenta put their edges at different lr * S ({listed}), so no single "
            "threshold exists: give every group the same momentum (betas[0] for Adam)"
        )
    lr_max = max(edge.lr for edge in edges)
    if not lr_max >= 0:
        raise ValueError(f"the optimizer's largest step size is lr = {lr_max!r}: there is no edge")

    def per_coordinate(value: Callable[[ParameterEdge], Any]) -> np.ndarray:
        """(d,) ``value(edge)`` of each parameter, repeated over its entries, in the objective's layout."""
        return np.concatenate(
            [np.broadcast_to(np.asarray(value(edge), dtype=np.float64), (edge.size,)) for edge in edges]
        )

    if lr_max > 0:
        scale = per_coordinate(lambda edge: lr_max / edge.lr if edge.lr > 0 else np.inf)  # lr = 0: a frozen block
    else:  # every group at lr = 0 (a warmup's first step, a cosine's last): c / lr = inf, each group's own P
        scale = per_coordinate(lambda edge: np.inf if edge.frozen else 1.0)
    if edges[0].P is not None:
        diagonal = per_coordinate(lambda edge: edge.P) * scale
    else:  # SGD: P = I, unless the groups' step sizes differ
        diagonal = None if np.all(scale == 1.0) else scale
    coupled = per_coordinate(lambda edge: edge.coupled_decay)
    decoupled = per_coordinate(lambda edge: edge.lr * edge.decoupled_decay)  # lr_g wd_g
    return Preconditioning(
        diagonal,
        edges[0].c / lr_max if lr_max > 0 else np.inf,
        coupled if coupled.any() else None,
        decoupled if decoupled.any() else None,
    )


def parameter_groups(
    optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]
) -> dict[str, tuple[int, dict]]:
    """(index, group) of the optimizer's parameter group holding each of ``params`` (by name), or a ValueError
    naming those it does not hold."""
    group_of = {id(p): (index, group) for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in group_of]
    if missing:
        raise ValueError(
            f"the optimizer does not hold the model's trainable parameter(s) {', '.join(missing)}: "
            "eosflow measures and steps every parameter that requires grad"
        )
    return {name: group_of[id(p)] for name, p in params.items()}


class ParameterEdge(NamedTuple):
    """What one parameter's group and state say: its step size (SGD's lr (1 - dampening)), the momentum's
    c, its P (None: P = I) and its weight decay, coupled or decoupled."""

    size: int
    group: int  # the index of its parameter group
    lr: float
    c: float
    P: np.ndarray | None  # (size,)
    coupled_decay: float  # wd added to the gradient (L2): the curvature H + wd
    decoupled_decay: float  # wd of w <- (1 - lr wd) w (AdamW)
    frozen: bool = False  # the optimizer never stepped it (lr 0 whatever its group's)


def _parameter_edge(
    optimizer: torch.optim.Optimizer, index: int, group: dict, p: torch.Tensor, name: str
) -> ParameterEdge:
    """:class:`ParameterEdge` of parameter ``p`` (called ``name``) of group ``index``. SGD's dampening tau
    scales its step: lr (1 - tau) is the classical one."""
    lr, decay, state = float(group["lr"]), float(group.get("weight_decay", 0.0)), optimizer.state.get(p, {})
    if isinstance(optimizer, torch.optim.SGD):
        momentum = float(group.get("momentum", 0.0))
        form: MomentumForm = "nesterov" if group.get("nesterov", False) else "classical"
        dampening = float(group.get("dampening", 0.0)) if momentum else 0.0
        return ParameterEdge(
            p.numel(), index, lr * (1.0 - dampening), stability_constant(momentum, form), None, decay, 0.0
        )
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        beta1, beta2 = group["betas"]
        c = stability_constant(float(beta1), "ema")
    else:  # RMSprop
        c = stability_constant(float(group.get("momentum", 0.0)), "classical")
    if never_stepped(optimizer, p):  # it does not move: frozen, as a group at lr = 0
        return ParameterEdge(p.numel(), index, 0.0, c, np.ones(p.numel()), 0.0, 0.0, frozen=True)
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        # AMSGrad divides by the running max of the raw nu, then bias-corrects: P = sqrt(max nu / (1 - b2^t)) + eps
        nu, steps = state_buffer(state, "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq", name)
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))
        P = np.asarray(diagonal_preconditioner(nu, eps=group["eps"], bias_correction=1 - float(beta2) ** steps))
        return ParameterEdge(p.numel(), index, lr, c, P, 0.0 if decoupled else decay, decay if decoupled else 0.0)
    nu, _ = state_buffer(state, "square_avg", name)
    if group.get("centered", False):
        nu = nu - state_buffer(state, "grad_avg", name)[0] ** 2
    P = np.asarray(diagonal_preconditioner(nu, eps=group["eps"]))
    return ParameterEdge(p.numel(), index, lr, c, P, decay, 0.0)


def never_stepped(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    """The optimizer has stepped, never ``p``: torch's optimizers skip a parameter whose grad is None (one the
    loss they train does not use), which then holds no state."""
    return not optimizer.state.get(p) and any(optimizer.state.values())


def state_buffer(state: dict, key: str, name: str) -> tuple[np.ndarray, float]:
    """One state buffer of a parameter, flattened, and its step count."""
    if key not in state:
        raise ValueError(
            f"the optimizer has no `{key}` for parameter {name!r} yet: it has taken no step (call update, or take "
            "the checkpoint, after one)"
        )
    steps = float(state["step"]) if "step" in state else 0.0
    return state[key].detach().reshape(-1).cpu().numpy(), steps


_TRACKERS: weakref.WeakValueDictionary[int, SharpnessTracker] = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


def _tracker_hvp_block(token: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The HVPs of the tracker ``token`` names (a solver's host callback), at the w of its update."""
    return _TRACKERS[int(token)]._hvp_block(vectors)


def _solve(token, initial, diagonal, coupled_decay, tol: float, max_iters: int):
    """LOBPCG on the (preconditioned) Hessian of the tracker ``token`` names; coupled_decay (d,): H + diag(wd).
    The products are at the w of the tracker's update, held in torch: each callback carries only its columns."""

    def hvp_block(vectors: jax.Array) -> jax.Array:
        return host_callback(
            _tracker_hvp_block, vectors.shape, np.dtype(vectors.dtype), token, vectors, vmap_method="sequential"
        )

    matvec = preconditioned_matvec(lambda v: hvp_block(v) + coupled_decay[:, None] * v, diagonal)
    return lobpcg(matvec, initial, tol=tol, max_iters=max_iters)


# Every tracker's solver, compiled per size, dtype, tol and max_iters and shared (the tracker is an argument, its
# token), so a new tracker on a model of a size seen before compiles nothing (about 0.6 s on a small MLP); the 8
# most recently used programs are kept, as eosflow's other compilations (eosflow.compiled).
solve = BoundedJit(_solve, kept=8)
# the start of a warm_start other than "previous", compiled per size, dtype, k and rule, shared as the solver
tracked_start = BoundedJit(tracked_warm_start, kept=8)


class SharpnessTracker:
    """Top-k eigenpairs of a torch model's (preconditioned) Hessian, warm-started call to call.

    Args:
        model, loss_fn: the model and ``loss_fn(outputs, targets) -> scalar``.
        k: number of eigenpairs; tol: relative residual per pair; max_iters: LOBPCG iterations.
        seed: of the random initial block.
        microbatch: evaluate the HVPs on chunks of this many rows of the batch, H = sum_c (n_c / N) H_c
            (one chunk's activations in memory; the loss must be a mean over examples, checked on the
            first update). None: the whole batch at once.
        carry: what an update leaves the next to start from (``vectors``): ``"power"``, each Ritz vector u moved by
            one power step A u / |A u| of the measured operator A = P^{-1/2} (H + wd) P^{-1/2}
            (:func:`eosflow.spectrum.power_step`, no HVP: LOBPCG returns A u), or ``"ritz"``, u itself. The
            reported eigenpairs are the Ritz pairs either way.
        warm_start: where an update's LOBPCG starts (:func:`eosflow.tracker.gd_warm_start` of what the last 1, 2,
            4 or 6 updates left, as the JAX tracker's): ``"fitted"``, when the parameters bounce between updates (those
            of the update two back are nearer than the last's, as GD's at the edge of stability) what the update
            two back left, on the same side of the orbit, else the last one's, moved on by its last change damped
            by the fitted factor; ``"same_side"`` and ``"extrapolated"`` (undamped) likewise; ``"previous"``, what
            the last update left. Any interval between updates: the steps are those between them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Any,
        k: int = 1,
        tol: float = 1e-3,
        max_iters: int = 30,
        seed: int = 0,
        microbatch: int | None = None,
        carry: Carry = "power",
        warm_start: WarmStart = "fitted",
    ):
        check_example_count(microbatch, "microbatch")
        check_start_options(warm_start, carry)
        self.microbatch, self.carry, self.warm_start = microbatch, carry, warm_start
        self.k, self.tol, self.max_iters, self.seed = k, tol, max_iters, seed
        self._start(TorchObjective(model, loss_fn, batch=(None, None)))
        self._batch: Batch | None = None  # these three are set inside update(), for its products
        self._w: torch.Tensor | None = None
        self._hessian: LinearizedHessian | None = None
        self._token = next(_TOKENS)  # this tracker in the callbacks of the solver it shares with others
        _TRACKERS[self._token] = self

    def _start(self, objective: TorchObjective) -> None:
        """Measure ``objective``'s parameters from the random initial block (seeded): at construction, and
        when the model's trainable parameters change."""
        if not 1 <= self.k <= objective.dim:
            raise ValueError(f"k = {self.k} must be between 1 and the parameter count {objective.dim}")
        self.objective = objective
        self.dtype = dtype = numpy_dtype(objective.dtype)
        with precision(dtype):  # the model's precision, scoped (the caller's JAX config is left alone)
            # what the next update starts from (d, k; through ``warm_start``): random, then what each update carries
            self.vectors = random_vectors(seed_key(self.seed), objective.dim, self.k, dtype)
            # warm_start's history: the measurements before the last one, and the last parameters and step (read from
            # the third update on: zeros until the first)
            self._older, self._params = warm_start_memory(
                self.vectors, jnp.zeros(objective.dim, dtype), self.warm_start
            )
        self._count = 0  # updates since the start: the first two cannot tell a bounce
        self._checked: tuple | None = None  # the model's modes and the batch's dtypes at the last objective.check

    def _follow_trainable(self) -> None:
        """Start again, with a warning naming what changed, if parameters were frozen or unfrozen since the
        last update (``requires_grad``: the tracker measures what the optimizer steps)."""
        old = self.objective
        params = trainable(old.model)
        dtypes = {p.dtype for p in params.values()}
        if tuple(params) == old.names and dtypes == {old.dtype}:
            return
        added = [name for name in params if name not in old.names]
        removed = [name for name in old.names if name not in params]
        changes = [f"{what}: {', '.join(which)}" for what, which in (("unfrozen", added), ("frozen", removed)) if which]
        if dtypes != {old.dtype}:
            changes.append(f"dtype {old.dtype} -> {', '.join(sorted(map(str, dtypes)))}")
        self._start(TorchObjective(old.model, old.loss_fn, old.batch, old.example_axis))
        warnings.warn(
            f"the model's trainable parameters changed ({'; '.join(changes)}): the tracker now measures the "
            f"Hessian over the {self.objective.dim} entries of the new set, from a random start (its eigenvectors "
            "have that length)",
            stacklevel=3,
        )

    def state_dict(self) -> dict[str, Any]:
        """What the next update starts from, to save beside the model's and the optimizer's ``state_dict()``:
        the carried vectors (d, k), the warm start's history (h, d, k) and last parameters and step (2, d), as CPU
        tensors (copies), the count of updates, and what they fit (the trainable parameters' names, ``warm_start``,
        ``carry``). Tensors, ints and strings only: ``torch.load``'s ``weights_only`` reads it."""
        return {
            "parameters": list(self._parameter_names()),
            "warm_start": self.warm_start,
            "carry": self.carry,
            "updates": self._count,
            **{name: torch.from_numpy(np.array(value)) for name, value in self._arrays().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (a :meth:`state_dict`): the next update is the one the saved tracker would have
        made, bitwise, at the same parameters and batch. A state of other parameters, another ``warm_start`` or
        ``carry``, k or dtype is refused with a ValueError naming the entry; nothing is changed then."""
        self._follow_trainable()
        arrays = self._arrays()
        entries = {"parameters", "warm_start", "carry", "updates", *arrays}
        if missing := sorted(entries - set(state)):
            raise ValueError(f"SharpnessTracker.load_state_dict: the state has no {', '.join(missing)}")
        names, ours = tuple(state["parameters"]), self._parameter_names()
        if names != ours:
            saved_only, ours_only = [n for n in names if n not in ours], [n for n in ours if n not in names]
            raise ValueError(
                "SharpnessTracker.load_state_dict: the state was saved for other trainable parameters (saved only: "
                f"{', '.join(saved_only) or 'none'}; this model's only: {', '.join(ours_only) or 'none'}"
                f"{'' if saved_only or ours_only else '; the same names in another order'})"
            )
        for option in ("warm_start", "carry"):
            if state[option] != getattr(self, option):
                raise ValueError(
                    f"SharpnessTracker.load_state_dict: the state was saved with {option}={state[option]!r}, this "
                    f"tracker has {option}={getattr(self, option)!r} (construct it with the saved one)"
                )
        loaded = {}
        for name, current in arrays.items():
            value = state[name].detach().cpu().numpy() if torch.is_tensor(state[name]) else np.asarray(state[name])
            if value.shape != current.shape or value.dtype != current.dtype:
                raise ValueError(
                    f"SharpnessTracker.load_state_dict: {name!r} is {value.dtype} of shape {value.shape}, this "
                    f"tracker's is {current.dtype} of shape {current.shape} (d = {self.objective.dim} parameters, "
                    f"k = {self.k} pairs, the model's dtype)"
                )
            loaded[name] = value
        with precision(self.dtype):
            self.vectors, self._older, self._params = (jnp.asarray(loaded[n]) for n in ("vectors", "older", "params"))
        self._count = int(state["updates"])

    def _parameter_names(self) -> tuple[str, ...]:
        """The measured parameters' names in the module that a ``torch.compile``, ``DataParallel`` or DDP wrapper
        runs (their order and layout in w are the same): a state saved with or without the wrapper fits both."""
        model: Any = self.objective.model
        prefix = ""
        while True:
            if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
                model, prefix = model._orig_mod, prefix + "_orig_mod."
            elif isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
                model, prefix = model.module, prefix + "module."
            else:
                return tuple(name.removeprefix(prefix) for name in self.objective.names)

    def _arrays(self) -> dict[str, Any]:
        """The warm start's arrays, by their names in :meth:`state_dict`."""
        return {"vectors": self.vectors, "older": self._older, "params": self._params}

    def _hvp_block(self, vectors: np.ndarray) -> np.ndarray:
        v_t = torch.from_numpy(np.require(vectors, requirements="W")).to(self.objective.device)
        batch, w_t = self._batch, self._w
        assert batch is not None and w_t is not None, "HVPs are taken inside update(), which sets the batch and w"
        if self._hessian is not None:  # the update's gradient graph, built once at its w
            return self._hessian(v_t).detach().cpu().numpy()
        return chunked_products(self.objective.hvp_batch, w_t, v_t, batch, self.microbatch).detach().cpu().numpy()

    def update(self, batch: Batch, optimizer: torch.optim.Optimizer | None = None) -> TrackedEigenpairs:
        """Measure at the model's current parameters on ``batch``, in its current train/eval modes
        (BatchNorm in train mode: the loss with the batch's statistics); warm-starts the next call.
        The model is not changed."""
        check_pair(batch, "SharpnessTracker.update's batch (its first argument: update((x, y), optimizer))")
        self._follow_trainable()
        objective = self.objective
        modes = train_modes(objective.model)
        # the first update, the model's modes changed (a different loss), or a batch of other dtypes (a float64 batch
        # of a float32 model fails with a message that names neither)
        checked = (modes, tuple(leaf.dtype for leaf in pytree.tree_leaves(batch) if torch.is_tensor(leaf)))
        if checked != self._checked:
            objective.check(batch)
            objective.check_microbatch_mean(batch, self.microbatch)
            self._checked = checked
        w_t = objective.flat_parameters()
        w = w_t.cpu().numpy()
        if optimizer is None:
            preconditioning = Preconditioning(None, float("nan"))
        else:
            preconditioning = optimizer_preconditioning(optimizer, objective)
        diagonal = np.ones_like(w) if preconditioning.diagonal is None else preconditioning.diagonal.astype(w.dtype)
        coupled = (
            np.zeros_like(w) if preconditioning.coupled_decay is None else preconditioning.coupled_decay.astype(w.dtype)
        )
        self._batch, self._w = batch, w_t
        # without a microbatch the whole batch's gradient graph is held for the update's products; with one, each
        # product recomputes its chunks (one chunk's activations at a time)
        self._hessian = objective.linearized(w_t, batch) if self.microbatch is None else None
        try:
            with precision(self.dtype):  # (blocking: the callbacks read the batch, dispatch is asynchronous)
                token = jnp.asarray(self._token, jnp.int32)
                start, older, params = self.vectors, self._older, self._params
                if self.warm_start != "previous":
                    count = jnp.asarray(self._count, jnp.int32)
                    start, older, params = tracked_start(start, older, params, jnp.asarray(w), count, self.warm_start)
                arrays = (start, jnp.asarray(diagonal), jnp.asarray(coupled))
                pairs = jax.block_until_ready(solve(token, *arrays, self.tol, self.max_iters))
                self._count += 1
                if np.all(np.isfinite(pairs.vectors)):
                    # the images are A u under the measured operator (the preconditioned one): the step stays in
                    # its space
                    self.vectors = carried(pairs, self.carry)
                    self._older, self._params = older, params
                else:
                    warnings.warn(
                        "SharpnessTracker.update: the measurement is not finite (a NaN or inf in the parameters, "
                        "the batch or the loss); its reading is NaN, and the next update starts from the last "
                        "finite one",
                        stacklevel=2,
                    )
        finally:
            self._batch = self._w = self._hessian = None
        vectors = torch.from_numpy(np.array(pairs.vectors)).to(objective.device)
        return TrackedEigenpairs(
            np.asarray(pairs.values),
            vectors,
            np.asarray(pairs.residuals),
            int(pairs.hvps),
            preconditioning.edge(np.asarray(pairs.vectors)[:, 0]),
            isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW | torch.optim.RMSprop),
            self.tol,
        )
