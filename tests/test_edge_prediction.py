"""The central flow's reading at a point of a user's loop (eosflow.edge_prediction).

Oracles: GD's exact period-2 orbit of L = 1/2 sum_i (a_i + b_i . y) x_i^2 + c . y in closed form; dense float64
eigh of jax.hessian, its eigenvalues' derivative along -g by central differences and the pair gradients
grad (u_i^T H u_j) by central differences of dense Hessians; the complementarity conditions checked in numpy.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import eosflow
from eosflow import edge_prediction
from eosflow.precision import precision


class Pairs:
    def __init__(self, values, vectors):
        self.values, self.vectors = values, vectors


def valley(a, b, c):
    """L(x, y) = 1/2 sum_i (a_i + b_i . y) x_i^2 + c . y (x in R^m, y in R^q), w = (x, y) flat."""
    m = len(a)

    def loss(w):
        x, y = w[:m], w[m:]
        return 0.5 * jnp.sum((a + b @ y) * x**2) + c @ y

    return loss


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [1, 2])
def test_covariance_is_gds_period_two_orbit_in_closed_form(seed, m):
    """On the valley, GD at lr has the exact period-2 orbit x_i = +-s_i, y = y* with a_i + b_i . y* = 2/lr and
    c + 1/2 B s^2 = 0, so s^2 = -2 B^{-1} c: the prediction at the orbit's centre (x = 0, y*) is X = diag(s^2),
    and its loss L + 1/2 sum X_ii lambda_i is the loss GD has at both points of the orbit; GD's offsets there
    are +-s. Checked by running GD's two steps on the orbit."""
    rng = np.random.default_rng(seed)
    lr = float(rng.uniform(0.05, 0.5))
    with precision("float64"):
        b = -np.abs(rng.normal(1.0, 0.3, (m, m))) - 2.0 * np.eye(m)  # sharpness falls along y: a valley
        s2 = rng.uniform(0.01, 0.2, m)  # the orbit's squared amplitudes
        c = -0.5 * b.T @ s2  # dL/dy = c + 1/2 B^T s^2 = 0 on the orbit
        y = rng.normal(size=m)
        a = 2.0 / lr - b @ y  # every lambda_i = a_i + b_i . y = 2/lr exactly
        loss = valley(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c))
        centre = jnp.concatenate([jnp.zeros(m), jnp.asarray(y)])
        vectors = np.eye(2 * m)[:, :m]
        values = np.full(m, 2.0 / lr)
        prediction = edge_prediction.predict(loss, centre, None, Pairs(values, vectors), lr)
        assert int(prediction.critical) == m
        np.testing.assert_allclose(np.asarray(prediction.covariance), np.diag(s2), rtol=1e-9, atol=1e-12)
        orbit = jnp.concatenate([jnp.sqrt(jnp.asarray(s2)), jnp.asarray(y)])
        step = jax.grad(loss)
        after = orbit - lr * step(orbit)
        np.testing.assert_allclose(after, jnp.concatenate([-orbit[:m], orbit[m:]]), atol=1e-12)  # a 2-cycle
        assert float(prediction.predicted_loss) == pytest.approx(float(loss(orbit)), rel=1e-12)
        assert float(loss(orbit)) == pytest.approx(float(loss(after)), rel=1e-12)
        np.testing.assert_allclose(edge_prediction.offsets(after, orbit, Pairs(values, vectors)), -np.sqrt(s2))
        # below the edge nothing is critical and X = 0; above it the slack must be pulled back by more than X
        lower = edge_prediction.predict(loss, centre, None, Pairs(values, vectors), 0.9 * lr)
        assert int(lower.critical) == 0 and not np.any(np.asarray(lower.covariance))
        assert float(lower.predicted_loss) == float(prediction.loss)


def mlp_loss(sizes, activation, n, seed):
    keys = jax.random.split(jax.random.key(seed), len(sizes) + 1)
    params = [
        (jax.random.normal(k, (i, o)) / np.sqrt(i), 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (o,)))
        for k, i, o in zip(keys[: len(sizes) - 1], sizes[:-1], sizes[1:], strict=True)
    ]
    x = jax.random.normal(keys[-1], (n, sizes[0]))
    y = jnp.sin(x @ jnp.ones((sizes[0], sizes[-1])))

    def loss(params, batch):
        h, target = batch
        for W, bias in params[:-1]:
            h = activation(h @ W + bias)
        W, bias = params[-1]
        return 0.5 * jnp.mean(jnp.sum((h @ W + bias - target) ** 2, axis=-1))

    return loss, params, (x, y)


@pytest.mark.parametrize(
    "sizes,activation,seed,k",
    [((3, 6, 2), jnp.tanh, 0, 1), ((4, 5, 5, 1), jax.nn.softplus, 1, 2), ((2, 8, 3), jnp.tanh, 2, 3)],
)
def test_against_dense_hessians_and_central_differences(sizes, activation, seed, k):
    """On random MLPs (float64) plus a linear term r . w that tilts the gradient up the sharpness (r leaves H and
    D^3 L alone; at a random init the eigenvalues fall along -g and X would be 0): G_ij = grad (u_i^T H u_j) by
    central differences of dense Hessians, coordinate by coordinate; sharpening_i = d lambda_i / dt along -g by
    central differences of dense eigh; with lr putting exactly m of the top k at 2/lr, X solves the SDCP built
    from those G in numpy: X >= 0, Z = alpha + beta[X] >= 0, <X, Z> = 0, X != 0, and the predicted loss is
    L + 1/2 sum X_ii lambda_i."""
    with precision("float64"):
        loss, params, batch = mlp_loss(sizes, activation, 12, seed)
        flat, unravel = ravel_pytree(params)
        hessian = jax.jit(jax.hessian(lambda w: loss(unravel(w), batch)))
        values, vectors = np.linalg.eigh(np.asarray(hessian(flat)))
        values, vectors = values[::-1][:k], vectors[:, ::-1][:, :k]
        rows = [np.asarray(hessian(flat + 1e-5 * e)) - np.asarray(hessian(flat - 1e-5 * e)) for e in np.eye(flat.size)]
        G = np.einsum("cpq,pi,qj->ijc", np.stack(rows) / 2e-5, vectors, vectors)  # (k, k, d)
        rng = np.random.default_rng(seed)
        uphill = sum(rng.uniform(0.5, 1.5) * G[i, i] / np.linalg.norm(G[i, i]) for i in range(k))
        r = jnp.asarray(-3.0 * np.linalg.norm(jax.grad(lambda w: loss(unravel(w), batch))(flat)) * uphill)

        def tilted(params, batch):
            return loss(params, batch) + r @ ravel_pytree(params)[0]

        L = lambda w: tilted(unravel(w), batch)  # noqa: E731
        g = np.asarray(jax.grad(L)(flat))
        h = 1e-5 / np.linalg.norm(g)
        ahead, behind = (np.linalg.eigvalsh(np.asarray(hessian(flat + s * h * g)))[::-1][:k] for s in (-1.0, 1.0))
        for m in range(1, k + 1):
            lr = 2.0 / values[m - 1] * (1 + 1e-9)  # lambda_1..m >= 2/lr > lambda_{m+1}
            p = edge_prediction.predict(tilted, params, batch, Pairs(values, vectors), lr, margin=0.0)
            np.testing.assert_allclose(p.sharpening, (ahead - behind) / (2 * h), rtol=1e-5, atol=1e-7)
            assert int(p.critical) == m and int(p.complete) == int(m < k)
            X = np.asarray(p.covariance)
            assert not np.any(X[m:]) and not np.any(X[:, m:])
            X = X[:m, :m]
            alpha = np.einsum("ijc,c->ij", G[:m, :m], g)
            Z = alpha + 0.5 * np.einsum("ijc,klc,kl->ij", G[:m, :m], G[:m, :m], X)
            scale = np.abs(alpha).max()
            assert np.trace(X) > 0 and np.linalg.eigvalsh(X).min() >= -1e-9 * np.abs(X).max()
            assert np.linalg.eigvalsh(Z).min() >= -1e-6 * scale
            assert abs(np.sum(X * Z)) <= 1e-6 * scale * np.trace(X)
            if m == 1:  # the closed form of self-stabilization
                grad_s = G[0, 0]
                assert X[0, 0] == pytest.approx(-2 * grad_s @ g / (grad_s @ grad_s), rel=1e-6)
            expected = float(L(flat)) + 0.5 * np.sum(np.diag(X) * values[:m])
            assert float(p.predicted_loss) == pytest.approx(expected, rel=1e-12)


