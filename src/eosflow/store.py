"""The run directory: one writer, crash-safe, chunked, resumable, loadable in one line.

    run_dir/
      writer.lock               flock-ed by the one process writing the run; holds its PID
      spec.toml                 the spec as given (with --set overrides applied)
      spec.resolved.toml        every default filled in
      trajectories/<process>/<first>-<last>.npz   one file per flushed chunk
      checkpoint.npz            process states after the last checkpointed chunk, and the manifest
      checkpoint.previous.npz   the checkpoint before it (a fallback if the last one is damaged)
      summary.json              status, reason, final numbers (rebuilt from the data if lost)
      from_step_<k>.nc          the models restarted on the reference's state at step k
                                (eosflow compare --from; eosflow.anchored.write_anchored)
      from_step.missing.txt     why the last such comparison asked for could not be made
      report/                   figures and the Markdown summary

Every file is written to a temporary name and atomically renamed, so a run killed at any moment
leaves only complete files. Chunks are written before the checkpoint that follows them; the
checkpoint carries the manifest of every chunk before it (steps, size, SHA-256), so a chunk lost
or damaged later is found, by step range. On resume, chunks past the checkpoint are deleted and
recomputed (identically).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shlex
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

CHUNK_NAME = re.compile(r"^(\d{10})-(\d{10})\.npz$")
LOCK_NAME = "writer.lock"
CHECKPOINTS = ("checkpoint.npz", "checkpoint.previous.npz")  # newest first


class StoreError(RuntimeError):
    """A run directory that cannot be used as asked (exists, is corrupt, is not writable)."""


def not_a_run_directory(run_dir: str | Path) -> StoreError:
    """The error for a path that holds no run: says whether it is missing, a file, or a directory without spec.toml."""
    path = Path(run_dir)
    if not path.exists():
        why = "it does not exist"
    elif not path.is_dir():
        why = "it is a file"
    else:
        why = "it has no spec.toml"
    return StoreError(f"{str(run_dir)!r} is not a run directory ({why})")


class RunDirectoryWarning(UserWarning):
    """Something in a run directory was damaged and worked around (a lost summary, a missing chunk)."""


class Checkpoint(NamedTuple):
    """Process states after ``step`` steps. ``meta`` holds "inactive" (dropped processes), "eosflow"
    (the writer's version), "manifest" (chunks before ``step``) and, when the newest checkpoint was
    damaged and this is the one before it, "fallback" (what was wrong)."""

    step: int
    states: dict[str, list[np.ndarray]]
    meta: dict


class Damage(NamedTuple):
    """Steps ``first .. last`` of ``process`` are not on disk as the manifest recorded them."""

    process: str
    first: int
    last: int
    why: str  # "missing", "corrupt (...)"

    def __str__(self) -> str:
        return f"steps {self.first}..{self.last} of {self.process!r} ({self.why})"


def described(damage: list[Damage]) -> str:
    """The damaged ranges for a message, consecutive ones of a process and cause merged (a lost process folder
    is one range, not one per chunk)."""
    merged: list[Damage] = []
    for d in sorted(damage, key=lambda d: (d.process, d.first)):
        last = merged[-1] if merged else None
        if last is not None and (last.process, last.why, last.last + 1) == (d.process, d.why, d.first):
            merged[-1] = last._replace(last=d.last)
        else:
            merged.append(d)
    return "; ".join(map(str, merged))


def atomic_write(path: Path, write, durable: bool = True) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then rename it over. The file gets the
    mode the process's umask gives new files (mkstemp's 0600 would hide runs from collaborators). ``durable=False``
    skips the fsync: the rename is still atomic for other processes and a killed writer, and only the machine's
    crash can leave the file empty (for a file that is rebuilt when unreadable, as summary.json is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=_jsonable).encode()), durable)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


class RunStore:
    """Reads and writes one run directory.

    Writing needs the directory's lock (:meth:`lock`); reading never does. ``manifest`` maps each
    process to ``{file name: [first step, last step, bytes, sha256]}`` of the chunks written or
    verified so far; :meth:`write_checkpoint` stores it with the process states.
    """

    ANCHORED = "from_step_{k}.nc"  # eosflow.anchored.write_anchored's comparison from step k
    ANCHORED_NAME = re.compile(r"^from_step_(\d+)\.nc$")
    ANCHOR_MISSING = "from_step.missing.txt"  # why write_anchored made no comparison (NoAnchorStep)

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest: dict[str, dict[str, list]] = {}
        self._lock_fd: int | None = None

    # ---- the one writer ----------------------------------------------------------------------
    def lock(self) -> None:
        """Become the run directory's only writer, or raise naming the process that is.

        An exclusive ``flock`` on ``writer.lock``: the kernel releases it when the holder exits in
        any way (kill -9 included), so a lock is never stale. File systems without locks (some
        network mounts) run unlocked.
        """
        if self._lock_fd is not None:
            return
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"output path {str(self.root)!r} exists and is not a directory")
        if not self.exists():
            self._check_new_output()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise StoreError(f"cannot write to output directory {str(self.root)!r}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return
            holder = self.writer()
            raise StoreError(
                f"run directory {str(self.root)!r} is being written by another eosflow process "
                f"(PID {holder or 'unknown'}); wait for it to finish, or stop it first "
                f"(kill {holder or '<pid>'}; it keeps every flushed step). Nothing was changed"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for leftover in self.root.rglob(".*.tmp"):  # half-written by a killed writer: the only writer now, they are
            leftover.unlink(missing_ok=True)  # stale (a checkpoint-sized file per kill was left before)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """``with store.locked():`` the block runs as the directory's only writer (:meth:`lock`), released
        however it ends."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def writer(self) -> int | None:
        """The PID of the process writing this run now, or None if no process is."""
        path = self.root / LOCK_NAME
        if self._lock_fd is not None:
            return os.getpid()
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return None
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    # ---- creation --------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.root / "spec.toml").exists()

    def create(self, spec_text: str, resolved_text: str, overwrite: bool = False) -> None:
        """Start a new run directory; refuses to touch an existing run unless ``overwrite``."""
        if self.exists() and not overwrite:
            raise StoreError(
                f"run directory {str(self.root)!r} already holds a run: continue it with `{resume_command(self.root)}` "
                "(resume=True in Python) or replace it with --overwrite (overwrite=True) (nothing was changed)"
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
            for name in (*CHECKPOINTS, "summary.json", "spec.resolved.toml"):
                (self.root / name).unlink(missing_ok=True)
            for _, path in self.anchored_files():  # computed from the replaced run
                path.unlink()
            (self.root / self.ANCHOR_MISSING).unlink(missing_ok=True)
        self.manifest = {}
        self.write_spec(spec_text, resolved_text)

    def write_spec(self, spec_text: str, resolved_text: str) -> None:
        """Write (or, when a resume changes ``steps``, replace) the spec as given and resolved,
        each file atomically; a crash between the two leaves a pair a resume accepts again."""
        self.write_file("spec.toml", spec_text.encode())
        self.write_file("spec.resolved.toml", resolved_text.encode())

    # ---- other files -------------------------------------------------------------------------
    def write_file(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` in the run directory, atomically (the writer holds the lock)."""
        atomic_write(self.root / name, lambda f: f.write(data))

    def _check_new_output(self) -> None:
        """A StoreError, before anything is written, for a new run's directory that holds files a run writes (a
        user's ``report/``, or what is left of a run without its spec.toml) or lies inside another run's."""
        if ours := self.run_files():
            raise StoreError(
                f"output directory {str(self.root)!r} holds no run (no spec.toml) but has {', '.join(ours)}, which a "
                "run writes: choose another output directory, or move them away if they are yours (nothing was "
                "changed; a run whose spec.toml was lost cannot be resumed or overwritten: remove it)"
            )
        for parent in self.root.resolve().parents:
            if (parent / "spec.toml").is_file() and (parent / "trajectories").is_dir():
                raise StoreError(
                    f"output directory {str(self.root)!r} is inside the run directory {str(parent)!r}: choose a "
                    "directory outside it (nothing was changed)"
                )

    def run_files(self) -> list[str]:
        """The names in the directory that a run writes and an overwrite removes (``report/``, ``summary.json``)."""
        if not self.root.is_dir():
            return []
        names = [f"{sub}/" for sub in ("trajectories", "report") if (self.root / sub).exists()]
        names += [name for name in (*CHECKPOINTS, "summary.json", "spec.resolved.toml") if (self.root / name).exists()]
        return names + [path.name for _, path in self.anchored_files()]

    def anchored_files(self) -> list[tuple[int, Path]]:
        """(k, path) of every saved comparison from step k (``from_step_<k>.nc``), by k."""
        if not self.root.is_dir():
            return []
        found = [(int(m[1]), path) for path in self.root.iterdir() if (m := self.ANCHORED_NAME.match(path.name))]
        return sorted(found)

    # ---- trajectories ----------------------------------------------------------------------
    def write_chunk(self, process: str, first_step: int, arrays: dict[str, np.ndarray]) -> None:
        """Flush observations for steps first_step .. first_step + n - 1 of one process."""
        n = len(next(iter(arrays.values())))
        name = f"{first_step:010d}-{first_step + n - 1:010d}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs check **arrays against allow_pickle
        data = buffer.getvalue()
        atomic_write(self.root / "trajectories" / process / name, lambda f: f.write(data))
        self.manifest.setdefault(process, {})[name] = [first_step, first_step + n - 1, len(data), _sha256(data)]

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
        """The processes with chunks on disk: folders of ``trajectories/`` holding a chunk file (another folder,
        such as an editor's ``.ipynb_checkpoints``, is not a process)."""
        folder = self.root / "trajectories"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and self.chunk_files(p.name))

    def read_process(self, process: str) -> dict[str, np.ndarray]:
        """All readable observations of one process (see :meth:`read_checked`), concatenated over chunks."""
        return self.read_checked(process)[0]

    def read_checked(self, process: str, manifest: dict | None = None) -> tuple[dict[str, np.ndarray], list[Damage]]:
        """All readable observations of one process, concatenated over chunks (plus ``step``), and
        the step ranges that are not: a chunk the ``manifest`` lists that is missing or whose
        bytes differ from it, a chunk that does not load, a gap between chunks."""
        listed = (manifest or {}).get(process, {})
        present = {path.name: (first, last, path) for first, last, path in self.chunk_files(process)}
        chunks: list[dict[str, np.ndarray]] = []
        steps, damage = [], []
        for name, (first, last, *_rest) in listed.items():
            if name not in present:
                damage.append(Damage(process, first, last, "missing"))
        for name, (first, last, path) in sorted(present.items(), key=lambda item: item[1][:2]):
            try:
                raw = path.read_bytes()
                if name in listed and [len(raw), _sha256(raw)] != listed[name][2:]:
                    raise ValueError("its size or checksum differs from the manifest")
                with np.load(io.BytesIO(raw)) as chunk:
                    arrays = {key: chunk[key] for key in chunk.files}
            except (OSError, ValueError, EOFError) as error:
                damage.append(Damage(process, first, last, f"corrupt: {error}"))
                continue
            chunks.append(arrays)
            steps.append(np.arange(first, last + 1))
        data = {key: _concat_padded(values) for key, values in _fill_missing_fields(chunks, steps).items()}
        data["step"] = np.concatenate(steps) if steps else np.zeros(0, dtype=int)
        covered = {(d.first, d.last) for d in damage}
        expected = 0
        for first, last in sorted({(int(s[0]), int(s[-1])) for s in steps} | covered):
            if first > expected:
                damage.append(Damage(process, expected, first - 1, "missing"))
            expected = max(expected, last + 1)
        return data, sorted(damage, key=lambda d: d.first)

    def truncate(self, step: int) -> None:
        """Delete every chunk that reaches step ``step`` or later (they will be recomputed)."""
        for process in self.processes():
            for _first, last, path in self.chunk_files(process):
                if last >= step:
                    path.unlink()
                    self.manifest.get(process, {}).pop(path.name, None)

    # ---- checkpoints and summary -----------------------------------------------------------
    def write_checkpoint(self, step: int, states: dict[str, list[np.ndarray]], meta: dict) -> None:
        """Process states after ``step`` steps, with the manifest of every chunk before them.

        The previous checkpoint is kept as ``checkpoint.previous.npz`` (renamed first, so a kill
        at any moment leaves at least one whole checkpoint).
        """
        arrays = {f"{name}/{i}": leaf for name, leaves in states.items() for i, leaf in enumerate(leaves)}
        manifest = self.manifest_before(step)
        header = json.dumps(
            {"step": step, "leaves": {n: len(v) for n, v in states.items()}, **meta, "manifest": manifest}
        )
        arrays["__meta__"] = np.frombuffer(header.encode(), dtype=np.uint8)
        newest, previous = (self.root / name for name in CHECKPOINTS)
        if newest.exists():
            os.replace(newest, previous)
        atomic_write(newest, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]  # as in write_chunk

    def manifest_before(self, step: int) -> dict[str, dict[str, list]]:
        """The manifest's chunks that end before ``step`` (what a checkpoint at ``step`` records)."""
        return {
            process: {name: entry for name, entry in chunks.items() if entry[1] < step}
            for process, chunks in self.manifest.items()
        }

    def read_checkpoint(self) -> Checkpoint | None:
        """The newest readable checkpoint (None if the run has none).

        A damaged newest checkpoint falls back to the previous one (``meta["fallback"]`` says so);
        if every checkpoint is damaged, a StoreError names them.
        """
        checkpoints, problems = self.read_checkpoints()
        if checkpoints:
            return checkpoints[0]
        if problems:
            raise StoreError(
                "; ".join(problems) + "; no whole checkpoint is left: rerun with --overwrite to start "
                "again (the trajectories are kept until then)"
            )
        return None

    def read_checkpoints(self) -> tuple[list[Checkpoint], list[str]]:
        """Every readable checkpoint, newest first, and what is wrong with the unreadable ones."""
        found: list[Checkpoint] = []
        problems: list[str] = []
        for path in (self.root / name for name in CHECKPOINTS):
            if not path.exists():
                continue
            try:
                with np.load(path) as file:
                    meta = json.loads(file["__meta__"].tobytes().decode())
                    counts = meta.pop("leaves")
                    states = {name: [file[f"{name}/{i}"] for i in range(count)] for name, count in counts.items()}
            except Exception as error:  # any unreadable checkpoint is reported the same way
                problems.append(f"checkpoint {str(path)!r} is corrupt ({type(error).__name__}: {error})")
                continue
            if problems and not found:
                meta["fallback"] = f"{problems[0]}; using the previous checkpoint (step {meta['step']}) instead"
            found.append(Checkpoint(meta.pop("step"), states, meta))
        return found, problems

    def read_manifest(self) -> tuple[int, dict] | None:
        """(step, manifest) of the newest readable checkpoint, reading only its header."""
        for path in (self.root / name for name in CHECKPOINTS):
            try:
                with np.load(path) as file:
                    meta = json.loads(file["__meta__"].tobytes().decode())
                return meta["step"], meta.get("manifest") or {}
            except Exception:  # noqa: BLE001, S112  (missing or damaged: the previous one, or none)
                continue
        return None

    def write_summary(self, summary: dict, durable: bool = True) -> None:
        """summary.json; ``durable=False`` (a running run's, after each chunk): no fsync (:func:`atomic_write`)."""
        write_json(self.root / "summary.json", summary, durable)

    def read_summary(self) -> dict:
        """summary.json; if it is missing or unreadable, a summary rebuilt from the spec and the data
        (with ``rebuilt`` saying so, and a :class:`RunDirectoryWarning`). ``{}`` if there is no run."""
        path = self.root / "summary.json"
        try:
            summary = json.loads(path.read_text())
            if isinstance(summary, dict):
                return summary
            why = "does not hold a JSON object"
        except FileNotFoundError:
            why = "is missing"
        except (OSError, ValueError) as error:
            why = f"is unreadable ({type(error).__name__}: {error})"
        if not self.exists():
            return {}
        summary = self.rebuild_summary()
        source = summary.pop("spec_source")
        if why == "is missing" and summary["status"] == "running":
            return summary  # a run starting: its writer has not written the summary yet
        summary["rebuilt"] = f"summary.json {why}; rebuilt from {source} and the trajectories"
        warnings.warn(f"{str(self.root)!r}: {summary['rebuilt']}", RunDirectoryWarning, stacklevel=2)
        return summary

    def resolved_spec(self) -> tuple[dict, str]:
        """(the run's resolved spec, the file it came from): spec.resolved.toml; where that is lost, spec.toml
        resolved again with today's defaults (as written if this eosflow cannot resolve it); else {}."""
        try:
            return tomllib.loads((self.root / "spec.resolved.toml").read_text()), "spec.resolved.toml"
        except (OSError, ValueError):
            pass
        try:
            table = tomllib.loads((self.root / "spec.toml").read_text())
        except (OSError, ValueError):
            return {}, "nothing (spec.toml and spec.resolved.toml are unreadable)"
        from eosflow.spec import resolve  # here only: reading a run otherwise needs no JAX

        try:
            return resolve(table).table, "spec.toml (spec.resolved.toml is missing)"
        except ValueError:  # a SpecError: a problem built in memory, an option since removed
            return table, "spec.toml (spec.resolved.toml is missing)"

    def rebuild_summary(self) -> dict:
        """What the data on disk say about the run: its spec's name, processes, steps and lr, the
        steps on disk, a status (``running`` while a writer holds the lock), and ``spec_source``, the file
        the spec was read from (:meth:`resolved_spec`)."""
        spec, source = self.resolved_spec()
        processes = list(spec.get("processes", [])) or self.processes()
        done = min((self.chunk_files(p)[-1][1] + 1 if self.chunk_files(p) else 0 for p in processes[:1]), default=0)
        total = spec.get("steps")
        reason = ""
        if self.writer() is not None:
            status = "running"
        elif total is not None and done >= total:
            status = "completed"
        else:
            reason = self._divergence_on_disk(processes[:1], spec)
            status = "diverged" if reason else "interrupted"
        return {
            "name": spec.get("name", self.root.name),
            "processes": processes,
            "steps": total,
            "lr": spec.get("lr"),
            "problem": {"name": spec.get("problem", {}).get("name")},
            "status": status,
            "reason": reason,
            "steps_done": done,
            "dropped_processes": {},
            "spec_source": source,
        }

    def _divergence_on_disk(self, reference: list[str], spec: dict) -> str:
        """Why the run stopped, if its reference's last recorded loss is divergent (a run keeps the step it diverged
        at, the last on disk): not finite, or above ``divergence.loss_blowup`` times the initial loss; else ""."""
        chunks = self.chunk_files(reference[0]) if reference else []
        if not chunks or chunks[0][0] != 0:
            return ""
        try:
            with np.load(chunks[0][2]) as first, np.load(chunks[-1][2]) as last:
                initial, final = float(first["loss"][0]), float(last["loss"][-1])
        except (OSError, ValueError, KeyError, IndexError, EOFError):
            return ""
        limit = divergence_limit(float(spec.get("divergence", {}).get("loss_blowup", 1e4)), initial)
        if first_divergent(np.array([final]), limit) is None:
            return ""
        why = divergence_reason(final, chunks[-1][1], limit)
        return f"{reference[0]}: {why} (read from the data: summary.json was lost)"


def divergence_limit(loss_blowup: float, initial_loss: float) -> float:
    """The loss past which a run diverged: ``loss_blowup`` times the initial loss (at least 1e-12)."""
    return loss_blowup * max(abs(initial_loss), 1e-12)


def first_divergent(loss: np.ndarray, limit: float) -> int | None:
    """The first row whose loss is not finite or above ``limit`` in magnitude (None: none)."""
    loss = np.asarray(loss, np.float64)  # a limit beyond float32's range must not be cast down to it (overflow)
    bad = np.flatnonzero(~np.isfinite(loss) | (np.abs(loss) > limit))
    return int(bad[0]) if bad.size else None


def divergence_reason(loss: float, step: int, limit: float) -> str:
    """Why a loss at ``step`` counts as divergent (the run summary's ``reason``)."""
    if not np.isfinite(loss):
        return f"loss became {loss} at step {step}"
    return f"loss {loss:.4g} at step {step} exceeded the blow-up limit {limit:.4g}"


def resume_command(run_dir: str | Path) -> str:
    """The command that continues (and repairs) the run in ``run_dir``."""
    return f"eosflow resume {shlex.quote(str(run_dir))}"


def report_command(run_dir: str | Path) -> str:
    """The command that writes (again) the report of the run in ``run_dir``."""
    return f"eosflow report {shlex.quote(str(run_dir))}"


def writable_folder(path: Path) -> Path:
    """``path`` made (if need be) and checked writable, or a StoreError naming it (a read-only run directory gave
    a traceback from the first figure saved into its report/)."""
    try:
        path.mkdir(exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    except OSError as error:
        raise StoreError(f"cannot write to output directory {str(path)!r}: {error.strerror or error}") from None
    return path


def steps_on_disk(done: int) -> str:
    """What an interrupted run left: "steps 0..n-1 are on disk", or that none is (stopped while compiling)."""
    return f"steps 0..{done - 1} are on disk" if done > 0 else "no step is on disk yet"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fill_missing_fields(chunks: list[dict[str, np.ndarray]], steps: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Per field, its arrays over the chunks, a NaN block where a chunk lacks it: a run resumed or
    repaired by another eosflow version can record a field in some chunks only."""
    fields: dict[str, np.ndarray] = {}
    for arrays in chunks:
        for key, value in arrays.items():
            fields.setdefault(key, value)
    parts: dict[str, list[np.ndarray]] = {}
    for key, template in fields.items():
        whole = all(key in arrays for arrays in chunks)
        for arrays, chunk_steps in zip(chunks, steps, strict=True):
            value = arrays[key] if key in arrays else np.full((len(chunk_steps), *template.shape[1:]), np.nan)
            parts.setdefault(key, []).append(value if whole else value.astype(np.result_type(value, np.float64)))
    return parts


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
