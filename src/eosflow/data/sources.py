"""The built-in datasets: scikit-learn's bundled sets, CIFAR-10 from a local archive, and the user's
own arrays (``npz``), registered in :mod:`eosflow.data.registry` (the synthetic sets are in
:mod:`eosflow.data.synthetic`).
"""

from __future__ import annotations

import numpy as np

from eosflow.config import SpecError
from eosflow.data.cifar10 import load_cifar10
from eosflow.data.registry import CLASSIFICATION, REGRESSION, Raw, register_source


def _sklearn(loader: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets  # here, not at the top: it takes seconds and only these sources use it

    bunch = getattr(sklearn.datasets, loader)(**kwargs)
    return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)


@register_source(
    CLASSIFICATION, "digits", "scikit-learn's 8x8 handwritten digits, 1797 images (1x8x8), 10 classes", fields=()
)
def digits(params=None, seed: int = 0) -> Raw:
    x, y = _sklearn("load_digits")
    return Raw(x.reshape(-1, 1, 8, 8), y.astype(np.int64))


@register_source(CLASSIFICATION, "iris", "scikit-learn's iris flowers: 150 examples, 4 features, 3 classes", fields=())
def iris(params=None, seed: int = 0) -> Raw:
    x, y = _sklearn("load_iris")
    return Raw(x, y.astype(np.int64))


@register_source(
    CLASSIFICATION, "wine", "scikit-learn's wine recognition: 178 examples, 13 features, 3 classes", fields=()
)
def wine(params=None, seed: int = 0) -> Raw:
    x, y = _sklearn("load_wine")
    return Raw(x, y.astype(np.int64))


@register_source(
    CLASSIFICATION,
    "breast_cancer",
    "scikit-learn's breast cancer (Wisconsin): 569 examples, 30 features, 2 classes",
    fields=(),
)
def breast_cancer(params=None, seed: int = 0) -> Raw:
    x, y = _sklearn("load_breast_cancer")
    return Raw(x, y.astype(np.int64))


@register_source(
    CLASSIFICATION,
    "cifar10",
    "CIFAR-10 from a local python-pickle archive (3x32x32, 10 classes; `data_path` or $EOSFLOW_CIFAR10)",
    fields=("data_path",),
)
def cifar10(params, seed: int = 0) -> Raw:
    x_train, y_train, x_test, y_test = load_cifar10(getattr(params, "data_path", None))
    return Raw(x_train, y_train, x_test, y_test)


def _two_class_shapes(generator: str, params, seed: int) -> Raw:
    """Balanced 2-D two-class points from scikit-learn's generator, seeded; enough for train and test."""
    import sklearn.datasets

    n = 2 * (params.n_train + params.n_test) + 2  # even and >= twice what a balanced split draws
    kwargs = {"factor": 0.5} if generator == "make_circles" else {}
    x, y = getattr(sklearn.datasets, generator)(n_samples=n, noise=0.1, random_state=seed, **kwargs)
    return Raw(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64))


@register_source(
    CLASSIFICATION,
    "moons",
    "scikit-learn's two interleaving half-moons (2-D, noise 0.1), drawn from the seed, 2 classes",
    fields=(),
)
def moons(params, seed: int = 0) -> Raw:
    return _two_class_shapes("make_moons", params, seed)


@register_source(
    CLASSIFICATION,
    "circles",
    "scikit-learn's two concentric circles (2-D, radii 1 and 0.5, noise 0.1), from the seed, 2 classes",
    fields=(),
)
def circles(params, seed: int = 0) -> Raw:
    return _two_class_shapes("make_circles", params, seed)


@register_source(
    REGRESSION, "diabetes", "scikit-learn's diabetes progression: 442 examples, 10 features, 1 target", fields=()
)
def diabetes(params=None, seed: int = 0) -> Raw:
    x, y = _sklearn("load_diabetes")
    return Raw(x, y.reshape(-1, 1))


@register_source(
    REGRESSION, "linnerud", "scikit-learn's Linnerud exercise data: 20 examples, 3 features, 3 targets", fields=()
)
def linnerud(params=None, seed: int = 0) -> Raw:
    x, y = _sklearn("load_linnerud")
    return Raw(x, np.asarray(y, dtype=np.float64).reshape(len(x), -1))


@register_source(
    CLASSIFICATION,
    "npz",
    "your own arrays: a .npz file (`data_path`) with `x` (n, ...) and integer labels `y` (n,)",
    fields=("data_path",),
)
@register_source(
    REGRESSION,
    "npz",
    "your own arrays: a .npz file (`data_path`) with `x` (n, ...) and targets `y` (n, outputs)",
    fields=("data_path",),
)
def npz(params, seed: int = 0) -> Raw:
    """Read ``x`` and ``y`` from a NumPy archive, checking that they exist and agree in length."""
    path = getattr(params, "data_path", None)
    if not path:
        raise SpecError("dataset `npz` needs `problem.data_path`, the .npz file holding arrays `x` and `y`")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise SpecError(f"{path!r} has no array {missing[0]!r} (it has {', '.join(archive.files) or 'none'})")
            inputs, targets = archive["x"], archive["y"]
    except FileNotFoundError:
        raise SpecError(f"`problem.data_path` = {path!r} does not exist") from None
    except TypeError:  # np.load of a .npy gives its one array, which `with` cannot hold
        raise SpecError(f"`problem.data_path` = {path!r} is one array (.npy), not a .npz of `x` and `y`") from None
    except (OSError, ValueError) as error:
        raise SpecError(f"`problem.data_path` = {path!r} is not a readable .npz file ({error})") from None
    if inputs.ndim == 0 or targets.ndim == 0:
        raise SpecError(
            f"{path!r}: `x` and `y` must hold one row per example, got shapes {inputs.shape}, {targets.shape}"
        )
    if len(inputs) != len(targets):
        raise SpecError(f"mismatched shapes in {path!r}: `x` has {len(inputs)} examples but `y` has {len(targets)}")
    if len(inputs) == 0:
        raise SpecError(f"dataset {path!r} is empty")
    if not np.issubdtype(inputs.dtype, np.number) or not np.issubdtype(targets.dtype, np.number):
        raise SpecError(f"{path!r}: `x` and `y` must be numeric arrays, got {inputs.dtype} and {targets.dtype}")
    if not np.all(np.isfinite(targets)):
        raise SpecError(f"dataset {path!r} has {int(np.sum(~np.isfinite(targets)))} NaN or infinite targets")
    return Raw(np.asarray(inputs, dtype=np.float64), targets)
