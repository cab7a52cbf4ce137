"""Property-based tests: the eigensolver against dense eigh, the SDCP solver's KKT conditions,
the run store's round trips."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eosflow.flows.sdcp import smat, solve_sdcp, svec
from eosflow.spectrum import lobpcg, random_vectors
from eosflow.store import RunStore

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@jax.jit
def _dense_lobpcg(a, start):
    return lobpcg(lambda v: a @ v, start, tol=1e-9, max_iters=1000)


@SETTINGS
@given(
    dim=st.sampled_from([5, 12, 30]),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    shift=st.floats(-5, 5),
    spread=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_lobpcg_top_eigenvalues_match_dense_eigh(dim, k, seed, shift, spread):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((dim, dim))
    a = spread * (0.5 * (a + a.T) + shift * np.eye(dim))
    exact = np.linalg.eigvalsh(a)[::-1][:k]
    start = random_vectors(jax.random.PRNGKey(seed % 1000), dim, k, jnp.float64)
    pairs = _dense_lobpcg(jnp.asarray(a), start)  # one compilation per (dim, k)
    scale = np.abs(np.linalg.eigvalsh(a)).max()
    np.testing.assert_allclose(np.asarray(pairs.values), exact, atol=1e-7 * scale)
    # the contract: every accepted pair has relative residual <= tol (or the iteration cap was hit)
    vectors = np.asarray(pairs.vectors)
    residual = np.linalg.norm(a @ vectors - vectors * np.asarray(pairs.values), axis=0)
    assert np.all(residual <= 1e-9 * np.maximum(np.abs(np.asarray(pairs.values)), 1e-30) + 1e-12 * scale)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(k), atol=1e-8)


_solve_sdcp = jax.jit(solve_sdcp)


@SETTINGS
@given(
    m=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    columns=st.sampled_from([1, 2, 6]),
    scale=st.sampled_from([1e-3, 1.0, 1e2]),
    shift=st.floats(-3, 1),
)
def test_sdcp_solution_satisfies_kkt(m, seed, columns, scale, shift):
    """find X >= 0 with Z = alpha + beta[X] >= 0 and <X, Z> = 0, beta = Gs Gs^T on svec: checked
    with numpy's eigvalsh in float64, beta applied as the dense p x p matrix."""
    rng = np.random.default_rng(seed)
    p = m * (m + 1) // 2
    grads = scale * rng.standard_normal((p, columns * p))
    beta = grads @ grads.T
    alpha = rng.standard_normal((m, m))
    alpha = 0.5 * (alpha + alpha.T) + shift * np.eye(m)
    X = np.asarray(_solve_sdcp(jnp.asarray(alpha), jnp.asarray(beta)).X)
    Z = alpha + np.asarray(smat(jnp.asarray(beta @ np.asarray(svec(jnp.asarray(X))))))
    size = 1.0 + np.abs(alpha).max()
    assert np.linalg.eigvalsh(X).min() >= -1e-8 * (1 + np.abs(X).max())
    assert np.linalg.eigvalsh(Z).min() >= -1e-8 * size
    assert abs(np.sum(X * Z)) <= 1e-8 * size * (1 + np.abs(X).max())


chunk_lengths = st.lists(st.integers(1, 7), min_size=1, max_size=6)


@SETTINGS
@given(lengths=chunk_lengths, width=st.integers(1, 4), cut=st.integers(0, 40), seed=st.integers(0, 1000))
def test_store_write_read_truncate_round_trip(tmp_path_factory, lengths, width, cut, seed):
    store = RunStore(tmp_path_factory.mktemp("store"))
    rng = np.random.default_rng(seed)
    written, step = [], 0
    for n in lengths:
        chunk = {"loss": rng.standard_normal(n), "eigenvalues": rng.standard_normal((n, width))}
        store.write_chunk("gd", step, chunk)
        written.append(chunk)
        step += n
    data = store.read_process("gd")
    np.testing.assert_array_equal(data["step"], np.arange(step))
    np.testing.assert_array_equal(data["loss"], np.concatenate([c["loss"] for c in written]))
    np.testing.assert_array_equal(data["eigenvalues"], np.concatenate([c["eigenvalues"] for c in written]))
    # truncating at a step drops exactly the chunks that reach it
    store.truncate(cut)
    kept = store.read_process("gd")["step"]
    starts = np.cumsum([0] + lengths[:-1])
    ends = starts + np.array(lengths) - 1
    expected = np.concatenate([np.arange(s, e + 1) for s, e in zip(starts, ends) if e < cut] or [np.zeros(0, int)])
    np.testing.assert_array_equal(kept, expected)


@SETTINGS
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=5),
    step=st.integers(0, 10**6),
    seed=st.integers(0, 1000),
)
def test_checkpoint_round_trip_is_exact(tmp_path_factory, shapes, step, seed):
    store = RunStore(tmp_path_factory.mktemp("ckpt"))
    rng = np.random.default_rng(seed)
    leaves = [rng.standard_normal(shape).astype(rng.choice([np.float32, np.float64])) for shape in shapes]
    store.write_checkpoint(step, {"gd": leaves, "rod_flow": leaves[:1]}, {"inactive": {"x": "why"}})
    read_step, states, meta = store.read_checkpoint()
    assert read_step == step and meta["inactive"] == {"x": "why"} and "fallback" not in meta
    for original, restored in zip(leaves, states["gd"]):
        assert original.dtype == restored.dtype
        np.testing.assert_array_equal(original, restored)
    assert len(states["rod_flow"]) == 1
