"""The dataset registries: ``source(params, seed) -> Raw`` by name, one registry per task.

Classification sources give integer labels, regression sources float targets (n x outputs).
Inputs keep their natural shape: images are (n, channels, height, width) (digits: 1 x 8 x 8,
CIFAR-10: 3 x 32 x 32), tabular sets (n, features). ``params`` is the problem's data table
(:class:`eosflow.data.prepare.ClassificationData` or ``RegressionData``); a source reads the
fields it needs (the synthetic sets their dimensions, CIFAR-10 its path). The built-in sources
live in :mod:`eosflow.data.sources` and :mod:`eosflow.data.synthetic`; ``eosflow.data`` imports both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Raw:
    """A labelled pool to draw subsets from, optionally with its own official test pool.

    Attributes:
        inputs: (n, ...) features or images.
        targets: (n,) integer labels, or (n, outputs) regression targets.
        test_inputs, test_targets: an official held-out pool (CIFAR-10's test batch), if any.
        synthetic: inputs drawn standard-normal by construction, so never re-standardized.
    """

    inputs: np.ndarray
    targets: np.ndarray
    test_inputs: np.ndarray | None = None
    test_targets: np.ndarray | None = None
    synthetic: bool = False


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """A dataset: its loader, a one-line summary, and the dataset-specific fields of the problem table it reads
    (of ``input_dim``, ``teacher_width``, ``outputs``, ``noise``, ``data_path``; None: not declared, unchecked)."""

    name: str
    load: Callable[..., Raw]
    summary: str
    fields: tuple[str, ...] | None = None


CLASSIFICATION: dict[str, SourceEntry] = {}
REGRESSION: dict[str, SourceEntry] = {}


def register_source(registry: dict[str, SourceEntry], name: str, summary: str, fields: tuple[str, ...] | None = None):
    """Decorator: ``load(params, seed) -> Raw`` becomes the dataset ``name`` of that task; ``fields``: the
    dataset-specific fields it reads (a spec setting another gets a SpecWarning), None to leave them unchecked."""

    def decorate(load):
        registry[name] = SourceEntry(name, load, summary, fields)
        return load

    return decorate
