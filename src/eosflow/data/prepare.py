"""Turning a named dataset into training and test arrays: subsets, standardization, targets.

Classification: n_train examples from the first K classes, as equal per class as n allows, and
a disjoint class-balanced test split (from the rest of the pool, or from the dataset's official
test pool when it has one, as CIFAR-10 does). Regression: a seeded random split.
Real inputs (and regression targets) are standardized by the training split's statistics;
synthetic sets are standard normal by construction and are left as drawn.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eosflow.config import SpecError, option, suggest, warn_unused
from eosflow.data.registry import CLASSIFICATION, REGRESSION


@dataclasses.dataclass(frozen=True)
class DataParams:
    """Which examples a problem trains on (the data fields of a ``[problem]`` table)."""

    dataset: str = option("digits", "dataset name (`eosflow problems` lists them)")
    n_train: int = option(500, "training examples", ge=1)
    n_test: int = option(300, "held-out test examples (0: none)", ge=0)
    input_dim: int = option(16, "input dimension D of the synthetic sets", ge=1)
    teacher_width: int = option(32, "hidden width m of the synthetic sets' random tanh teacher", ge=1)
    data_path: str | None = option(
        None, "file of the `npz` dataset, or the CIFAR-10 archive (.tar.gz or folder; default $EOSFLOW_CIFAR10)"
    )


@dataclasses.dataclass(frozen=True)
class ClassificationData(DataParams):
    classes: int = option(10, "number of classes K used (the first K labels)", ge=2)


@dataclasses.dataclass(frozen=True)
class RegressionData(DataParams):
    dataset: str = option("gaussian", "dataset name (`eosflow problems` lists them)")
    n_train: int = option(128, "training examples", ge=1)
    n_test: int = option(0, "held-out test examples (0: none)", ge=0)
    input_dim: int = option(8, "input dimension D of the synthetic sets", ge=1)
    outputs: int = option(4, "target dimension of the synthetic sets", ge=1)
    noise: float = option(0.0, "std of the label noise added to the synthetic `teacher` targets", ge=0)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Inputs (n x ...) and targets, split into train and test.

    Targets are integer labels (n,) for classification (``num_classes`` = K) and float arrays
    (n, outputs) for regression (``num_classes`` = None). ``train_index``/``test_index`` locate
    the examples in the source's pool (the test index in its official test pool, if it has one).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    train_index: np.ndarray | None = None
    test_index: np.ndarray | None = None

    def flat(self) -> Dataset:
        """The same examples with each input flattened to a vector (for MLPs)."""
        size = int(np.prod(self.x_train.shape[1:]))
        return dataclasses.replace(self, x_train=self.x_train.reshape(-1, size), x_test=self.x_test.reshape(-1, size))


def balanced_subset(
    labels: np.ndarray,
    n: int,
    classes: int,
    seed: int,
    field: str = "problem.n_train",
    kept: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of n examples drawn from the classes ``kept`` (default: the first ``classes`` present), as equal
    per class as n allows.

    Seeded and order-independent: the same (labels, n, classes, seed) always gives the same indices.
    """
    labels = np.asarray(labels)
    if kept is None:
        kept = kept_classes(labels, classes)
    if n < classes:
        raise SpecError(f"`{field}` = {n} is smaller than `problem.classes` = {classes}")
    rng = np.random.default_rng(seed)
    per_class = [n // classes + (1 if i < n % classes else 0) for i in range(classes)]
    chosen = []
    for label, count in zip(kept, per_class):
        pool = np.flatnonzero(labels == label)
        if count > len(pool):
            raise SpecError(
                f"`{field}` = {n} asks for {count} examples of class {label} but only {len(pool)} are "
                f"available; lower `{field}`"
            )
        chosen.append(rng.choice(pool, size=count, replace=False))
    return np.sort(np.concatenate(chosen))


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Centre and scale every feature by the training set's mean and std (constant features kept at 0)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def kept_classes(labels: np.ndarray, classes: int) -> np.ndarray:
    """The first ``classes`` distinct labels, the classes a subset is drawn from."""
    present = np.unique(labels)
    if classes > len(present):
        raise SpecError(f"`problem.classes` = {classes} but the dataset has only {len(present)} classes")
    return present[:classes]


def class_labels(targets: np.ndarray, name: str) -> np.ndarray:
    """A classification set's targets as integer labels (n,), or a SpecError: one-hot rows, or labels that are not
    whole numbers (0.5 was truncated to class 0)."""
    labels = np.asarray(targets)
    if labels.ndim != 1:
        raise SpecError(
            f"dataset {name!r}: class labels must be integers of shape (n,), got shape {labels.shape} (one-hot "
            "rows? give their argmax)"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            raise SpecError(
                f"dataset {name!r}: class labels must be whole numbers, got {labels[~whole][0]} ({labels.dtype})"
            )
        labels = labels.astype(np.int64)
    return labels


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[np.asarray(labels, dtype=int)]


def check_finite(name: str, array: np.ndarray) -> None:
    if array.size == 0:
        raise SpecError(f"dataset {name!r} is empty after subsetting")
    if not np.all(np.isfinite(array)):
        bad = int(np.sum(~np.isfinite(array)))
        raise SpecError(f"dataset {name!r} contains {bad} NaN or infinite values")


SOURCE_FIELDS = ("input_dim", "teacher_width", "outputs", "noise", "data_path")  # read by some datasets only


def warn_unread_fields(params: DataParams, registry: dict) -> None:
    """A SpecWarning for each dataset-specific field set away from its default that the dataset does not read
    (``outputs`` with ``diabetes``), as for any option with no effect (:func:`eosflow.config.warn_unused`)."""
    entry = registry[params.dataset]
    if entry.fields is None:  # a source that does not declare its fields: unchecked
        return
    unused = {}
    for key in SOURCE_FIELDS:
        if hasattr(params, key) and key not in entry.fields:
            readers = sorted(name for name, other in registry.items() if other.fields and key in other.fields)
            uses = (
                f"only {', '.join(readers)} read{'s' if len(readers) == 1 else ''} it" if readers else "none reads it"
            )
            unused[key] = f"dataset {params.dataset!r} does not read it ({uses})"
    warn_unused(params, "problem", unused)


def _raw(registry: dict, task: str, params: DataParams, seed: int):
    if params.dataset not in registry:
        raise SpecError(
            f"unknown {task} dataset `problem.dataset` = {params.dataset!r}{suggest(params.dataset, registry)}"
        )
    warn_unread_fields(params, registry)
    return registry[params.dataset].load(params, seed)


def _finish(name: str, raw, x_train, y_train, x_test, y_test, standardize_targets: bool, **fields) -> Dataset:
    x_train, x_test = (np.asarray(a, dtype=np.float64) for a in (x_train, x_test))
    check_finite(name, x_train)
    if len(x_test):
        check_finite(name, x_test)
    if not raw.synthetic:
        x_train, x_test = standardize(x_train, x_test)
        if standardize_targets:
            y_train, y_test = standardize(y_train, y_test)
    return Dataset(x_train, y_train, x_test, y_test, **fields)


def load_classification(params: ClassificationData, seed: int) -> Dataset:
    """A class-balanced train/test split of a classification set, inputs standardized."""
    raw = _raw(CLASSIFICATION, "classification", params, seed)
    labels = class_labels(raw.targets, params.dataset)
    kept = kept_classes(labels, params.classes)  # class c of the problem is label kept[c] of the dataset
    train = balanced_subset(labels, params.n_train, params.classes, seed, kept=kept)
    if raw.test_inputs is not None:
        test_inputs, test_labels = raw.test_inputs, class_labels(raw.test_targets, params.dataset)
        pool = np.arange(len(test_labels))
    else:
        test_inputs, test_labels = raw.inputs, labels
        pool = np.setdiff1d(np.arange(len(labels)), train)
    test = (
        pool[balanced_subset(test_labels[pool], params.n_test, params.classes, seed + 1, "problem.n_test", kept)]
        if params.n_test > 0
        else pool[:0]
    )
    return _finish(
        params.dataset,
        raw,
        raw.inputs[train],
        np.searchsorted(kept, labels[train]),
        test_inputs[test],
        np.searchsorted(kept, test_labels[test]),
        False,
        num_classes=params.classes,
        train_index=train,
        test_index=test,
    )


def load_regression(params: RegressionData, seed: int) -> Dataset:
    """A seeded random train/test split of a regression set (real inputs and targets standardized)."""
    raw = _raw(REGRESSION, "regression", params, seed)
    n = len(raw.targets)
    if params.n_train + params.n_test > n:
        raise SpecError(
            f"`problem.n_train` + `problem.n_test` = {params.n_train + params.n_test} exceeds the "
            f"{n} examples of dataset {params.dataset!r}"
        )
    order = np.random.default_rng([seed, 3]).permutation(n)
    train, test = np.sort(order[: params.n_train]), np.sort(order[params.n_train : params.n_train + params.n_test])
    targets = np.asarray(raw.targets, dtype=np.float64)
    if targets.ndim == 1:  # one output, the usual layout of a target vector
        targets = targets[:, None]
    if targets.ndim != 2:
        raise SpecError(f"dataset {params.dataset!r}: targets must be (n, outputs), got shape {targets.shape}")
    return _finish(
        params.dataset,
        raw,
        raw.inputs[train],
        targets[train],
        raw.inputs[test],
        targets[test],
        True,
        num_classes=None,
        train_index=train,
        test_index=test,
    )


def load_dataset(name: str, n_train: int, n_test: int, classes: int, seed: int, **fields) -> Dataset:
    """``load_classification`` by name (other :class:`ClassificationData` fields as keywords)."""
    return load_classification(
        ClassificationData(dataset=name, n_train=n_train, n_test=n_test, classes=classes, **fields), seed
    )
