"""The live sharpness tracker for a torch model, inside an ordinary PyTorch training loop.

    tracker = eosflow.torch.SharpnessTracker(model, loss_fn, k=3, tol=1e-3)
    for step, batch in enumerate(loader):
        ...                                       # the user's own optimizer step
        if step % 10 == 0:
            eig = tracker.update(batch, optimizer)  # top-k of P^{-1/2} H P^{-1/2} (H for SGD)
            print(step, eig.values[0], eig.edge_ratio)

It runs eosflow's warm-started LOBPCG (:func:`eosflow.spectrum.lobpcg`, jitted, the same code as
the JAX tracker, so the same relative-residual contract ||A x - theta x|| <= tol |theta| per
pair) with one torch call per iteration for the block of Hessian-vector products (vmapped
double backward). The preconditioner and the edge-of-stability threshold are read from the
optimizer's state: torch.optim.SGD (momentum, Nesterov), RMSprop (centered, momentum) and
Adam/AdamW (bias-corrected second moment):

    Adam    P = sqrt(v / (1 - beta2^t)) + eps     threshold (2 + 2 beta1) / ((1 - beta1) lr)
    RMSprop P = sqrt(v [- m^2]) + eps             threshold 2 (1 + momentum) / lr
    SGD     P = I                                 threshold 2 (1 + mu) / lr (Nesterov: / (1 + 2 mu))

It measures the loss of the model's modes at each update (BatchNorm in train mode: the batch's
statistics; dropout in train mode is refused) and changes nothing in the model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch.utils import _pytree as pytree

from eosflow.objective import check_example_count, check_mean_over_examples
from eosflow.precision import precision
from eosflow.preconditioning import MomentumForm, diagonal_preconditioner, edge_threshold, preconditioned_matvec
from eosflow.spectrum import lobpcg, random_vectors
from eosflow.torch.bridge import host_callback
from eosflow.torch.objective import Batch, TorchObjective, train_modes


class Preconditioning(NamedTuple):
    """What an optimizer's state says about its edge: P's diagonal (d,) and the threshold c / lr."""

    diagonal: np.ndarray | None  # None: P = I
    threshold: float


class TrackedEigenpairs(NamedTuple):
    values: np.ndarray  # (k,) top eigenvalues of P^{-1/2} H P^{-1/2}, descending
    vectors: torch.Tensor  # (d, k) their eigenvectors u (P^{-1/2} u are those of P^{-1} H)
    residuals: np.ndarray  # (k,) ||A u - theta u|| / |theta|
    hvps: int  # Hessian-vector products spent
    threshold: float  # the optimizer's edge-of-stability threshold (nan without an optimizer)

    @property
    def sharpness(self) -> float:
        return float(self.values[0])

    @property
    def edge_ratio(self) -> float:
        """Preconditioned sharpness / threshold: 1.0 at the edge of stability."""
        return float(self.values[0] / self.threshold)


def optimizer_preconditioning(optimizer: torch.optim.Optimizer, objective: TorchObjective) -> Preconditioning:
    """P's diagonal (in the flat layout of ``objective``) and the threshold, from a torch optimizer."""
    if len(optimizer.param_groups) != 1:
        raise ValueError(
            "the tracker reads optimizers with one parameter group (got "
            f"{len(optimizer.param_groups)}); step sizes per group have no single threshold"
        )
    group = optimizer.param_groups[0]
    by_tensor = {id(p): name for name, p in objective.model.named_parameters() if name in objective.names}
    params = [p for p in group["params"] if id(p) in by_tensor]
    if len(params) != len(objective.names):
        raise ValueError("the optimizer does not hold exactly the model's trainable parameters")
    lr = float(group["lr"])
    if isinstance(optimizer, torch.optim.SGD):
        momentum = float(group.get("momentum", 0.0))
        form: MomentumForm = "nesterov" if group.get("nesterov", False) else "classical"
        return Preconditioning(None, edge_threshold(lr, momentum, form))
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        beta1, beta2 = group["betas"]
        if group.get("amsgrad", False):
            raise ValueError("AMSGrad's preconditioner (a running max) is not supported")
        nu, steps = _state(optimizer, objective, "exp_avg_sq")
        return Preconditioning(
            np.asarray(diagonal_preconditioner(nu, eps=group["eps"], bias_correction=1 - beta2**steps)),
            edge_threshold(lr, float(beta1), "ema"),
        )
    if isinstance(optimizer, torch.optim.RMSprop):
        nu, _ = _state(optimizer, objective, "square_avg")
        if group.get("centered", False):
            nu = nu - _state(optimizer, objective, "grad_avg")[0] ** 2
        return Preconditioning(
            np.asarray(diagonal_preconditioner(nu, eps=group["eps"])),
            edge_threshold(lr, float(group.get("momentum", 0.0)), "classical"),
        )
    raise ValueError(f"no preconditioner known for {type(optimizer).__name__}; use SGD, RMSprop, Adam or AdamW")


def _state(optimizer: torch.optim.Optimizer, objective: TorchObjective, key: str) -> tuple[np.ndarray, float]:
    """One state buffer of every parameter, flattened in the objective's layout, and the step count."""
    pieces, steps = [], 0.0
    params = dict(objective.model.named_parameters())
    for name in objective.names:
        p = params[name]
        state = optimizer.state.get(p, {})
        if key not in state:
            raise ValueError(
                f"the optimizer has no `{key}` for parameter {name!r} yet: call update after its first step"
            )
        pieces.append(state[key].detach().reshape(-1).cpu().numpy())
        steps = float(state["step"]) if "step" in state else steps
    return np.concatenate(pieces), steps


