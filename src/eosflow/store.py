"""The run directory: crash-safe, chunked, resumable, loadable in one line.

    run_dir/
      spec.toml                 the spec as given (with --set overrides applied)
      spec.resolved.toml        every default filled in
      trajectories/<process>/<first>-<last>.npz   one file per flushed chunk
      checkpoint.npz            process states after the last flushed chunk
      summary.json              status, reason, final numbers
      report/                   figures and the Markdown summary

Every file is written to a temporary name and atomically renamed, so a run killed at any moment
leaves only complete files. Chunks are written before the checkpoint that follows them; on
resume, chunks past the checkpoint are deleted and recomputed (identically).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_NAME = re.compile(r"^(\d{10})-(\d{10})\.npz$")


class StoreError(RuntimeError):
    """A run directory that cannot be used as asked (exists, is corrupt, is not writable)."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=_jsonable).encode()))


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- creation --------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.root / "spec.toml").exists()

    def create(self, spec_text: str, resolved_text: str, overwrite: bool = False) -> None:
        """Start a new run directory; refuses to touch an existing run unless ``overwrite``."""
        if self.exists() and not overwrite:
            raise StoreError(
                f"run directory {str(self.root)!r} already holds a run; pass --resume to continue it "
                "or --overwrite to replace it (nothing was changed)"
            )
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"output path {str(self.root)!r} exists and is not a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise StoreError(f"cannot write to output directory {str(self.root)!r}: {error.strerror}") from None
        if overwrite:
            for sub in ("trajectories", "report"):
                _remove_tree(self.root / sub)
            for name in ("checkpoint.npz", "summary.json", "spec.resolved.toml"):
                (self.root / name).unlink(missing_ok=True)
        atomic_write(self.root / "spec.toml", lambda f: f.write(spec_text.encode()))
        atomic_write(self.root / "spec.resolved.toml", lambda f: f.write(resolved_text.encode()))

    # ---- trajectories ----------------------------------------------------------------------
    def write_chunk(self, process: str, first_step: int, arrays: dict[str, np.ndarray]) -> None:
        """Flush observations for steps first_step .. first_step + n - 1 of one process."""
        n = len(next(iter(arrays.values())))
        name = f"{first_step:010d}-{first_step + n - 1:010d}.npz"
        atomic_write(self.root / "trajectories" / process / name, lambda f: np.savez(f, **arrays))

    def chunk_files(self, process: str) -> list[tuple[int, int, Path]]:
        folder = self.root / "trajectories" / process
        if not folder.is_dir():
            return []
        found = []
        for path in folder.iterdir():
            match = CHUNK_NAME.match(path.name)
            if match:
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)

    def processes(self) -> list[str]:
        folder = self.root / "trajectories"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def read_process(self, process: str) -> dict[str, np.ndarray]:
        """All flushed observations of one process, concatenated over chunks (plus ``step``)."""
        parts: dict[str, list[np.ndarray]] = {}
        steps = []
        for first, last, path in self.chunk_files(process):
            try:
                with np.load(path) as chunk:
                    for key in chunk.files:
                        parts.setdefault(key, []).append(chunk[key])
            except (OSError, ValueError) as error:
                raise StoreError(f"trajectory file {str(path)!r} is corrupt: {error}") from None
            steps.append(np.arange(first, last + 1))
        data = {key: _concat_padded(values) for key, values in parts.items()}
        data["step"] = np.concatenate(steps) if steps else np.zeros(0, dtype=int)
        return data

    def truncate(self, step: int) -> None:
        """Delete every chunk that reaches step ``step`` or later (they will be recomputed)."""
        for process in self.processes():
            for first, last, path in self.chunk_files(process):
                if last >= step:
                    path.unlink()

    # ---- checkpoint and summary ------------------------------------------------------------
    def write_checkpoint(self, step: int, states: dict[str, list[np.ndarray]], meta: dict) -> None:
        arrays = {f"{name}/{i}": leaf for name, leaves in states.items() for i, leaf in enumerate(leaves)}
        header = json.dumps({"step": step, "leaves": {n: len(v) for n, v in states.items()}, **meta})
        arrays["__meta__"] = np.frombuffer(header.encode(), dtype=np.uint8)
        atomic_write(self.root / "checkpoint.npz", lambda f: np.savez(f, **arrays))

    def read_checkpoint(self) -> tuple[int, dict[str, list[np.ndarray]], dict] | None:
        path = self.root / "checkpoint.npz"
        if not path.exists():
            return None
        try:
            with np.load(path) as file:
                meta = json.loads(file["__meta__"].tobytes().decode())
                counts = meta.pop("leaves")
                states = {name: [file[f"{name}/{i}"] for i in range(count)] for name, count in counts.items()}
        except Exception as error:  # any unreadable checkpoint is reported the same way
            raise StoreError(
                f"checkpoint {str(path)!r} is corrupt ({type(error).__name__}: {error}); "
                "rerun with --overwrite to start again (the trajectories are kept until then)"
            ) from None
        return meta.pop("step"), states, meta

    def write_summary(self, summary: dict) -> None:
        write_json(self.root / "summary.json", summary)

    def read_summary(self) -> dict:
        path = self.root / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}


def _concat_padded(values: list[np.ndarray]) -> np.ndarray:
    """Concatenate along axis 0, NaN-padding trailing axes that grew between chunks."""
    if values[0].ndim <= 1:
        return np.concatenate(values)
    width = max(v.shape[1] for v in values)
    padded = []
    for v in values:
        if v.shape[1] < width:
            pad = np.full((v.shape[0], width - v.shape[1], *v.shape[2:]), np.nan, dtype=np.result_type(v, np.float32))
            v = np.concatenate([v, pad], axis=1)
        padded.append(v)
    return np.concatenate(padded)


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()
