"""Synthetic token-sequence tasks, generated from the seed: sorting and copying.

A sequence s = (s_1, ..., s_T) has tokens drawn uniformly from {0, ..., V - 1} (V = ``vocab``):

    sorting:  input s,                         target sort(s)              (T outputs)
    copying:  input (s, r, ..., r) of length 2T, target s at the last T positions
              (r = V, the "recall" token, marks the positions to fill)

Inputs are integer tokens (n, T_in) from an input vocabulary of V + 1 (the recall token);
targets are integer tokens (n, T) in {0, ..., V - 1}, so each output position is a V-way
classification. Train and test sequences come from separate seeded streams.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from eosflow.config import option
from eosflow.data.prepare import Dataset

_TRAIN_STREAM, _TEST_STREAM = 21, 22
Task = Literal["sorting", "copying"]


@dataclasses.dataclass(frozen=True)
class SequenceData:
    """Which sequences a sequence problem trains on (the data fields of its ``[problem]`` table)."""

    task: Task = option("copying", "sorting: output sort(s); copying: read s, then T recall tokens, output s")
    length: int = option(5, "T, the number of tokens to sort or copy", ge=1)
    vocab: int = option(6, "V, the number of token values (plus one recall token on input)", ge=2)
    n_train: int = option(128, "training sequences", ge=1)
    n_test: int = option(0, "held-out test sequences (0: none)", ge=0)


def input_vocab(params: SequenceData) -> int:
    """V + 1: the token values and the recall token."""
    return params.vocab + 1


def input_length(params: SequenceData) -> int:
    """T for sorting, 2T for copying."""
    return params.length * (2 if params.task == "copying" else 1)


def make_sequences(
    task: Task, n: int, length: int, vocab: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (n, T_in), targets (n, T)) integer arrays of the task."""
    tokens = rng.integers(0, vocab, size=(n, length))
    if task == "sorting":
        return tokens, np.sort(tokens, axis=1)
    recall = np.full((n, length), vocab)
    return np.concatenate([tokens, recall], axis=1), tokens


def load_sequences(params: SequenceData, seed: int) -> Dataset:
    """Train and test sequences of the task (``num_classes`` = V: each target token is a V-way label)."""
    train = make_sequences(
        params.task, params.n_train, params.length, params.vocab, np.random.default_rng([seed, _TRAIN_STREAM])
    )
    test = make_sequences(
        params.task, params.n_test, params.length, params.vocab, np.random.default_rng([seed, _TEST_STREAM])
    )
    return Dataset(*train, *test, num_classes=params.vocab)