def test_an_equinox_module_and_wrt_measure_the_flattened_part():
    """An Equinox MLP measured whole and by its last layer only (wrt): the same numbers as a loss of the flat
    vector of that part, with the rest held fixed."""
    with precision("float64"):
        model = eqx.nn.MLP(3, 2, 5, 1, activation=jnp.tanh, key=jax.random.key(3))
        x = jax.random.normal(jax.random.key(4), (10, 3))
        y = jnp.cos(x[:, :2])

        def loss(model, batch):
            inputs, targets = batch
            return jnp.mean((jax.vmap(model)(inputs) - targets) ** 2)

        last = jax.tree.map(lambda _: False, model)
        last = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), last, replace=(True, True))
        for wrt in (None, last):
            part, rest = eqx.partition(model, eqx.is_inexact_array if wrt is None else wrt)
            flat, unravel = ravel_pytree(part)
            L = lambda w: loss(eqx.combine(unravel(w), rest), (x, y))  # noqa: E731, B023
            values, vectors = np.linalg.eigh(np.asarray(jax.jit(jax.hessian(L))(flat)))
            pairs = Pairs(values[::-1][:2], vectors[:, ::-1][:, :2])
            lr = 2.0 / pairs.values[1] * (1 + 1e-9)
            ours = edge_prediction.predict(loss, model, (x, y), pairs, lr, wrt=wrt)
            oracle = edge_prediction.predict(L, flat, None, pairs, lr)
            for field in ("loss", "sharpening", "covariance", "predicted_loss"):
                np.testing.assert_allclose(getattr(ours, field), getattr(oracle, field), rtol=1e-9, atol=1e-14)
            assert int(ours.critical) == 2


def test_offsets_keep_the_parameters_on_their_device():
    """offsets (with and without P) copies no vector between host and device (jax.transfer_guard disallows every
    transfer once compiled; on a GPU the parameters went to the host and back at every call before), and equals
    U^T P^1/2 (w_t - w_{t-1}) / 2 computed in NumPy."""
    with precision("float64"):
        loss, params, batch = mlp_loss((3, 4, 2), jnp.tanh, 6, 3)
        previous = jax.tree.map(lambda a: a + 0.01 * jnp.cos(a), params)
        size = ravel_pytree(params)[0].size
        eig = Pairs(jnp.ones(2), jnp.asarray(np.linalg.qr(np.random.default_rng(0).normal(size=(size, 2)))[0]))
        P = jax.tree.map(lambda a: 1.0 + a**2, params)
        expected = [
            np.asarray(eig.vectors).T @ (scale * (ravel_pytree(params)[0] - ravel_pytree(previous)[0])) / 2
            for scale in (1.0, np.sqrt(ravel_pytree(P)[0]))
        ]
        for preconditioner, want in zip((None, P), expected, strict=True):
            edge_prediction.offsets(params, previous, eig, preconditioner=preconditioner)  # compiles
            with jax.transfer_guard("disallow"):
                x = edge_prediction.offsets(params, previous, eig, preconditioner=preconditioner)
            np.testing.assert_allclose(x, want, rtol=1e-13)


def test_one_compilation_per_loss_and_shapes():
    """Repeated calls with the same loss function reuse one program (the tracker's loop calls it every step)."""
    loss, params, batch = mlp_loss((3, 4, 1), jnp.tanh, 6, 5)
    flat, unravel = ravel_pytree(params)
    pairs = Pairs(np.array([1.0, 0.5], np.float32), np.eye(flat.size, 2, dtype=np.float32))
    before = set(edge_prediction._compiled.compiled)
    for lr in (0.5, 1.0, 2.0):
        edge_prediction.predict(loss, params, batch, pairs, lr)
    assert len(set(edge_prediction._compiled.compiled) - before) == 1


def test_bad_input_is_named():
    loss, params, batch = mlp_loss((3, 4, 1), jnp.tanh, 6, 5)
    d = ravel_pytree(params)[0].size
    good = Pairs(np.ones(2, np.float32), np.eye(d, 2, dtype=np.float32))
    with pytest.raises(ValueError, match=f"rows, the measured parameters {d}"):
        edge_prediction.predict(loss, params, batch, Pairs(good.values, np.eye(d + 1, 2)), 0.1)
    with pytest.raises(ValueError, match=r"\(k,\) and eig.vectors \(d, k\)"):
        edge_prediction.predict(loss, params, batch, Pairs(np.ones(3), good.vectors), 0.1)
    with pytest.raises(ValueError, match="margin"):
        edge_prediction.predict(loss, params, batch, good, 0.1, margin=1.0)
    with pytest.raises(ValueError, match="lr must be positive"):
        edge_prediction.predict(loss, params, batch, good, 0.0)
    with pytest.raises(ValueError, match="previous 3"):
        edge_prediction.offsets(params, jnp.ones(3), good)
    with pytest.raises(ValueError, match=rf"offsets: eig.vectors is \({d + 1}, 2\), the measured parameters have {d}"):
        edge_prediction.offsets(params, params, Pairs(good.values, np.eye(d + 1, 2)))
    not_pairs = [None, (good.values, good.vectors), {"values": good.values, "vectors": good.vectors}]
    for eig, got in zip(not_pairs, ["NoneType: pass what tracker.update", "tuple", "dict"], strict=True):
        with pytest.raises(TypeError, match=f"edge_prediction: eig must be the eigenpairs .* got {got}"):
            edge_prediction.predict(loss, params, batch, eig, 0.1)
        with pytest.raises(TypeError, match=f"offsets: eig must be the eigenpairs .* got {got}"):
            edge_prediction.offsets(params, params, eig)
    assert eosflow.edge_prediction is edge_prediction


