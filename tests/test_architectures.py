"""The architectures suite: ResNet, ViT/transformer, LSTM and the sequence, moons and circles tasks.

Gradients and HVPs of every case are checked against finite differences in tests/test_problems.py
(ARCHITECTURE_CASES); here: third derivatives against finite differences of the HVP, parameter
counts against hand formulas, the tasks' data, and the problems' input checks.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from eosflow.config import SpecError
from eosflow.data.sequences import SequenceData, load_sequences
from eosflow.problems import build_problem
from test_problems import ARCHITECTURE_CASES, _hvp

# D^3 L and H v (test_problems' compiled HVP) compiled once each and called twice: one program holding
# both calls of each compiled every graph twice (compiling is most of these tests' time)
_third_derivative = eqx.filter_jit(lambda objective, w, u, v: objective.third_derivative(w, u, v))


def _third(objective, w, u, v, h):
    """D^3 L[u, v, .] and its central difference (H(w + h u) v - H(w - h u) v) / 2h."""
    exact = _third_derivative(objective, w, u, v)
    fd = (_hvp(objective, w + h * u, v) - _hvp(objective, w - h * u, v)) / (2 * h)
    return exact, fd, _third_derivative(objective, w, v, u)


# one case per architecture (third derivatives compile slowly: ~10-20 s each on a quiet 2-core CPU)
THIRD_DERIVATIVE_CASES = ("resnet_layer_relu", "vit_gelu", "transformer_copying_ce", "lstm_copying", "mlp_circles_ce")


@pytest.mark.parametrize("case", THIRD_DERIVATIVE_CASES)
def test_third_derivative_matches_finite_differences_of_the_hvp(case):
    problem, _ = build_problem(ARCHITECTURE_CASES[case], 0, "float64")
    rng = np.random.default_rng(2)
    d = problem.w0.size
    w = problem.w0 + 0.05 * jnp.asarray(rng.standard_normal(d)) / np.sqrt(d)
    u, v = (jnp.asarray(x / np.linalg.norm(x)) for x in rng.standard_normal((2, d)))
    exact, fd, swapped = _third(problem.objective, w, u, v, 1e-4)
    scale = max(1.0, float(jnp.linalg.norm(exact)))
    assert float(jnp.linalg.norm(exact)) > 1e-8  # not trivially zero (ReLU's piecewise-linear layers included)
    assert float(jnp.linalg.norm(exact - fd)) <= 1e-5 * scale
    assert float(jnp.linalg.norm(exact - swapped)) <= 1e-10 * scale  # D^3 L is symmetric in u, v


def _count(case):
    problem, _ = build_problem(case, 0, "float32")
    return int(problem.w0.size)


def test_parameter_counts_match_hand_formulas():
    # ResNet, 1 input channel, stages (8, 16), one block each, K = 10, norm layer (GroupNorm: 2 C each)
    def conv(i, o, k=3):
        return i * o * k * k + o

    block1 = 2 * 8 + conv(8, 8) + 2 * 8 + conv(8, 8)
    block2 = 2 * 8 + conv(8, 16) + 2 * 16 + conv(16, 16) + conv(8, 16, 1)
    resnet = conv(1, 8) + block1 + block2 + 2 * 16 + 16 * 10 + 10
    assert _count({"name": "resnet"}) == resnet == 5162
    assert _count({"name": "resnet", "norm": "none"}) == resnet - 2 * (8 + 8 + 8 + 16 + 16) == 5050
    # encoder block: 2 LayerNorms (2 D each), attention 4 D^2 (no biases), MLP D m + m + m D + D
    D, m = 16, 32
    block = 4 * D + 4 * D * D + D * m + m + m * D + D
    vit = (4 * D + D) + 16 * D + 2 * block + 2 * D + (D * 10 + 10)  # 2x2 patches of 8x8: 16 tokens of 4
    assert _count({"name": "vit"}) == vit == 4858
    V, T = 6, 5
    sorting = (V + 1) * D + T * D + 2 * block + 2 * D + (D * V + V)
    assert _count({"name": "transformer"}) == sorting
    H, E = 32, 8
    assert _count({"name": "lstm"}) == (V + 1) * E + 4 * H * (E + H) + 4 * H + (H * V + V) == 5502


def test_sequence_tasks():
    sort = load_sequences(SequenceData(task="sorting", length=5, vocab=4, n_train=50, n_test=20), 3)
    assert sort.x_train.shape == (50, 5) and sort.y_train.shape == (50, 5) and sort.x_test.shape == (20, 5)
    np.testing.assert_array_equal(sort.y_train, np.sort(sort.x_train, axis=1))
    assert sort.num_classes == 4 and sort.x_train.min() >= 0 and sort.x_train.max() == 3
    copy = load_sequences(SequenceData(task="copying", length=4, vocab=5, n_train=30, n_test=0), 3)
    assert copy.x_train.shape == (30, 8) and copy.y_train.shape == (30, 4) and copy.x_test.shape == (0, 8)
    np.testing.assert_array_equal(copy.x_train[:, :4], copy.y_train)
    assert (copy.x_train[:, 4:] == 5).all() and copy.y_train.max() <= 4  # the recall token is V
    again = load_sequences(SequenceData(task="copying", length=4, vocab=5, n_train=30, n_test=0), 3)
    other = load_sequences(SequenceData(task="copying", length=4, vocab=5, n_train=30, n_test=0), 4)
    np.testing.assert_array_equal(again.x_train, copy.x_train)
    assert not np.array_equal(other.x_train, copy.x_train)
    # train and test come from separate streams: enlarging the test set leaves the training set as it was
    bigger = load_sequences(SequenceData(task="sorting", length=5, vocab=4, n_train=50, n_test=40), 3)
    np.testing.assert_array_equal(bigger.x_train, sort.x_train)


@pytest.mark.parametrize("dataset", ["moons", "circles"])
def test_moons_and_circles_are_balanced_standardized_and_seeded(dataset):
    case = {"name": "mlp", "dataset": dataset, "classes": 2, "n_train": 40, "n_test": 20, "width": 4}
    problem, _ = build_problem(case, 5, "float64")
    x, y = (np.asarray(a) for a in problem.objective.data)
    assert x.shape == (40, 2) and np.bincount(y.argmax(axis=1)).tolist() == [20, 20]
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-12)
    again, _ = build_problem(case, 5, "float64")
    np.testing.assert_array_equal(np.asarray(again.objective.data[0]), x)


def test_models_learn_their_tasks_from_the_sequence_alone():
    # the sequence models' outputs depend on their inputs: permuting the tokens of one sequence
    # changes the transformer's logits (sorting has a permutation-invariant target, the encoder
    # without positions would be permutation-equivariant, with them it is not)
    problem, _ = build_problem({"name": "transformer", "n_train": 4}, 0, "float64")
    model_fn = problem.objective.loss_on.model
    params = problem.objective.unravel(problem.w0)
    x = problem.objective.data[0]
    logits = model_fn(params, x)
    assert logits.shape == (4, 5, 6)
    shuffled = model_fn(params, x[:, ::-1])
    assert float(jnp.max(jnp.abs(shuffled - logits))) > 1e-3


@pytest.mark.parametrize(
    "case, message",
    [
        ({"name": "resnet", "dataset": "iris", "classes": 3, "n_train": 9}, "not an image dataset"),
        ({"name": "resnet", "channels": [4, 6], "norm": "group", "groups": 4}, "must divide"),
        ({"name": "resnet", "channels": [2, 2, 2, 2, 2]}, "vanish"),
        ({"name": "vit", "patch": 3}, "does not divide"),
        ({"name": "vit", "dim": 6, "heads": 4}, "must divide"),
        ({"name": "lstm", "task": "reverse"}, "task"),
    ],
)
def test_bad_parameters_name_the_field(case, message):
    with pytest.raises(SpecError, match=message):
        build_problem(case, 0, "float32")


# ---- compile size: the derivative graphs are traced once per step function, whatever k -----------
def _traces_of_one_step(process: str, k: int) -> int:
    """How often the loss is traced while one fresh step of ``process`` compiles with k tracked pairs."""
    import jax

    from eosflow.experiment import prepare
    from eosflow.problems import Problem

    traces = [0]

    def loss(w):
        traces[0] += 1
        return 0.5 * jnp.sum(jnp.arange(1.0, 9.0) * w**2) + 0.25 * jnp.sum(w**4)

    with jax.enable_x64(True):
        problem = Problem.from_function(loss, jnp.linspace(0.5, 1.0, 8))
        table = {"steps": 1, "lr": 0.2, "dtype": "float64", "processes": [process], "problem": {"name": "custom"}}
        table["spectrum"] = {"k": k, "k_max": k}
        _, problem, _, processes = prepare(table, problem)
        flow = processes[process]
        traces[0] = 0
        flow.advance(flow.init(problem.w0), 1)
    return traces[0]


@pytest.mark.parametrize("process", ["gd", "central_flow"])
def test_tracking_more_pairs_compiles_no_more_derivative_graphs(process):
    """LOBPCG's HVPs and the central flow's HVPs and pair third derivatives run in one loop body each
    (spectrum.column_loop), and integrate traces the field once: the loss is traced as often at k = 3
    as at k = 1 (a branch per active count traced one more HVP or D^3 L graph per width)."""
    assert _traces_of_one_step(process, 3) == _traces_of_one_step(process, 1)
