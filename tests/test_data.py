"""Datasets: balanced seeded subsets, standardization, synthetic sets, the CIFAR-10 reader."""

import pickle
import re
import tarfile
import warnings

import numpy as np
import pytest
from sklearn.datasets import load_digits

from eosflow.config import SpecError, SpecWarning
from eosflow.data import (
    ClassificationData,
    RegressionData,
    balanced_subset,
    load_classification,
    load_regression,
    one_hot,
)
from eosflow.data.cifar10 import load_cifar10


# ---- subsets, splits, standardization --------------------------------------------------------
@pytest.mark.parametrize("n, classes", [(100, 10), (37, 10), (9, 3)])
def test_balanced_subset_counts_and_seed(n, classes):
    labels = np.random.default_rng(0).integers(0, 12, size=3000)
    idx = balanced_subset(labels, n, classes, seed=5)
    assert len(idx) == n and len(np.unique(idx)) == n
    counts = np.bincount(labels[idx], minlength=12)
    assert counts[classes:].sum() == 0  # only the first K classes
    assert counts[:classes].max() - counts[:classes].min() <= 1 and counts[:classes].sum() == n
    assert np.array_equal(idx, balanced_subset(labels, n, classes, seed=5))
    assert not np.array_equal(idx, balanced_subset(labels, n, classes, seed=6))


def test_digits_split_is_balanced_disjoint_and_standardized_by_train_statistics():
    params = ClassificationData(dataset="digits", n_train=200, n_test=100, classes=10)
    data = load_classification(params, seed=3)
    raw = load_digits().data.reshape(-1, 1, 8, 8)
    assert data.x_train.shape == (200, 1, 8, 8) and data.x_test.shape == (100, 1, 8, 8)
    assert np.all(np.bincount(data.y_train) == 20) and np.all(np.bincount(data.y_test) == 10)
    assert np.intersect1d(data.train_index, data.test_index).size == 0
    assert np.array_equal(data.y_train, load_digits().target[data.train_index])
    mean, std = raw[data.train_index].mean(0), raw[data.train_index].std(0)
    std = np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(data.x_train, (raw[data.train_index] - mean) / std, atol=1e-12)
    np.testing.assert_allclose(data.x_test, (raw[data.test_index] - mean) / std, atol=1e-12)
    again = load_classification(params, seed=3)
    assert np.array_equal(again.train_index, data.train_index) and np.array_equal(again.x_test, data.x_test)
    assert data.flat().x_train.shape == (200, 64)