class TorchValley:
    """The valley as a torch module whose output is the loss (the batch is ignored)."""

    def __new__(cls, a, b, c, x, y):
        torch = pytest.importorskip("torch")

        class Valley(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.x = torch.nn.Parameter(torch.tensor(x))
                self.y = torch.nn.Parameter(torch.tensor(y))
                self.a, self.b, self.c = map(torch.tensor, (a, b, c))

            def forward(self, inputs):
                return 0.5 * torch.sum((self.a + self.b @ self.y) * self.x**2) + self.c @ self.y

        return Valley()


@pytest.mark.parametrize("seed", range(3))
def test_torch_prediction_midpoint_and_offsets_on_gds_orbit(seed):
    """The valley's closed form through eosflow.torch: GD (torch.optim.SGD) steps from the orbit's point to its other
    point; inside `midpoint` the model sits at the orbit's centre (x = 0, y*), where X = diag(s^2) and the
    predicted loss is the orbit's; `edge_offsets` gives -s; leaving the block puts w_t back bitwise."""
    torch = pytest.importorskip("torch")
    import eosflow.torch  # noqa: F401  (eosflow does not import torch by itself)

    rng = np.random.default_rng(seed)
    m, lr = 2, float(rng.uniform(0.05, 0.5))
    b = -np.abs(rng.normal(1.0, 0.3, (m, m))) - 2.0 * np.eye(m)
    s2 = rng.uniform(0.01, 0.2, m)
    c, y = -0.5 * b.T @ s2, rng.normal(size=m)
    model = TorchValley(2.0 / lr - b @ y, b, c, np.sqrt(s2), y)
    batch = (torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    loss_fn = lambda outputs, targets: outputs  # noqa: E731
    orbit_loss = float(model(batch[0]).detach())
    previous = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    optimizer.zero_grad()
    model(batch[0]).backward()
    optimizer.step()
    after = [p.detach().clone() for p in model.parameters()]
    np.testing.assert_allclose(after[0].numpy(), -np.sqrt(s2), rtol=1e-12)
    eig = Pairs(np.full(m, 2.0 / lr), np.eye(2 * m)[:, :m])
    with eosflow.torch.midpoint(model, previous):
        np.testing.assert_allclose(model.x.detach().numpy(), 0.0, atol=1e-15)  # GD's step rounds
        prediction = eosflow.torch.edge_prediction(model, loss_fn, batch, eig, lr)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after, strict=True))
    np.testing.assert_allclose(prediction.covariance, np.diag(s2), rtol=1e-9, atol=1e-12)
    assert float(prediction.predicted_loss) == pytest.approx(orbit_loss, rel=1e-12)
    np.testing.assert_allclose(eosflow.torch.edge_offsets(model, previous, eig), -np.sqrt(s2), rtol=1e-12)
    with pytest.raises(ValueError, match="previous has 1 tensors, the model 2"):
        eosflow.torch.edge_offsets(model, previous[:1], eig)
    with pytest.raises(
        ValueError, match=rf"edge_offsets: eig.vectors is \({2 * m + 1}, {m}\), .* have {2 * m} entries"
    ):
        eosflow.torch.edge_offsets(model, previous, Pairs(eig.values, np.eye(2 * m + 1)[:, :m]))
    for call in (
        lambda: eosflow.torch.edge_prediction(model, loss_fn, batch, None, lr),
        lambda: eosflow.torch.edge_offsets(model, previous, None),
        lambda: eosflow.torch.parameter_shares(model, None),
    ):
        with pytest.raises(TypeError, match="eig must be the eigenpairs .* got NoneType: pass what tracker.update"):
            call()
    with pytest.raises(RuntimeError), eosflow.torch.midpoint(model, previous):
        raise RuntimeError("the block fails")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after, strict=True))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_matches_the_jax_path_on_one_network(dtype):
    """A torch tanh MLP and its JAX transcription with the same weights, tilted up their sharpness by a linear
    term: every field of the torch prediction equals the JAX one (float64: 1e-9; float32: 1e-3), k = 3 pairs from
    dense eigh, each m; the torch model is unchanged."""
    torch = pytest.importorskip("torch")
    import eosflow.torch  # noqa: F401

    torch_dtype = getattr(torch, dtype)
    net = torch.nn.Sequential(torch.nn.Linear(3, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).to(torch_dtype)
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.7)
    inputs = torch.randn(16, 3, dtype=torch_dtype)
    targets = torch.sin(inputs[:, :2])
    names = [name for name, _ in net.named_parameters()]
    weights = [p.detach().numpy().astype(np.float64) for p in net.parameters()]
    with precision("float64"):
        flat, unravel = ravel_pytree([jnp.asarray(w) for w in weights])
        r = jnp.asarray(np.random.default_rng(1).normal(size=flat.size))

        def loss(w):
            W1, b1, W2, b2 = unravel(w)
            out = jnp.tanh(jnp.asarray(inputs.numpy(), jnp.float64) @ W1.T + b1) @ W2.T + b2
            return jnp.mean((out - jnp.asarray(targets.numpy(), jnp.float64)) ** 2) + r @ w

        values, vectors = np.linalg.eigh(np.asarray(jax.jit(jax.hessian(loss))(flat)))
        eig = Pairs(values[::-1][:3], vectors[:, ::-1][:, :3])
    pieces = torch.split(torch.tensor(np.asarray(r), dtype=torch_dtype), [p.numel() for p in net.parameters()])

    class Tilted(torch.nn.Module):  # the outputs and r . w, from the parameters functional_call puts in
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            layers = (self.net[0].weight, self.net[0].bias, self.net[2].weight, self.net[2].bias)
            return self.net(x), sum(piece @ p.reshape(-1) for piece, p in zip(pieces, layers, strict=True))

    def torch_loss(outputs, targets):
        return torch.nn.functional.mse_loss(outputs[0], targets) + outputs[1]

    model = Tilted()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    tolerance = dict(rtol=1e-9, atol=1e-12) if dtype == "float64" else dict(rtol=2e-3, atol=1e-5)
    for m in range(1, 4):
        lr = 2.0 / eig.values[m - 1] * (1 + 1e-6)
        with precision("float64"):
            oracle = edge_prediction.predict(loss, flat, None, eig, lr, margin=0.0)
        ours = eosflow.torch.edge_prediction(model, torch_loss, (inputs, targets), eig, lr, margin=0.0)
        assert int(ours.critical) == int(oracle.critical) == m
        for field in ("loss", "sharpening", "covariance", "predicted_loss"):
            np.testing.assert_allclose(getattr(ours, field), getattr(oracle, field), **tolerance, err_msg=field)
        assert np.asarray(ours.covariance).dtype == np.dtype(dtype)
        assert np.trace(np.asarray(ours.covariance)) > 0  # the tilt makes every m oscillate
    assert names == list(before) and all(torch.equal(p, before[n]) for n, p in net.named_parameters())


