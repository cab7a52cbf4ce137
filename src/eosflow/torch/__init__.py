"""PyTorch models in eosflow (``pip install eosflow[torch]``).

    objective = eosflow.torch.Objective(model, loss_fn, (inputs, targets))
    problem = eosflow.torch.problem(model, loss_fn, (inputs, targets))   # for eosflow.simulate
    tracker = eosflow.torch.SharpnessTracker(model, loss_fn, k=3, tol=1e-3)
    start = eosflow.torch.checkpoint(model, optimizer)    # for eosflow.anchored.anchored(..., start=start)
    value, _ = eosflow.torch.batch_sharpness(model, loss_fn, batches)   # E[g^T H g] / E[|g|^2] over batches
    H = eosflow.torch.hessian_operator(model, loss_fn, (inputs, targets))  # a scipy LinearOperator (eigsh, SLQ)
    G = eosflow.torch.gauss_newton_operator(model, loss_fn, (inputs, targets))  # J^T H_out J, the same way
    prediction = eosflow.torch.edge_prediction(model, loss_fn, batch, eig, lr)  # the central flow's X at GD's iterate

See docs/torch.md.
"""

from eosflow.torch.batch_sharpness import batch_sharpness
from eosflow.torch.bridge import jax_loss, jax_loss_on, problem, to_jax
from eosflow.torch.checkpoint import checkpoint
from eosflow.torch.edge_prediction import edge_offsets, edge_prediction, midpoint
from eosflow.torch.hessian_operator import TorchCurvatureOperator, gauss_newton_operator, hessian_operator
from eosflow.torch.objective import TorchObjective
from eosflow.torch.objective import TorchObjective as Objective
from eosflow.torch.tracker import SharpnessTracker, TrackedEigenpairs, optimizer_preconditioning, parameter_shares

__all__ = [
    "Objective",
    "SharpnessTracker",
    "TorchCurvatureOperator",
    "TorchObjective",
    "TrackedEigenpairs",
    "batch_sharpness",
    "checkpoint",
    "edge_offsets",
    "edge_prediction",
    "gauss_newton_operator",
    "hessian_operator",
    "jax_loss",
    "jax_loss_on",
    "midpoint",
    "optimizer_preconditioning",
    "parameter_shares",
    "problem",
    "to_jax",
]
