"""eosflow's RMSProp central flow beside the official PyTorch implementation (Cohen, Damian et al.).

    PYTHONPATH=src python benchmarks/rmsprop_central_flow_reference.py /path/to/centralflows [--steps 400]

The reference repository is NOT part of eosflow: fetch it yourself (github.com/centralflows/centralflows)
and pass the directory holding its ``src/``. Both sides integrate the same loss (a float64 tanh network
on fixed synthetic data, written once in PyTorch and once in JAX), from the same w0, with the same
hyperparameters (lr, beta2, eps, no bias correction), 4 Euler substeps per step, the same critical
threshold (1.95 in the reference's units lr * lambda(P^-1 H), margin 0.025 here) and the reference's
nu convention (``moments = "reference"``: dnu/dt = ((1 - b2)/b2) (s - nu), nu(0) = nu_1). Printed: the
relative distance ||w_ours - w_ref|| / ||w_ref - w0|| and the relative difference of nu every 20 steps,
the RMSProp iterates' edge ratio (to show the flow is at the edge), and the largest over all steps. With
the defaults the flow has no critical direction from step 1 to ~240 (the stable-flow part) and one from
~240 to 400 (the SDCP part): 400 steps test both.

To run the reference on a CPU without CVXOPT, its SDCP (cvxpy) is solved by Clarabel with tight tolerances
and ``Tensor.cuda`` is made the identity (casting X back to float64): nothing else of it is changed.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

IN, HIDDEN, OUT, N = 5, 8, 2, 64


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, IN))
    y = np.tanh(x @ rng.standard_normal((IN, OUT)))
    w0 = np.concatenate(
        [rng.standard_normal(IN * HIDDEN) / np.sqrt(IN), rng.standard_normal(HIDDEN * OUT) / np.sqrt(HIDDEN)]
    )
    return x, y, w0


def loss_fn(lib, x, y):
    """L(w) = mean_i 1/2 |W2 tanh(W1 x_i) - y_i|^2 for a flat w = (W1, W2), in numpy-like ``lib``."""

    def loss(w):
        w1 = w[: IN * HIDDEN].reshape(IN, HIDDEN)
        w2 = w[IN * HIDDEN :].reshape(HIDDEN, OUT)
        residual = lib.tanh(x @ w1) @ w2 - y
        return 0.5 * (residual**2).sum(-1).mean()

    return loss


def ours(x, y, w0, lr, beta2, eps, steps):
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from eosflow.flows.moments import ContinuousMoments
    from eosflow.flows.preconditioned_central import (
        PreconditionedCentralFlow,
        PreconditionedCentralOptions,
    )
    from eosflow.objective import Objective
    from eosflow.optim.adaptive import AdaptiveOptimizer, RMSPropOptions
    from eosflow.spec import SpectrumSpec

    objective = Objective.from_function(loss_fn(jnp, jnp.asarray(x), jnp.asarray(y)))
    rule = RMSPropOptions(beta2=beta2, eps=eps).rule()
    spectrum = SpectrumSpec(every=1, k=1, k_max=4, tol=1e-10, max_iters=100)
    options = PreconditionedCentralOptions(
        substeps=4, max_substeps=4, margin=0.025, moments="reference", free_method="euler", pair_gradients="substep"
    )
    flow = PreconditionedCentralFlow(
        name="rmsprop_central_flow",
        lr=lr,
        spectrum=spectrum,
        key=jax.random.PRNGKey(0),
        objective=objective,
        moments=ContinuousMoments(rule, lr, "reference"),
        options=options,
    )
    w0 = jnp.asarray(w0)
    state, rows = flow.advance(flow.init(w0), steps)
    optimizer = AdaptiveOptimizer(
        name="rmsprop", lr=lr, spectrum=spectrum, key=jax.random.PRNGKey(0), objective=objective, rule=rule
    )
    _, discrete = optimizer.advance(optimizer.init(w0), steps)
    positions = np.concatenate([np.asarray(rows["position"]), np.asarray(state.z.phase.w)[None]])
    losses = {"ours": np.asarray(rows["predicted_loss"]), "rmsprop": np.asarray(discrete["loss"])}
    return (
        positions,
        np.asarray(state.z.phase.nu),
        np.asarray(discrete["edge_ratio"]),
        np.asarray(rows["critical"]),
        losses,
    )


def reference(repo: str, x, y, w0, lr, beta2, eps, steps):
    import cvxpy
    import torch

    sys.path.insert(0, repo)
    if "datasets" not in sys.modules:  # its src/datasets.py imports Hugging Face's, unused here
        import types

        sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self.to(torch.float64)  # CPU, and X back to float64
    from src import sdcp as reference_sdcp
    from src.loss_function import LossFunction
    from src.processes import CentralFlow, CentralFlowConfig, EigConfig
    from src.update_rules import RMSProp

    solve = cvxpy.Problem.solve

    def clarabel(problem, *args, **kwargs):  # CVXOPT is not installed: the same convex problem, by Clarabel
        return solve(problem, solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)

    reference_sdcp.cp.Problem.solve = clarabel
    torch.set_default_dtype(torch.float64)
    loss = loss_fn(torch, torch.as_tensor(x), torch.as_tensor(y))
    opt = RMSProp(lr=lr, beta2=beta2, eps=eps, bias_correction=False)
    w = torch.as_tensor(w0)
    process = CentralFlow(
        opt=opt,
        loss_fn=LossFunction(loss),
        w=w,
        state=opt.initialize_state(w),
        eig_config=EigConfig(frequency=1, track_threshold=1.5, initial_neigs=1, tol=1e-10),
        config=CentralFlowConfig(nsubsteps=4, sdcp_threshold=1.95),
    )
    positions, predicted = [process.w.detach().numpy().copy()], []
    for _ in range(steps):
        process.prepare()
        # its CentralFlowPredictionLogger's time-averaged loss: L(w) + tr X (U^T P U = I, H U = 2 P U)
        predicted.append(float(process.loss) + float(process.X.sum()))
        process.step()
        positions.append(process.w.detach().numpy().copy())
    nu = opt.unflatten(process.state)["nu"].detach().numpy()
    return np.stack(positions), nu, np.asarray(predicted)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("repo", help="the directory of the fetched centralflows repository (holding src/)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.008)
    parser.add_argument("--beta2", type=float, default=0.99)
    parser.add_argument("--eps", type=float, default=3e-3)
    args = parser.parse_args()
    x, y, w0 = data()
    mine, nu_mine, edge, critical, losses = ours(x, y, w0, args.lr, args.beta2, args.eps, args.steps)
    theirs, nu_theirs, predicted_ref = reference(args.repo, x, y, w0, args.lr, args.beta2, args.eps, args.steps)
    travelled = np.linalg.norm(theirs - w0, axis=1)
    relative = np.linalg.norm(mine - theirs, axis=1) / np.maximum(travelled, 1e-300)
    print(f"lr = {args.lr}, beta2 = {args.beta2}, eps = {args.eps}, {args.steps} steps, d = {w0.size}")
    print("step  |w_ours - w_ref| / |w_ref - w0|  RMSProp edge ratio  critical directions (ours)")
    for t in range(0, args.steps + 1, 20):
        e = edge[t] if t < edge.size else float("nan")
        c = critical[t] if t < critical.size else -1
        print(f"{t:4d}  {relative[t]:.3e}  {e:.4f}  {c}")
    print(f"largest relative distance over steps 1..{args.steps}: {np.max(relative[1:]):.3e}")
    nu_error = np.linalg.norm(nu_mine - nu_theirs) / np.linalg.norm(nu_theirs)
    print(f"final nu: |nu_ours - nu_ref| / |nu_ref| = {nu_error:.3e}")
    loss_errors(losses["rmsprop"], losses["ours"], predicted_ref, critical)


def loss_errors(loss: np.ndarray, ours: np.ndarray, theirs: np.ndarray, critical: np.ndarray) -> None:
    """Each flow's predicted time-averaged loss against RMSProp's Gaussian-smoothed loss (std 20 steps, as
    ``eosflow compare``), over the steps from which our flow keeps a critical direction, and the floor: RMSProp's
    own loss against its smoothed loss on those steps."""
    from eosflow.compare import gaussian_smooth, relative_l1_error

    n = min(len(loss), len(ours), len(theirs), len(critical))
    stable = np.flatnonzero(critical[:n] == 0)  # the edge part: after the last step without a critical direction
    start = int(stable[-1]) + 1 if stable.size else 0
    if start >= n:
        print("no critical direction at the end: no loss comparison at the edge")
        return
    smooth = gaussian_smooth(loss[:n])
    part = slice(start, n)
    print(f"predicted loss vs RMSProp's smoothed loss, steps {start}..{n - 1} (relative L1):")
    mine, reference = relative_l1_error(ours[part], smooth[part]), relative_l1_error(theirs[part], smooth[part])
    print(
        f"  ours {mine:.3f}, reference {reference:.3f}, "
        f"floor (RMSProp's own loss) {relative_l1_error(loss[part], smooth[part]):.3f}; "
        f"ours vs reference {relative_l1_error(ours[part], theirs[part]):.2e}"
    )


if __name__ == "__main__":
    main()