@pytest.mark.parametrize("lr,warmup", [(0.1, 1500), (0.07, 2500)])
def test_the_documented_loop_predicts_gds_loss_on_the_bent_valley(lr, warmup, tmp_path):
    """docs/monitor.md's loop on examples/sharp_valley.toml's bent valley (float64), 200 GD steps after GD has
    settled at its edge: at every step one direction is critical; the mean predicted loss is GD's mean loss to 1%,
    where the loss at the midpoint is off by more than half of it; the mean measured x^2 is the mean tr X to 2%.
    Each prediction goes to an edge log beside GD's loss: read back as written, drawn over the loss."""
    from eosflow.edge_log import EdgeLog, figure, read
    from eosflow.experiment import prepare
    from eosflow.spec import load_spec_table

    with precision("float64"):
        problem = prepare(load_spec_table("examples/sharp_valley.toml"))[1]
        objective = problem.objective

        def loss_fn(w):
            return objective.value(w)

        grad_fn = jax.jit(jax.grad(loss_fn))
        settle = jax.jit(lambda w: jax.lax.fori_loop(0, warmup, lambda _, w: w - lr * jax.grad(loss_fn)(w), w))
        params = settle(problem.w0)
        tracker = eosflow.SharpnessTracker(loss_fn, k=2, tol=1e-8, max_iters=50)
        state = tracker.init(params, jax.random.key(0))
        update = jax.jit(tracker.update)
        rows = []
        log = EdgeLog(tmp_path / "valley.jsonl")
        for step in range(200):
            new = jax.tree.map(lambda p, g: p - lr * g, params, grad_fn(params))
            centre = jax.tree.map(lambda a, b: (a + b) / 2, new, params)
            state, eig = update(state, centre)
            prediction = edge_prediction.predict(loss_fn, centre, None, eig, lr)
            x = edge_prediction.offsets(new, params, eig)
            params = new
            assert int(prediction.critical) == 1
            rows.append(
                [prediction.predicted_loss, loss_fn(new), prediction.loss, prediction.covariance[0, 0], x[0] ** 2]
            )
            log.write(step, prediction, loss=rows[-1][1])
        log.close()
        ds = read(tmp_path / "valley.jsonl")
        table = np.asarray(rows, dtype=float)
        np.testing.assert_array_equal(ds["predicted_loss"], table[:, 0])
        np.testing.assert_array_equal(ds["centre_loss"], table[:, 2])
        np.testing.assert_array_equal(ds["predicted_variance"], table[:, 3])
        assert set(ds["critical"].values) == {1}
        lines = figure(ds).axes[0].get_lines()
        assert [line.get_label() for line in lines] == ["loss", "predicted loss (central flow)"]
        np.testing.assert_array_equal(lines[1].get_ydata(), table[:, 0])
        predicted, gd, centre_loss, variance, measured = table.mean(axis=0)
        assert abs(predicted - gd) <= 0.01 * abs(gd)
        assert abs(centre_loss - gd) >= 0.5 * abs(gd)
        assert measured == pytest.approx(variance, rel=0.02)


def test_inside_the_users_jit_with_a_traced_lr():
    """predict inside a jitted step (the tracker's update and the prediction one program, lr traced): the same
    numbers as the compiled call outside it, to rounding, with X != 0 on a tilted network."""
    with precision("float64"):
        loss, params, batch = mlp_loss((3, 6, 2), jnp.tanh, 10, 7)
        r = jnp.asarray(np.random.default_rng(7).normal(size=ravel_pytree(params)[0].size))

        def tilted(params, batch):
            return loss(params, batch) + 5.0 * r @ ravel_pytree(params)[0]

        tracker = eosflow.SharpnessTracker(tilted, k=2, tol=1e-10, max_iters=300)
        state = tracker.init(params, jax.random.key(0))

        @jax.jit
        def step(state, params, lr):
            state, eig = tracker.update(state, params, batch)
            return eig, edge_prediction.predict(tilted, params, batch, eig, lr, margin=0.0)

        eig, _ = step(state, params, 1.0)
        lr = 2.0 / float(eig.values[1]) * (1 + 1e-6)
        eig, inside = step(state, params, lr)
        outside = edge_prediction.predict(tilted, params, batch, eig, lr, margin=0.0)
        assert int(inside.critical) == int(outside.critical) == 2
        for field in ("loss", "sharpening", "covariance", "predicted_loss"):
            np.testing.assert_allclose(getattr(inside, field), getattr(outside, field), rtol=1e-9, atol=1e-12)
        assert np.trace(np.asarray(inside.covariance)) > 0


def test_microbatches_and_a_flax_nnx_module():
    """microbatch=B evaluates the loss in chunks of B examples: the same prediction as the whole batch (float64,
    1e-10); a Flax NNX module (BatchNorm in eval mode) is predicted over its nnx.Params as the tracker measures
    it: the same numbers as a loss of their flat vector, the module left unchanged."""
    nnx = pytest.importorskip("flax.nnx")
    with precision("float64"):
        loss, params, batch = mlp_loss((3, 5, 2), jnp.tanh, 13, 4)
        flat, unravel = ravel_pytree(params)
        L = lambda w: loss(unravel(w), batch)  # noqa: E731
        values, vectors = np.linalg.eigh(np.asarray(jax.jit(jax.hessian(L))(flat)))
        pairs = Pairs(values[::-1][:2], vectors[:, ::-1][:, :2])
        top = jnp.asarray(pairs.vectors[:, 0])
        grad_s = jax.grad(lambda w: top @ jax.jvp(jax.grad(L), (w,), (top,))[1])(flat)  # grad lambda_1
        r = -3.0 * jnp.linalg.norm(jax.grad(L)(flat)) * grad_s / jnp.linalg.norm(grad_s)  # tilted up lambda_1

        def tilted(params, batch):
            return loss(params, batch) + r @ ravel_pytree(params)[0]

        lr = 2.0 / pairs.values[1] * (1 + 1e-9)
        whole = edge_prediction.predict(tilted, params, batch, pairs, lr, margin=0.0)
        chunked = edge_prediction.predict(tilted, params, batch, pairs, lr, margin=0.0, microbatch=5)
        assert np.trace(np.asarray(whole.covariance)) > 0
        for field in ("loss", "sharpening", "covariance", "predicted_loss"):
            np.testing.assert_allclose(getattr(chunked, field), getattr(whole, field), rtol=1e-10, atol=1e-13)

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.a = nnx.Linear(3, 6, rngs=rngs, param_dtype=jnp.float64)
                self.norm = nnx.BatchNorm(6, rngs=rngs, param_dtype=jnp.float64)
                self.b = nnx.Linear(6, 2, rngs=rngs, param_dtype=jnp.float64)

            def __call__(self, x):
                return self.b(jnp.tanh(self.norm(self.a(x))))

        model = Net(nnx.Rngs(0))
        model.eval()
        x, y = batch

        def module_loss(m, b):
            return jnp.mean((m(b[0]) - b[1]) ** 2)

        graphdef, state, rest = nnx.split(model, nnx.Param, ...)
        flat, unravel = ravel_pytree(state)
        before = jax.tree.map(np.asarray, nnx.state(model))

        def flat_loss(w):
            return module_loss(nnx.merge(graphdef, unravel(w), rest), batch)

        values, vectors = np.linalg.eigh(np.asarray(jax.jit(jax.hessian(flat_loss))(flat)))
        pairs = Pairs(values[::-1][:2], vectors[:, ::-1][:, :2])
        lr = 2.0 / pairs.values[1] * (1 + 1e-9)
        ours = edge_prediction.predict(module_loss, model, batch, pairs, lr)
        oracle = edge_prediction.predict(flat_loss, flat, None, pairs, lr)
        for field in ("loss", "sharpening", "covariance", "predicted_loss"):
            np.testing.assert_allclose(getattr(ours, field), getattr(oracle, field), rtol=1e-9, atol=1e-14)
        after = jax.tree.map(np.asarray, nnx.state(model))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


