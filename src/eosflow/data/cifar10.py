"""CIFAR-10 read from a local copy of its python version (``cifar-10-python.tar.gz``).

The archive holds ``data_batch_1`` .. ``data_batch_5`` (50 000 training images) and
``test_batch`` (10 000), each a pickled dict with

    b"data":   uint8 array (m, 3072), a row = the R, G, B planes of a 32 x 32 image, row-major
    b"labels": m integers in 0..9

The path is a directory holding the batches (or their ``cifar-10-batches-py`` folder) or the
``.tar.gz`` itself, given by ``problem.data_path`` or the environment variable EOSFLOW_CIFAR10.
Pickles are read with an unpickler that only builds numpy arrays, so a tampered file cannot run
code; anything that is not a batch in this format is rejected with the file's name.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

from eosflow.config import SpecError

ENV_VAR = "EOSFLOW_CIFAR10"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
FOLDER = "cifar-10-batches-py"
IMAGE_SHAPE = (3, 32, 32)
HINT = (
    "eosflow needs the python version of CIFAR-10 (cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html), as the .tar.gz or its extracted folder"
)

_READ_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OSError,
    tarfile.TarError,
    zlib.error,
    struct.error,
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def resolve_path(path: str | None) -> tuple[Path, str]:
    """The archive's path and where it came from (for messages): the spec, else $EOSFLOW_CIFAR10."""
    if path:
        where = f"`problem.data_path` = {path!r}"
    elif os.environ.get(ENV_VAR):
        path = os.environ[ENV_VAR]
        where = f"${ENV_VAR} = {path!r}"
    else:
        raise SpecError(f"dataset 'cifar10' needs a local copy: set `problem.data_path` or ${ENV_VAR}; {HINT}")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise SpecError(f"{where} does not exist; {HINT}")
    return resolved.resolve(), where


def read_batch(stream, file: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 images (m, 3, 32, 32), int64 labels (m,)), or SpecError naming ``file``."""
    try:
        batch = _ArrayUnpickler(stream, encoding="bytes").load()
    except _READ_ERRORS as error:
        raise SpecError(f"CIFAR-10 file {file!r} is corrupt or not a python-pickle batch ({error}); {HINT}") from None
    if not isinstance(batch, dict):
        raise SpecError(f"CIFAR-10 file {file!r} holds a {type(batch).__name__}, not a batch dict; {HINT}")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise SpecError(f"CIFAR-10 file {file!r} lacks the keys b'data' and b'labels' (has {sorted(batch)}); {HINT}")
    data, labels = batch["data"], np.asarray(batch["labels"])
    size = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size:
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise SpecError(f"CIFAR-10 file {file!r}: b'data' must be uint8 of shape (m, {size}), got {described}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise SpecError(f"CIFAR-10 file {file!r}: b'labels' must hold {len(data)} integers, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise SpecError(f"CIFAR-10 file {file!r}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(len(data), *IMAGE_SHAPE), labels.astype(np.int64)


def _read_directory(root: Path, where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if (root / FOLDER).is_dir():
        root = root / FOLDER
    batches = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        file = root / name
        if not file.is_file():
            raise SpecError(f"CIFAR-10 folder {str(root)!r} (from {where}) has no {name}; {HINT}")
        with open(file, "rb") as stream:
            batches[name] = read_batch(stream, str(file))
    return batches


def _read_tar(archive: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    batches = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in (*TRAIN_BATCHES, TEST_BATCH):
                if name not in members:
                    raise SpecError(f"CIFAR-10 archive {str(archive)!r} has no {name}; {HINT}")
                stream = tar.extractfile(members[name])
                assert stream is not None  # extractfile returns None only for members that are not regular files
                batches[name] = read_batch(io.BytesIO(stream.read()), f"{archive}:{members[name].name}")
    except SpecError:
        raise
    except _READ_ERRORS as error:
        raise SpecError(
            f"CIFAR-10 archive {str(archive)!r} is corrupt or not a tar archive ({error}); {HINT}"
        ) from None
    return batches


@functools.lru_cache(maxsize=1)
def _load_cached(path: str, stamp: tuple, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    root = Path(path)
    batches = _read_directory(root, where) if root.is_dir() else _read_tar(root)
    x_train = np.concatenate([batches[name][0] for name in TRAIN_BATCHES])
    y_train = np.concatenate([batches[name][1] for name in TRAIN_BATCHES])
    x_test, y_test = batches[TEST_BATCH]
    arrays = (x_train, y_train, x_test, y_test)
    for array in arrays:
        array.flags.writeable = False
    return arrays


def load_cifar10(path: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): uint8 images (n, 3, 32, 32) and int64 labels.

    Cached per process (keyed by the path and the modification time and size of the archive, or of every file in
    the folder: a batch rewritten in place leaves the folder's own time as it was), so sweeps read it once.
    """
    root, where = resolve_path(path)
    files = sorted(root.rglob("*")) if root.is_dir() else [root]
    stamp = tuple((str(f), (info := f.stat()).st_mtime_ns, info.st_size) for f in files if f.is_file())
    return _load_cached(str(root), stamp, where)