def leading_size(batch: Batch) -> int:
    """N, the leading size every tensor of the batch shares (a ValueError naming the sizes otherwise)."""
    sizes = {leaf.shape[0] for leaf in pytree.tree_leaves(batch) if torch.is_tensor(leaf) and leaf.dim()}
    if len(sizes) != 1:
        raise ValueError(
            f"microbatch splits the batch's rows, but its tensors have leading sizes {sorted(sizes)}: give a "
            "batch whose tensors share their leading (example) axis, or no microbatch"
        )
    return sizes.pop()


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows start..stop-1 of every tensor of the batch."""
    return pytree.tree_map(lambda t: t[start:stop] if torch.is_tensor(t) else t, batch)


def row_chunks(batch: Batch, size: int) -> list[tuple[float, Batch]]:
    """[(n_c / N, rows of chunk c)] over consecutive chunks of ``size`` rows of the batch."""
    n = leading_size(batch)
    return [(min(size, n - start) / n, rows(batch, start, start + size)) for start in range(0, n, size)]


class SharpnessTracker:
    """Top-k eigenpairs of a torch model's (preconditioned) Hessian, warm-started call to call.

    Args:
        model, loss_fn: the model and ``loss_fn(outputs, targets) -> scalar``.
        k: number of eigenpairs; tol: relative residual per pair; max_iters: LOBPCG iterations.
        seed: of the random initial block.
        microbatch: evaluate the HVPs on chunks of this many rows of the batch, H = sum_c (n_c / N) H_c
            (one chunk's activations in memory; the loss must be a mean over examples, checked on the
            first update). None: the whole batch at once.
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
    ):
        check_example_count(microbatch, "microbatch")
        self.microbatch = microbatch
        self.objective = TorchObjective(model, loss_fn, batch=(None, None))
        if not 1 <= k <= self.objective.dim:
            raise ValueError(f"k = {k} must be between 1 and the parameter count {self.objective.dim}")
        self.k, self.tol, self.max_iters = k, tol, max_iters
        self.dtype = dtype = np.dtype(str(self.objective.dtype).removeprefix("torch."))
        with precision(dtype):  # the model's precision, scoped (the caller's JAX config is left alone)
            self.vectors = random_vectors(jax.random.PRNGKey(seed), self.objective.dim, k, dtype)
        self._batch: Batch | None = None
        self._checked: tuple[bool, ...] | None = None  # the model's modes at the last objective.check

        def hvp_block(w: jax.Array, vectors: jax.Array) -> jax.Array:
            return host_callback(self._hvp_block, vectors.shape, dtype, w, vectors, vmap_method="sequential")

        def solve(w, initial, diagonal):
            matvec = preconditioned_matvec(lambda v: hvp_block(w, v), diagonal)
            return lobpcg(matvec, initial, tol=self.tol, max_iters=self.max_iters)

        self._solve = jax.jit(solve)

    def _hvp_block(self, w: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        device = self.objective.device
        w_t = torch.from_numpy(np.require(w, requirements="W")).to(device)
        v_t = torch.from_numpy(np.require(vectors, requirements="W")).to(device)
        batch = self._batch
        assert batch is not None, "HVPs are taken inside update(), which sets the batch"
        chunks = [(1.0, batch)] if self.microbatch is None else row_chunks(batch, self.microbatch)
        image = torch.zeros_like(v_t)
        for weight, chunk in chunks:
            image += weight * self.objective.hvp_batch(w_t, v_t, chunk)
        return image.detach().cpu().numpy()

    def update(self, batch: Batch, optimizer: torch.optim.Optimizer | None = None) -> TrackedEigenpairs:
        """Measure at the model's current parameters on ``batch``, in its current train/eval modes
        (BatchNorm in train mode: the loss with the batch's statistics); warm-starts the next call.
        The model is not changed."""
        objective = self.objective
        modes = train_modes(objective.model)
        if modes != self._checked:  # the first update, or the model's modes changed: a different loss
            objective.check(batch)
            if self.microbatch is not None and leading_size(batch) >= 4:
                start = objective.flat_parameters()
                check_mean_over_examples(lambda a, b: float(objective.value(start, rows(batch, a, b))), "microbatch")
            self._checked = modes
        w = objective.flat_parameters().cpu().numpy()
        if optimizer is None:
            preconditioning = Preconditioning(None, float("nan"))
        else:
            preconditioning = optimizer_preconditioning(optimizer, objective)
        diagonal = np.ones_like(w) if preconditioning.diagonal is None else preconditioning.diagonal.astype(w.dtype)
        self._batch = batch
        try:
            with precision(self.dtype):  # (blocking: the callbacks read the batch, dispatch is asynchronous)
                pairs = jax.block_until_ready(self._solve(jnp.asarray(w), self.vectors, jnp.asarray(diagonal)))
        finally:
            self._batch = None
        self.vectors = pairs.vectors
        vectors = torch.from_numpy(np.array(pairs.vectors)).to(objective.device)
        return TrackedEigenpairs(
            np.asarray(pairs.values), vectors, np.asarray(pairs.residuals), int(pairs.hvps), preconditioning.threshold
        )