def rmsprop_state(optimizer, w, nu):
    """``optimizer``'s optax state at ``w`` with its second moment set to ``nu`` (count 0)."""
    state = optimizer.transform.init(w)
    return jax.tree.map(lambda leaf: jnp.asarray(nu) if leaf.shape == w.shape else leaf, state)


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("m", [1, 2])
def test_rmsprop_covariance_is_its_period_two_orbit_in_closed_form(m, seed, eps_in_sqrt):
    """On the valley, optax.rmsprop has the exact period-2 orbit x_i = +-s_i, y = y* with its nu stationary: with
    curvatures l_i = a_i + b_i . y*, P_i = lr l_i / 2 (so lr l_i / P_i = 2), nu_i = (l_i s_i)^2 (|g_i| = l_i s_i at
    both points) and c + 1/2 B^T s^2 = 0 (g_y = 0; nu_y is then free). At the centre (x = 0, y*), where g_y = c and
    the oscillation must both cancel the drift along y (the pair gradients) and hold nu up (its feed), the prediction
    is Sigma = V X V^T = diag(s^2) (V = P^-1/2 U), its loss the orbit's, and offsets(..., P) give x^2 = diag X."""
    rng = np.random.default_rng(seed)
    lr, decay, eps = rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.99), rng.uniform(1e-3, 5e-3)
    with precision("float64"):
        b = -np.abs(rng.normal(1.0, 0.3, (m, m))) - 2.0 * np.eye(m)
        curvature = rng.uniform(2.0, 5.0, m)
        p = lr * curvature / 2
        nu_x = p**2 - eps if eps_in_sqrt else (p - eps) ** 2
        s = np.sqrt(nu_x) / curvature
        c = -0.5 * b.T @ s**2
        y = rng.normal(size=m)
        loss = valley(jnp.asarray(curvature - b @ y), jnp.asarray(b), jnp.asarray(c))
        rms = eosflow.optimizer_edges.rmsprop(lr, decay=decay, eps=eps, eps_in_sqrt=eps_in_sqrt)
        orbit = jnp.concatenate([jnp.asarray(s), jnp.asarray(y)])
        state = rmsprop_state(rms, orbit, np.concatenate([nu_x, rng.uniform(0.1, 1.0, m)]))
        points, moving = [orbit], state
        for _ in range(2):  # two of optax's own updates: a 2-cycle, nu stationary
            updates, moving = rms.transform.update(jax.grad(loss)(points[-1]), moving, points[-1])
            points.append(points[-1] + updates)
        after = points[1]
        np.testing.assert_allclose(after, jnp.concatenate([-orbit[:m], orbit[m:]]), atol=1e-13)
        np.testing.assert_allclose(points[2], orbit, atol=1e-13)
        np.testing.assert_allclose(rms.preconditioner(moving)[:m], rms.preconditioner(state)[:m], rtol=1e-13)
        P = np.asarray(rms.preconditioner(state))
        np.testing.assert_allclose(P[:m], p, rtol=1e-12)
        centre = jnp.concatenate([jnp.zeros(m), jnp.asarray(y)])
        hessian = np.asarray(jax.jit(jax.hessian(loss))(centre))
        assert np.linalg.eigvalsh(hessian / np.sqrt(np.outer(P, P)))[::-1][:m] == pytest.approx(2 / lr, rel=1e-12)
        pairs = Pairs(np.full(m, 2.0 / lr), np.eye(2 * m)[:, :m])
        prediction = edge_prediction.predict(loss, centre, None, pairs, lr, optimizer=rms, opt_state=state)
        assert int(prediction.critical) == m
        V = pairs.vectors / np.sqrt(P)[:, None]
        sigma = V @ np.asarray(prediction.covariance) @ V.T
        np.testing.assert_allclose(sigma, np.diag(np.concatenate([s**2, np.zeros(m)])), rtol=1e-9, atol=1e-14)
        assert float(prediction.predicted_loss) == pytest.approx(float(loss(orbit)), rel=1e-10)
        x = edge_prediction.offsets(after, orbit, pairs, preconditioner=rms.preconditioner(state))
        np.testing.assert_allclose(x**2, np.diag(np.asarray(prediction.covariance)), rtol=1e-10)
        slower = eosflow.optimizer_edges.rmsprop(0.9 * lr, decay=decay, eps=eps, eps_in_sqrt=eps_in_sqrt)
        lower = edge_prediction.predict(loss, centre, None, pairs, 0.9 * lr, optimizer=slower, opt_state=state)
        assert int(lower.critical) == 0 and not np.any(np.asarray(lower.covariance))


@pytest.mark.parametrize("bias_correction", [False, True])
def test_rmsprop_sharpening_is_the_preconditioned_sharpness_rate_along_the_flow(bias_correction):
    """``sharpening`` with RMSProp is d lambda_i(P^-1/2 H P^-1/2) / dt along its stable flow, P moving with nu:
    dw/dt = -P^-1 g, dnu_hat/dt = (rate / lr) (g^2 - nu_hat) (t = lr x steps). Against central differences of dense
    float64 eigh along that path, on a random MLP with a random nu (count 7 for the bias correction)."""
    with precision("float64"):
        loss, params, batch = mlp_loss((3, 5, 2), jnp.tanh, 11, 2)
        flat, unravel = ravel_pytree(params)
        L = lambda w: loss(unravel(w), batch)  # noqa: E731
        lr, decay, eps = 0.02, 0.9, 1e-3
        rms = eosflow.optimizer_edges.rmsprop(lr, decay=decay, eps=eps, bias_correction=bias_correction)
        nu = np.random.default_rng(3).uniform(0.01, 0.5, flat.size)
        state = rmsprop_state(rms, flat, nu)
        if bias_correction:
            state = jax.tree.map(lambda leaf: jnp.asarray(7, leaf.dtype) if leaf.shape == () else leaf, state)
        moment = rms.second_moment(state)
        g = np.asarray(jax.grad(L)(flat))

        hessian = jax.jit(jax.hessian(L))  # one program for every tau

        def top(tau):
            nu_hat = moment.nu + tau / lr * moment.rate * (g**2 - moment.nu)
            P = np.sqrt(np.asarray(nu_hat) + eps)
            H = np.asarray(hessian(flat - tau * g / np.asarray(moment.preconditioner)))
            return np.linalg.eigh(H / np.sqrt(np.outer(P, P)))

        values, vectors = top(0.0)
        pairs = Pairs(values[::-1][:2], vectors[:, ::-1][:, :2])
        prediction = edge_prediction.predict(L, flat, None, pairs, lr, optimizer=rms, opt_state=state)
        h = 1e-5
        rate = (top(h)[0][::-1][:2] - top(-h)[0][::-1][:2]) / (2 * h)
        np.testing.assert_allclose(prediction.sharpening, rate, rtol=1e-6)
        assert abs(float(moment.rate) - (1 - decay) / (1 - decay**8 if bias_correction else 1.0)) < 1e-15


