"""Datasets: scikit-learn's bundled sets, CIFAR-10 from a local archive, synthetic sets."""

from eosflow.data import sources, synthetic  # noqa: F401  (register the built-in datasets)
from eosflow.data.prepare import (
    ClassificationData,
    DataParams,
    Dataset,
    RegressionData,
    balanced_subset,
    load_classification,
    load_dataset,
    load_regression,
    one_hot,
    standardize,
)
from eosflow.data.registry import CLASSIFICATION, REGRESSION, Raw, register_source

__all__ = [
    "CLASSIFICATION",
    "REGRESSION",
    "ClassificationData",
    "DataParams",
    "Dataset",
    "Raw",
    "RegressionData",
    "balanced_subset",
    "load_classification",
    "load_dataset",
    "load_regression",
    "one_hot",
    "register_source",
    "standardize",
]