@pytest.mark.parametrize("name, features, classes", [("iris", 4, 3), ("wine", 13, 3), ("breast_cancer", 30, 2)])
def test_other_bundled_classification_sets(name, features, classes):
    data = load_classification(ClassificationData(dataset=name, n_train=30, n_test=12, classes=classes), seed=0)
    assert data.x_train.shape == (30, features)
    assert np.all(np.bincount(data.y_train) == 30 // classes)
    np.testing.assert_allclose(data.x_train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(data.x_train.std(0), 1, atol=1e-12)


def test_one_hot_rows():
    labels = np.array([3, 0, 2, 2])
    targets = one_hot(labels, 5)
    assert targets.shape == (4, 5)
    np.testing.assert_array_equal(targets.sum(1), 1)
    np.testing.assert_array_equal(np.argmax(targets, 1), labels)


def test_subset_errors_name_the_field():
    with pytest.raises(SpecError, match="problem.n_train"):
        load_classification(ClassificationData(dataset="iris", n_train=200, n_test=0, classes=3), 0)
    with pytest.raises(SpecError, match="problem.classes"):
        load_classification(ClassificationData(dataset="iris", n_train=20, n_test=0, classes=4), 0)
    with pytest.raises(SpecError, match="did you mean `digits`"):
        load_classification(ClassificationData(dataset="digit"), 0)
    with pytest.raises(SpecError, match="exceeds the 20 examples"):
        load_regression(RegressionData(dataset="linnerud", n_train=15, n_test=10), 0)


# ---- synthetic and regression sets -------------------------------------------------------------
def test_gaussian_regression_set_is_standard_normal_and_seeded():
    params = RegressionData(dataset="gaussian", n_train=4000, n_test=1000, input_dim=3, outputs=2)
    data = load_regression(params, seed=1)
    assert data.x_train.shape == (4000, 3) and data.y_train.shape == (4000, 2) and data.y_test.shape == (1000, 2)
    pooled = np.concatenate([data.x_train, data.y_train], axis=1)
    np.testing.assert_allclose(pooled.mean(0), 0, atol=0.06)  # ~4 standard errors of 1/sqrt(4000)
    np.testing.assert_allclose(np.cov(pooled.T), np.eye(5), atol=0.08)
    assert np.array_equal(load_regression(params, seed=1).x_train, data.x_train)
    assert not np.array_equal(load_regression(params, seed=2).x_train, data.x_train)


def test_teacher_regression_noise_is_added_with_the_requested_std():
    base = RegressionData(dataset="teacher", n_train=3000, n_test=0, input_dim=5, outputs=1, noise=0.0)
    clean = load_regression(base, seed=0)
    noisy = load_regression(RegressionData(**{**base.__dict__, "noise": 0.3}), seed=0)
    np.testing.assert_array_equal(clean.x_train, noisy.x_train)
    residual = noisy.y_train - clean.y_train
    assert abs(residual.std() - 0.3) < 0.02 and abs(residual.mean()) < 0.02
    assert clean.y_train.std() > 0.2  # the teacher's signal is not zero


def test_teacher_classification_is_balanced():
    params = ClassificationData(dataset="teacher", n_train=100, n_test=50, classes=5, input_dim=6)
    data = load_classification(params, seed=4)
    assert np.all(np.bincount(data.y_train) == 20) and np.all(np.bincount(data.y_test) == 10)
    assert np.array_equal(load_classification(params, seed=4).x_train, data.x_train)


@pytest.mark.parametrize("name, features, outputs", [("diabetes", 10, 1), ("linnerud", 3, 3)])
def test_bundled_regression_sets_are_standardized(name, features, outputs):
    data = load_regression(RegressionData(dataset=name, n_train=15, n_test=5), seed=0)
    assert data.x_train.shape == (15, features) and data.y_train.shape == (15, outputs)
    np.testing.assert_allclose(data.y_train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(data.y_train.std(0), 1, atol=1e-12)
    assert np.intersect1d(data.train_index, data.test_index).size == 0


@pytest.mark.parametrize(
    "params, message",
    [
        (
            RegressionData(dataset="diabetes", n_train=15, outputs=3),
            r"`problem.outputs` = 3 has no effect: dataset 'diabetes' does not read it \(only gaussian, teacher read",
        ),
        (
            RegressionData(dataset="gaussian", n_train=15, noise=0.5),
            r"`problem.noise` = 0.5 has no effect: dataset 'gaussian' does not read it \(only teacher reads it\)",
        ),
        (
            ClassificationData(dataset="iris", n_train=9, n_test=0, classes=3, data_path="x.npz"),
            r"`problem.data_path` = 'x.npz' has no effect: dataset 'iris' does not read it \(only cifar10, npz",
        ),
    ],
)
def test_a_field_the_dataset_does_not_read_is_warned_about(params, message):
    """Set away from its default, a field only other datasets read (the synthetic sets' sizes, a file path) is
    named with the dataset, as any option with no effect is; a field the dataset reads is not."""
    load = load_regression if isinstance(params, RegressionData) else load_classification
    with pytest.warns(SpecWarning, match=message):
        load(params, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        load_regression(RegressionData(dataset="teacher", n_train=15, input_dim=3, outputs=2, noise=0.5), seed=0)


# ---- CIFAR-10 in its real python-pickle format -------------------------------------------------
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def encode_planes(images_hwc: np.ndarray) -> np.ndarray:
    """Rows of 3072 bytes: entry c*1024 + r*32 + col holds pixel (r, col) of channel c (R, G, B)."""
    m = len(images_hwc)
    rows = np.zeros((m, 3072), dtype=np.uint8)
    for c in range(3):
        for r in range(32):
            rows[:, c * 1024 + r * 32 : c * 1024 + r * 32 + 32] = images_hwc[:, r, :, c]
    return rows


def write_cifar(folder, per_batch=20, seed=0):
    """A miniature CIFAR-10: six pickled batches (protocol 2, bytes keys, as the real files)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name in BATCHES:
        images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [int(i % 10) for i in range(per_batch)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": encode_planes(images),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        truth[name] = (images, np.array(labels))
    return truth


def test_cifar_reader_maps_rgb_planes_to_chw_from_folder_and_tar(tmp_path):
    truth = write_cifar(tmp_path / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    train_images = np.concatenate([truth[n][0] for n in BATCHES[:5]])
    for path in (tmp_path, tmp_path / "cifar-10-batches-py", archive):
        x_train, y_train, x_test, y_test = load_cifar10(str(path))
        assert x_train.shape == (100, 3, 32, 32) and x_test.shape == (20, 3, 32, 32)
        np.testing.assert_array_equal(x_train, train_images.transpose(0, 3, 1, 2))
        np.testing.assert_array_equal(x_test[:, 1], truth["test_batch"][0][..., 1])  # the G plane
        np.testing.assert_array_equal(y_train, np.concatenate([truth[n][1] for n in BATCHES[:5]]))


def test_a_cifar_batch_rewritten_in_place_is_read_again(tmp_path):
    """The cache was keyed by the folder's own modification time, which a batch rewritten in place leaves alone: the
    same process kept the old arrays (from a probe; a notebook or a sweep worker)."""
    import os

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, seed=0)
    first = load_cifar10(str(folder))[0]
    stamp = os.stat(folder).st_mtime_ns
    truth = write_cifar(folder, seed=1)  # the same files, other images
    os.utime(folder, ns=(stamp, stamp))  # (writing files in place leaves it so; made sure here)
    second = load_cifar10(str(folder))[0]
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second[:20], truth["data_batch_1"][0].transpose(0, 3, 1, 2))


def test_cifar_through_the_dataset_layer_with_the_env_var(tmp_path, monkeypatch):
    truth = write_cifar(tmp_path / "c", per_batch=30)
    monkeypatch.setenv("EOSFLOW_CIFAR10", str(tmp_path / "c"))
    data = load_classification(ClassificationData(dataset="cifar10", n_train=40, n_test=20, classes=10), seed=0)
    assert data.x_train.shape == (40, 3, 32, 32)
    assert np.all(np.bincount(data.y_train) == 4) and np.all(np.bincount(data.y_test) == 2)
    raw_test = truth["test_batch"][0].transpose(0, 3, 1, 2)[data.test_index] / 255.0
    raw_train = np.concatenate([truth[n][0] for n in BATCHES[:5]]).transpose(0, 3, 1, 2)[data.train_index] / 255.0
    mean, std = raw_train.mean(0), raw_train.std(0)
    np.testing.assert_allclose(data.x_test, (raw_test - mean) / std, atol=1e-9)


def test_cifar_missing_or_corrupt_archives_are_rejected_by_name(tmp_path, monkeypatch):
    monkeypatch.delenv("EOSFLOW_CIFAR10", raising=False)
    with pytest.raises(SpecError, match="EOSFLOW_CIFAR10"):
        load_cifar10(None)
    with pytest.raises(SpecError, match="does not exist"):
        load_cifar10(str(tmp_path / "nowhere"))

    write_cifar(tmp_path / "missing")
    (tmp_path / "missing" / "data_batch_4").unlink()
    with pytest.raises(SpecError, match="has no data_batch_4"):
        load_cifar10(str(tmp_path / "missing"))

    write_cifar(tmp_path / "truncated")
    file = tmp_path / "truncated" / "data_batch_2"
    file.write_bytes(file.read_bytes()[:500])
    with pytest.raises(SpecError, match="data_batch_2.*corrupt"):
        load_cifar10(str(tmp_path / "truncated"))

    write_cifar(tmp_path / "shape")
    (tmp_path / "shape" / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=2)
    )
    with pytest.raises(SpecError, match="test_batch.*uint8 of shape"):
        load_cifar10(str(tmp_path / "shape"))

    write_cifar(tmp_path / "evil")
    marker = tmp_path / "executed"
    evil = pickle.dumps(_Exploit(str(marker)), protocol=2)
    (tmp_path / "evil" / "data_batch_1").write_bytes(evil)
    with pytest.raises(SpecError, match="data_batch_1.*refusing"):
        load_cifar10(str(tmp_path / "evil"))
    assert not marker.exists()

    archive = tmp_path / "broken.tar.gz"
    write_cifar(tmp_path / "t")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "t", arcname="cifar-10-batches-py")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(SpecError, match="broken.tar.gz"):
        load_cifar10(str(archive))


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_cnn_and_mlp_run_on_a_cifar_archive(tmp_path):
    from eosflow.experiment import run
    from eosflow.problems import build_problem

    write_cifar(tmp_path / "c", per_batch=20)
    base = {"dataset": "cifar10", "data_path": str(tmp_path / "c"), "n_train": 20, "n_test": 10}
    problem, _ = build_problem({"name": "cnn", "channels": [2, 2], **base}, 0, "float32")
    convs = (3 * 3 * 3 * 2 + 2) + (3 * 3 * 2 * 2 + 2)
    assert problem.w0.size == convs + (2 * 8 * 8 * 10 + 10)  # 32x32 -> 16x16 -> 8x8
    assert problem.test_objective.data[0].shape == (10, 3, 32, 32)
    mlp, _ = build_problem({"name": "mlp", "width": 4, "depth": 1, **base}, 0, "float32")
    assert mlp.w0.size == 3072 * 4 + 4 + 4 * 10 + 10
    table = {
        "steps": 2,
        "lr": 0.01,
        "processes": ["gd"],
        "spectrum": {"every": 0},
        "problem": {"name": "cnn", "channels": [2, 2], **base},
    }
    assert run(table, tmp_path / "cnn", overwrite=True).status == "completed"


# ---- your own arrays (.npz) --------------------------------------------------------------------


def _npz(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("labels", [(1, 2, 3), (0, 5, 7), (-1, 4, 9)])
def test_npz_class_labels_are_renumbered_to_the_problems_classes(tmp_path, labels):
    """Labels other than 0..K-1 gave an IndexError (mse), a NaN run (cross entropy) or a wrapped class (-1 read as
    the last; from a probe): class c of the problem is now the c-th smallest label, as for the built-in sets."""
    x = np.random.default_rng(0).standard_normal((60, 5))
    order = np.repeat([0, 1, 2], 20)
    reference = load_classification(
        ClassificationData(
            dataset="npz", data_path=_npz(tmp_path, "plain", x=x, y=order), classes=3, n_train=30, n_test=6
        ),
        0,
    )
    data = load_classification(
        ClassificationData(
            dataset="npz",
            data_path=_npz(tmp_path, "other", x=x, y=np.asarray(labels)[order]),
            classes=3,
            n_train=30,
            n_test=6,
        ),
        0,
    )
    for a, b in [(data.x_train, reference.x_train), (data.y_train, reference.y_train), (data.y_test, reference.y_test)]:
        np.testing.assert_array_equal(a, b)
    assert set(np.unique(data.y_train)) == {0, 1, 2}


@pytest.mark.parametrize(
    "y, message",
    [
        (np.tile([0.5, 1.5, 2.5], 20), "class labels must be whole numbers, got 0.5"),
        (np.eye(3)[np.repeat([0, 1, 2], 20)], "class labels must be integers of shape (n,), got shape (60, 3)"),
    ],
)
def test_npz_labels_that_are_not_class_indices_are_refused(tmp_path, y, message):
    """Float labels were truncated to classes (0.5 -> 0) and one-hot rows read as "only 2 classes" (a probe)."""
    x = np.random.default_rng(0).standard_normal((60, 5))
    params = ClassificationData(
        dataset="npz", data_path=_npz(tmp_path, "bad", x=x, y=y), classes=3, n_train=30, n_test=6
    )
    with pytest.raises(SpecError, match=re.escape(message)):
        load_classification(params, 0)


def test_npz_regression_targets_may_be_one_vector(tmp_path):
    """y of shape (n,), the usual layout of one output, ended in an IndexError inside the network (a probe)."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal(40)
    column, vector = (
        load_regression(
            RegressionData(dataset="npz", data_path=_npz(tmp_path, name, x=x, y=t), n_train=30, n_test=5), 0
        )
        for name, t in (("column", y[:, None]), ("vector", y))
    )
    np.testing.assert_array_equal(vector.y_train, column.y_train)
    assert vector.y_train.shape == (30, 1)
    bad = RegressionData(dataset="npz", data_path=_npz(tmp_path, "cube", x=x, y=np.zeros((40, 2, 2))), n_train=30)
    with pytest.raises(SpecError, match=re.escape("targets must be (n, outputs), got shape (40, 2, 2)")):
        load_regression(bad, 0)


def test_an_npy_file_or_a_scalar_npz_is_named(tmp_path):
    """Both ended in a TypeError traceback (a probe)."""
    np.save(tmp_path / "plain.npy", np.zeros((4, 2)))
    for path, message in [
        (str(tmp_path / "plain.npy"), "is one array (.npy), not a .npz of `x` and `y`"),
        (
            _npz(tmp_path, "scalar", x=np.float64(1.0), y=np.float64(2.0)),
            "must hold one row per example, got shapes ()",
        ),
    ]:
        with pytest.raises(SpecError, match=re.escape(message)):
            load_regression(RegressionData(dataset="npz", data_path=path, n_train=1), 0)


def test_a_test_split_with_too_few_examples_names_n_test():
    """iris with n_train = 150 leaves nothing to test on; the message said the dataset had "only 0 classes"."""
    with pytest.raises(SpecError, match=r"`problem.n_test` = 3 asks for 1 examples of class 0 but only 0"):
        load_classification(ClassificationData(dataset="iris", classes=3, n_train=150, n_test=3), 0)