@pytest.mark.parametrize(
    "lr,decay,warmup,fed,adam",
    [(0.01, 0.99, 3000, True, False), (0.05, 0.9, 2000, False, False), (0.015, 0.995, 3000, True, True)],
)
def test_the_documented_loop_predicts_rmsprops_loss_on_the_bent_valley(lr, decay, warmup, fed, adam):
    """docs/monitor.md's RMSProp loop (optax.rmsprop, the tracker with its P at the midpoints, predict given the
    optimizer and its state, offsets given P) on the bent valley (float64), 200 steps after RMSProp has settled at
    its edge: the mean predicted loss is RMSProp's mean loss to 1%, where the midpoint's loss is off by more than
    5%; the mean measured x^2 is the mean tr X to 0.5%. Without the nu feed (nu's rate set to 0: the pair gradients
    alone) the reading is off by more than 10% at lr 0.01, decay 0.99 (``fed``: the oscillation is held by nu), and
    as close at lr 0.05, decay 0.9 (held by the pair gradients). The same for optax.adam at b1 = 0 (``adam``: RMSProp
    with bias correction, eps outside the root) at lr 0.015, b2 = 0.995."""
    from eosflow.experiment import prepare
    from eosflow.spec import load_spec_table

    with precision("float64"):
        objective = prepare(load_spec_table("examples/sharp_valley.toml"))[1].objective
        edges = eosflow.optimizer_edges
        rms = edges.adam(lr, b1=0.0, b2=decay, eps=1e-8) if adam else edges.rmsprop(lr, decay=decay, eps=1e-8)
        unfed = rms._replace(second_moment=lambda state: rms.second_moment(state)._replace(rate=0.0))

        def loss_fn(w):
            return objective.value(w)

        def step(carry, _):
            w, state = carry
            updates, state = rms.transform.update(jax.grad(loss_fn)(w), state, w)
            return (w + updates, state), None

        w0 = prepare(load_spec_table("examples/sharp_valley.toml"))[1].w0
        params, state = jax.lax.scan(step, (w0, rms.transform.init(w0)), None, length=warmup)[0]
        tracker = eosflow.SharpnessTracker(loss_fn, k=2, tol=1e-8, max_iters=50)
        tracked = tracker.init(params, jax.random.key(0))
        update, advance = jax.jit(tracker.update), jax.jit(lambda carry: step(carry, None)[0])
        rows = []
        for _ in range(200):
            new, state = advance((params, state))
            centre, P = (new + params) / 2, rms.preconditioner(state)
            tracked, eig = update(tracked, centre, None, P)
            prediction = edge_prediction.predict(loss_fn, centre, None, eig, lr, optimizer=rms, opt_state=state)
            without = edge_prediction.predict(loss_fn, centre, None, eig, lr, optimizer=unfed, opt_state=state)
            x = edge_prediction.offsets(new, params, eig, preconditioner=P)
            params = new
            assert int(prediction.critical) == 1
            rows.append(
                [prediction.predicted_loss, loss_fn(new), prediction.loss, prediction.covariance[0, 0], x[0] ** 2]
                + [without.covariance[0, 0]]
            )
        predicted, actual, centre_loss, variance, measured, unfed_variance = np.asarray(rows, dtype=float).mean(axis=0)
        assert abs(predicted - actual) <= 0.01 * abs(actual)
        assert abs(centre_loss - actual) >= 0.05 * abs(actual)
        assert measured == pytest.approx(variance, rel=0.005)
        if fed:
            assert abs(measured / unfed_variance - 1) > 0.1
        else:
            assert measured == pytest.approx(unfed_variance, rel=0.005)


@pytest.mark.parametrize("seed", range(3))
def test_adam_without_momentum_reads_as_rmsprop_with_bias_correction(seed):
    """optax.adam at b1 = 0 is optax.rmsprop with bias correction and eps outside the root: over 20 updates on an MLP
    their iterates agree to 1e-13, and the two readings at the last (k = 3 pairs of P^-1/2 H P^-1/2 from dense eigh,
    m = 1 and 2) to 1e-12. With eps_root > 0 (no RMSProp counterpart) Adam's second moment is checked by hand:
    nu_hat = nu / (1 - b2^t), P = sqrt(nu_hat + eps_root) + eps, dP/dnu_hat against central differences of P, and
    nu_hat's rate against optax's next update (nu_hat' = nu_hat + rate (g^2 - nu_hat)) to 1e-12."""
    rng = np.random.default_rng(20 + seed)
    b2, eps, eps_root = float(rng.uniform(0.9, 0.999)), float(rng.uniform(1e-4, 1e-2)), float(rng.uniform(1e-6, 1e-4))
    edges = eosflow.optimizer_edges
    with precision("float64"):
        loss, params, batch = mlp_loss((3, 5, 2), jnp.tanh, 12, seed)
        flat, unravel = ravel_pytree(params)
        L = lambda w: loss(unravel(w), batch)  # noqa: E731
        adam, rms = edges.adam(0.01, b1=0.0, b2=b2, eps=eps), edges.rmsprop(0.01, b2, eps, False, True)
        states, iterates = [adam.transform.init(flat), rms.transform.init(flat)], [flat, flat]
        for _ in range(20):
            for i, optimizer in enumerate((adam, rms)):
                updates, states[i] = optimizer.transform.update(jax.grad(L)(iterates[i]), states[i], iterates[i])
                iterates[i] = iterates[i] + updates
        np.testing.assert_allclose(iterates[0], iterates[1], rtol=1e-13, atol=1e-15)
        w = iterates[0]
        P = np.asarray(adam.preconditioner(states[0]))
        np.testing.assert_allclose(P, rms.preconditioner(states[1]), rtol=1e-13)
        A = np.asarray(jax.jit(jax.hessian(L))(w)) / np.sqrt(np.outer(P, P))
        values, vectors = np.linalg.eigh(A)
        eig = Pairs(values[::-1][:3], vectors[:, ::-1][:, :3])
        for m in (1, 2):
            lr = 2.0 / eig.values[m - 1] * (1 + 1e-6)
            readings = [
                edge_prediction.predict(L, w, None, eig, lr, optimizer=o._replace(lr=lr), opt_state=st, margin=0.0)
                for o, st in ((adam, states[0]), (rms, states[1]))
            ]
            assert int(readings[0].critical) == m
            for field in ("loss", "sharpening", "covariance", "predicted_loss"):
                np.testing.assert_allclose(getattr(readings[0], field), getattr(readings[1], field), rtol=1e-12)

        rooted = edges.adam(0.01, b1=0.0, b2=b2, eps=eps, eps_root=eps_root)
        state = rooted.transform.init(flat)
        for _ in range(3):
            state = rooted.transform.update(jax.grad(L)(flat), state, flat)[1]
        moment = rooted.second_moment(state)
        nu = np.asarray(state[0].nu)
        nu_hat = nu / (1 - b2**3)
        np.testing.assert_allclose(moment.nu, nu_hat, rtol=1e-14)
        np.testing.assert_allclose(moment.preconditioner, np.sqrt(nu_hat + eps_root) + eps, rtol=1e-14)
        np.testing.assert_allclose(rooted.preconditioner(state), moment.preconditioner, rtol=1e-14)
        h = 1e-4 * nu_hat
        differences = (np.sqrt(nu_hat + h + eps_root) - np.sqrt(nu_hat - h + eps_root)) / (2 * h)
        np.testing.assert_allclose(moment.slope, differences, rtol=1e-7)
        g = np.asarray(jax.grad(L)(flat + 0.1))
        after = rooted.transform.update(jnp.asarray(g), state, flat)[1]
        np.testing.assert_allclose(
            np.asarray(after[0].nu) / (1 - b2**4), nu_hat + float(moment.rate) * (g**2 - nu_hat), rtol=1e-12
        )


