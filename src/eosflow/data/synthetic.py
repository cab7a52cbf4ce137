"""Synthetic sets: standard-normal inputs, targets from a random teacher network (or pure noise).

    x ~ N(0, I_D)
    teacher(x) = A tanh(W x / sqrt(D)) / sqrt(m),   W (m x D), A (outputs x m) standard normal
    gaussian:                y ~ N(0, I_outputs), independent of x (nothing to learn but memorization)
    teacher (regression):    y = teacher(x) + noise * N(0, I_outputs)
    teacher (classification): label = argmax_k teacher(x)_k over K = classes outputs

The teacher's weights and the examples come from separate seeded streams, so the same seed
always gives the same set. Classes of a random teacher are not equally frequent: examples are
drawn until every class has enough for a balanced subset.
"""

from __future__ import annotations

import numpy as np

from eosflow.config import SpecError
from eosflow.data.registry import CLASSIFICATION, REGRESSION, Raw, register_source

_TEACHER_STREAM, _EXAMPLE_STREAM = 1, 2


def teacher_network(input_dim: int, width: int, outputs: int, seed: int):
    """The teacher x -> A tanh(W x / sqrt(D)) / sqrt(m) (rows of x are examples)."""
    rng = np.random.default_rng([seed, _TEACHER_STREAM])
    hidden = rng.standard_normal((width, input_dim))
    readout = rng.standard_normal((outputs, width))

    def teacher(x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ hidden.T / np.sqrt(input_dim)) @ readout.T / np.sqrt(width)

    return teacher


@register_source(
    REGRESSION,
    "gaussian",
    "synthetic: N(0, I) inputs (input_dim) and independent N(0, I) targets (outputs)",
    fields=("input_dim", "outputs"),
)
def gaussian(params, seed: int) -> Raw:
    rng = np.random.default_rng([seed, _EXAMPLE_STREAM])
    n = params.n_train + params.n_test
    x = rng.standard_normal((n, params.input_dim))
    y = rng.standard_normal((n, params.outputs))
    return Raw(x, y, synthetic=True)


@register_source(
    REGRESSION,
    "teacher",
    "synthetic: N(0, I) inputs, targets = random tanh teacher + noise",
    fields=("input_dim", "teacher_width", "outputs", "noise"),
)
def teacher_regression(params, seed: int) -> Raw:
    rng = np.random.default_rng([seed, _EXAMPLE_STREAM])
    n = params.n_train + params.n_test
    x = rng.standard_normal((n, params.input_dim))
    teacher = teacher_network(params.input_dim, params.teacher_width, params.outputs, seed)
    y = teacher(x) + params.noise * rng.standard_normal((n, params.outputs))
    return Raw(x, y, synthetic=True)


@register_source(
    CLASSIFICATION,
    "teacher",
    "synthetic: N(0, I) inputs, label = argmax of a random tanh teacher",
    fields=("input_dim", "teacher_width"),
)
def teacher_classification(params, seed: int, max_draws: int = 100) -> Raw:
    rng = np.random.default_rng([seed, _EXAMPLE_STREAM])
    classes = params.classes
    teacher = teacher_network(params.input_dim, params.teacher_width, classes, seed)
    needed = -(-params.n_train // classes) - (-params.n_test // classes)  # ceil + ceil
    batch = max(4 * needed * classes, 1000)
    xs, ys = [], []
    counts = np.zeros(classes, dtype=int)
    for _ in range(max_draws):
        x = rng.standard_normal((batch, params.input_dim))
        y = np.argmax(teacher(x), axis=1)
        xs.append(x)
        ys.append(y)
        counts += np.bincount(y, minlength=classes)
        if counts.min() >= needed:
            return Raw(np.concatenate(xs), np.concatenate(ys).astype(np.int64), synthetic=True)
    raise SpecError(
        f"the random teacher (`problem.teacher_width` = {params.teacher_width}) rarely outputs some of "
        f"its {classes} classes: {int(counts.min())} of {int(counts.sum())} draws for the rarest, "
        f"{needed} needed; lower `problem.n_train`/`problem.n_test` or change the spec's `seed`"
    )