def test_an_optimizer_without_a_published_central_flow_is_refused_by_name():
    """Momentum, Adam with momentum, AdamW, AMSGrad, a missing or misshapen state, an lr that is not the optimizer's:
    each a ValueError naming it; optax.sgd without momentum reads as GD."""
    with precision("float64"):
        loss, params, batch = mlp_loss((2, 3, 1), jnp.tanh, 5, 0)
        flat = ravel_pytree(params)[0]
        L = lambda w: loss(ravel_pytree(params)[1](w), batch)  # noqa: E731
        pairs = Pairs(np.array([1.0]), np.eye(flat.size)[:, :1])
        edges = eosflow.optimizer_edges
        rms = edges.rmsprop(0.1)
        state = rms.transform.init(flat)
        cases = [
            (dict(optimizer=edges.rmsprop(0.1, momentum=0.9), opt_state=state), "momentum"),
            (dict(optimizer=edges.adam(0.1), opt_state=edges.adam(0.1).transform.init(flat)), "momentum"),
            (dict(optimizer=edges.adamw(0.1, b1=0.0), opt_state=edges.adamw(0.1).transform.init(flat)), "decay"),
            (
                dict(optimizer=edges.amsgrad(0.1, b1=0.0), opt_state=edges.amsgrad(0.1).transform.init(flat)),
                "running max",
            ),
            (dict(optimizer=rms), "opt_state"),
            (dict(optimizer=edges.adam(0.1, b1=0.0), opt_state=edges.adam(0.1).transform.init(flat)), "count 0"),
            (dict(opt_state=state), "without its optimizer"),
            (dict(optimizer=edges.rmsprop(0.2), opt_state=state), "lr = 0.1, but the optimizer steps with lr = 0.2"),
            (dict(optimizer=rms, opt_state=rms.transform.init(flat[:-1])), r"optimizer's nu's leaves have shapes"),
            (dict(optimizer=optax_sgd_like(), opt_state=None), "eosflow.optimizer_edges optimizer"),
        ]
        for kwargs, message in cases:
            with pytest.raises(ValueError, match=message):
                edge_prediction.predict(L, flat, None, pairs, 0.1, **kwargs)
        as_gd = edge_prediction.predict(L, flat, None, pairs, 0.1, optimizer=edges.sgd(0.1))
        plain = edge_prediction.predict(L, flat, None, pairs, 0.1)
        for field in ("sharpening", "covariance", "predicted_loss"):
            np.testing.assert_array_equal(getattr(as_gd, field), getattr(plain, field))


def optax_sgd_like():
    import optax

    return optax.sgd(0.1)


@pytest.mark.parametrize("seed", range(2))
def test_torch_rmsprop_prediction_on_its_period_two_orbit(seed):
    """RMSProp's closed-form orbit on the valley through torch.optim.RMSprop (P = sqrt(square_avg) + eps): one of
    torch's steps takes the orbit's point to its other one; at the centre, Sigma = V X V^T = diag(s^2) and the
    predicted loss is the orbit's; `edge_offsets` with the optimizer gives x^2 = diag X. Momentum and weight decay
    are refused by name, and plain SGD reads as GD."""
    torch = pytest.importorskip("torch")
    import eosflow.torch  # noqa: F401

    rng = np.random.default_rng(10 + seed)
    m, lr, alpha, eps = 2, float(rng.uniform(0.05, 0.2)), float(rng.uniform(0.8, 0.99)), float(rng.uniform(1e-3, 5e-3))
    b = -np.abs(rng.normal(1.0, 0.3, (m, m))) - 2.0 * np.eye(m)
    curvature = rng.uniform(2.0, 5.0, m)
    s = (lr * curvature / 2 - eps) / curvature
    c, y = -0.5 * b.T @ s**2, rng.normal(size=m)
    model = TorchValley(curvature - b @ y, b, c, s, y)
    batch = (torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    loss_fn = lambda outputs, targets: outputs  # noqa: E731
    orbit_loss = float(model(batch[0]).detach())
    optimizer = torch.optim.RMSprop(model.parameters(), lr=lr, alpha=alpha, eps=eps)
    for p, nu in ((model.x, (curvature * s) ** 2), (model.y, rng.uniform(0.1, 1.0, m))):
        optimizer.state[p] = {"step": torch.tensor(5.0), "square_avg": torch.tensor(nu)}
    previous = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    model(batch[0]).backward()
    optimizer.step()
    np.testing.assert_allclose(model.x.detach().numpy(), -s, rtol=1e-12)
    np.testing.assert_allclose(model.y.detach().numpy(), y, rtol=1e-14)
    P = np.concatenate([np.sqrt(optimizer.state[p]["square_avg"].numpy()) + eps for p in (model.x, model.y)])
    np.testing.assert_allclose(P[:m], lr * curvature / 2, rtol=1e-12)
    eig = Pairs(np.full(m, 2.0 / lr), np.eye(2 * m)[:, :m])
    with eosflow.torch.midpoint(model, previous):
        prediction = eosflow.torch.edge_prediction(model, loss_fn, batch, eig, lr, optimizer=optimizer)
        as_gd = eosflow.torch.edge_prediction(
            model, loss_fn, batch, eig, lr, optimizer=torch.optim.SGD(model.parameters(), lr=lr)
        )
        for bad, message in [
            (torch.optim.RMSprop(model.parameters(), lr=lr, momentum=0.9), "momentum = 0.9"),
            (torch.optim.RMSprop(model.parameters(), lr=lr, weight_decay=1e-3), "weight_decay = 0.001"),
            (torch.optim.Adam(model.parameters(), lr=lr), r"betas\[0\] = 0.9"),
            (torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.9), amsgrad=True), "amsgrad = True"),
            (torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.0, 0.9)), "weight_decay = 0.01"),
            (torch.optim.Adagrad(model.parameters(), lr=lr), "got Adagrad"),
            (torch.optim.RMSprop(model.parameters(), lr=2 * lr), "steps with lr"),
        ]:
            with pytest.raises(ValueError, match=message):
                eosflow.torch.edge_prediction(model, loss_fn, batch, eig, lr, optimizer=bad)
        of_h = eosflow.torch.TrackedEigenpairs(eig.values, torch.from_numpy(eig.vectors), np.zeros(m), 0, np.nan)
        with pytest.raises(ValueError, match=r"eig was measured without an optimizer .* for the RMSprop given here"):
            eosflow.torch.edge_prediction(model, loss_fn, batch, of_h, lr, optimizer=optimizer)  # a tracker's, no P
    V = eig.vectors / np.sqrt(P)[:, None]
    sigma = V @ prediction.covariance @ V.T
    np.testing.assert_allclose(sigma, np.diag(np.concatenate([s**2, np.zeros(m)])), rtol=1e-9, atol=1e-14)
    assert float(prediction.predicted_loss) == pytest.approx(orbit_loss, rel=1e-10)
    x = eosflow.torch.edge_offsets(model, previous, eig, optimizer=optimizer)
    np.testing.assert_allclose(x**2, np.diag(prediction.covariance), rtol=1e-10)
    assert float(as_gd.sharpening[0]) == pytest.approx(float(-(b[0] @ c)), rel=1e-12)  # GD's: -<G_11, g>


@pytest.mark.parametrize("adam", [False, True])
def test_torch_rmsprop_matches_the_jax_path_on_one_network(adam):
    """A torch tanh MLP under torch.optim.RMSprop with a given square_avg, and its JAX transcription under
    optax.rmsprop (eps outside the root, decay = alpha) with the same nu: every field of the two RMSProp readings
    agrees to 1e-9 (float64), for m = 1 and 2 of k = 3 pairs of P^-1/2 H P^-1/2 from dense eigh; nu above g^2
    (P falling, the preconditioned sharpness rising) makes X > 0. ``adam``: torch.optim.Adam at betas = (0, alpha)
    after 4 steps (exp_avg_sq = nu (1 - alpha^4)) against optax.adam at b1 = 0 with the same state, and
    `edge_offsets` given the optimizer scales by its P^1/2."""
    torch = pytest.importorskip("torch")
    import eosflow.torch  # noqa: F401

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    inputs = torch.randn(12, 3, dtype=torch.float64)
    targets = torch.sin(inputs[:, :2])
    batch = (inputs, targets)
    alpha, eps = 0.95, 1e-3
    weights = [p.detach().numpy() for p in net.parameters()]
    with precision("float64"):
        flat, unravel = ravel_pytree([jnp.asarray(w) for w in weights])

        def loss(w):
            W1, b1, W2, b2 = unravel(w)
            out = jnp.tanh(jnp.asarray(inputs.numpy()) @ W1.T + b1) @ W2.T + b2
            return jnp.mean((out - jnp.asarray(targets.numpy())) ** 2)

        nu = np.random.default_rng(4).uniform(1.0, 2.0, flat.size) * np.asarray(jax.grad(loss)(flat)) ** 2 + 1e-4
        P = np.sqrt(nu) + eps
        A = np.asarray(jax.jit(jax.hessian(loss))(flat)) / np.sqrt(np.outer(P, P))
        values, vectors = np.linalg.eigh(A)
        eig = Pairs(values[::-1][:3], vectors[:, ::-1][:, :3])
        raw = nu * (1 - alpha**4) if adam else nu  # what the state holds: nu_hat = raw / (1 - alpha^4) for Adam
        for m in (1, 2):
            lr = 2.0 / eig.values[m - 1] * (1 + 1e-6)
            if adam:
                jax_optimizer = eosflow.optimizer_edges.adam(lr, b1=0.0, b2=alpha, eps=eps)
                opt_state = jax.tree.map(
                    lambda leaf: jnp.asarray(4, leaf.dtype) if leaf.ndim == 0 else leaf,
                    rmsprop_state(jax_optimizer, flat, raw),
                )
                optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, alpha), eps=eps)
                names = ("exp_avg_sq", "exp_avg")
            else:
                jax_optimizer = eosflow.optimizer_edges.rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False)
                opt_state = rmsprop_state(jax_optimizer, flat, raw)
                optimizer = torch.optim.RMSprop(net.parameters(), lr=lr, alpha=alpha, eps=eps)
                names = ("square_avg",)
            oracle = edge_prediction.predict(
                loss, flat, None, eig, lr, optimizer=jax_optimizer, opt_state=opt_state, margin=0.0
            )
            for p, part in zip(net.parameters(), np.split(raw, np.cumsum([w.size for w in weights])[:-1]), strict=True):
                buffers = [torch.tensor(part.reshape(p.shape)), torch.zeros_like(p)]
                optimizer.state[p] = {"step": torch.tensor(4.0), **dict(zip(names, buffers, strict=False))}
            ours = eosflow.torch.edge_prediction(
                net, torch.nn.functional.mse_loss, batch, eig, lr, optimizer=optimizer, margin=0.0
            )
            assert int(ours.critical) == int(oracle.critical) == m
            for field in ("loss", "sharpening", "covariance", "predicted_loss"):
                np.testing.assert_allclose(getattr(ours, field), getattr(oracle, field), rtol=1e-9, atol=1e-13)
            assert np.trace(np.asarray(ours.covariance)) > 0
        previous = [p.detach().clone() + 0.01 * torch.randn_like(p) for p in net.parameters()]
        step = np.concatenate([(p.detach() - q).reshape(-1).numpy() for p, q in zip(net.parameters(), previous)])
        x = eosflow.torch.edge_offsets(net, previous, eig, optimizer=optimizer)
        np.testing.assert_allclose(x, eig.vectors.T @ (np.sqrt(P) * step) / 2, rtol=1e-12)


@pytest.mark.parametrize("adam", [False, True])
def test_torch_second_moment_is_read_in_float64_without_x64(adam):
    """The torch reader's nu_hat, P, dP/dnu_hat and rate from a float64 model's RMSprop (or Adam at betas[0] = 0)
    after 3 steps, in a process without jax_enable_x64: float64 NumPy, equal to NumPy's own formulas to 1e-14 (a
    pass through jnp would round them to float32, ~3e-8)."""
    torch = pytest.importorskip("torch")
    from eosflow.torch.edge_prediction import second_moment

    torch.manual_seed(5)
    net = torch.nn.Linear(3, 2).double()
    if adam:
        optimizer = torch.optim.Adam(net.parameters(), lr=0.1, betas=(0.0, 0.97), eps=1e-3)
    else:
        optimizer = torch.optim.RMSprop(net.parameters(), lr=0.1, alpha=0.93, eps=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(5, 3, dtype=torch.float64)).pow(2).sum().backward()
        optimizer.step()
    key = "exp_avg_sq" if adam else "square_avg"
    nu = np.concatenate([optimizer.state[p][key].numpy().ravel() for p in net.parameters()])
    rate = 0.03 / (1 - 0.97**4) if adam else 1 - 0.93
    nu = nu / (1 - 0.97**3) if adam else nu
    with jax.enable_x64(False):
        moment = second_moment(net, optimizer, 0.1, np.dtype("float64"))
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in moment)
    np.testing.assert_allclose(moment.nu, nu, rtol=1e-14)
    np.testing.assert_allclose(moment.preconditioner, np.sqrt(nu) + 1e-3, rtol=1e-14)
    np.testing.assert_allclose(moment.slope, 0.5 / np.sqrt(nu), rtol=1e-14)
    np.testing.assert_allclose(moment.rate, rate, rtol=1e-14)


def test_rmsprop_reading_inside_the_users_jit():
    """The tracker with RMSProp's P and predict with its optax state (bias-corrected, count 5) in one jitted step,
    lr and the state traced: the numbers of the call outside the jit to rounding, with X != 0 for m = 2."""
    with precision("float64"):
        loss, params, batch = mlp_loss((3, 4, 2), jnp.tanh, 10, 5)
        rms = eosflow.optimizer_edges.rmsprop(0.05, decay=0.9, eps=1e-3, bias_correction=True)
        opt_state = rms.transform.init(params)
        for _ in range(5):
            opt_state = rms.transform.update(jax.grad(loss)(params, batch), opt_state, params)[1]
        tracker = eosflow.SharpnessTracker(loss, k=2, tol=1e-10, max_iters=300)
        state = tracker.init(params, jax.random.key(1))

        @jax.jit
        def step(opt_state, lr):
            eig = tracker.update(state, params, batch, rms.preconditioner(opt_state))[1]
            return eig, edge_prediction.predict(
                loss, params, batch, eig, lr, optimizer=rms, opt_state=opt_state, margin=0.0
            )

        eig = step(opt_state, 0.05)[0]
        lr = 2.0 / float(eig.values[1]) * (1 + 1e-6)
        eig, inside = step(opt_state, lr)
        same = eosflow.optimizer_edges.rmsprop(lr, decay=0.9, eps=1e-3, bias_correction=True)
        outside = edge_prediction.predict(loss, params, batch, eig, lr, optimizer=same, opt_state=opt_state, margin=0.0)
        assert int(inside.critical) == int(outside.critical) == 2
        for field in ("loss", "sharpening", "covariance", "predicted_loss"):
            np.testing.assert_allclose(getattr(inside, field), getattr(outside, field), rtol=1e-9, atol=1e-12)
        assert np.trace(np.asarray(inside.covariance)) > 0
