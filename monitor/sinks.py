"""Writing the log tree on the writing rank (rank 0): JSONL streams, JSON files, the lock.

This module writes every file of a run while it runs (TensorBoard's and W&B's own files
are written by those libraries, the report's PNGs by :mod:`monitor.report`; paths come
from :mod:`monitor.layout`, which also holds the one JSONL reader). Ranks that do not
write get :class:`NullRunFiles`, decided once at construction, so call sites never branch
on rank.

How each kind of file is written::

    *.jsonl          one JSON object per line, appended, one ``write`` per whole line
    *_summary.json   replaced atomically (write to a temp file, rename)
    *_meta.json      replaced atomically
    .monitor.lock    held (flock) by the writing process while it runs

Sample JSONL line::

    {"step": 100, "mode": "train", "time": 1764081600.12, "world_size": 2, "metrics":
     {"loss": {"mean": 0.71, "std": 0.05, "min": 0.62, "max": 0.80, "count": 202,
     "nonfinite": 0, "min_rank": 1, "max_rank": 0}}}
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor._log import warn_or_log
from monitor.layout import LOCK_NAME, RunLayout, has_records, read_json, read_records


class RunDirLockedError(RuntimeError):
    """Another live process is writing this run folder (its lock file is held)."""


class WriteHealth:
    """Write failures on the writing rank: counted, warned once, never raised.

    A failed write (permission lost, disk full, ...) is skipped; later writes are tried
    again, so a disk that recovers is used again. ``degraded`` stays True for the rest of
    the session and is written into meta and the summaries whenever they can be written:
    after a failure, the first write that succeeds again calls ``on_recovery`` (the session
    rewrites meta then).
    """

    def __init__(self) -> None:
        self.write_errors = 0
        self.first_write_error: str | None = None
        self.meta_stale = False
        """A failure happened that the meta on disk does not show yet."""
        self.on_recovery: Callable[[], None] | None = None
        self._recovering = False

    def succeeded(self) -> None:
        """A write went through: if meta is stale, have it rewritten now."""
        if self.meta_stale and self.on_recovery is not None and not self._recovering:
            self._recovering = True
            try:
                self.on_recovery()
            finally:
                self._recovering = False

    @property
    def degraded(self) -> bool:
        return self.write_errors > 0

    def failed(self, path: Path, exc: OSError) -> None:
        self.write_errors += 1
        self.meta_stale = True
        if self.first_write_error is not None:
            return
        code = errno.errorcode.get(exc.errno, exc.errno) if exc.errno else "?"
        self.first_write_error = f"{path}: [{code}] {exc.strerror or exc}"
        message = (f"monitor: cannot write {path} ({type(exc).__name__} {code}: "
                   f"{exc.strerror or exc}); training goes on, the monitor is degraded: "
                   "failed writes are skipped and retried at the next record (reported once, "
                   "counted in meta as write_errors)")
        warn_or_log(message, stacklevel=3)  # -W error must not turn a lost disk into a dead run

    def as_meta(self) -> dict:
        return {"degraded": self.degraded, "write_errors": self.write_errors,
                "first_write_error": self.first_write_error}


_orjson: Any
try:  # optional (``monitor[fast]``): the same JSON values, written ~20x faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


def dumps(obj: Any) -> str:
    """Compact strict JSON (NaN/Inf are a bug upstream: records carry null instead).

    With ``orjson`` installed it writes the line (shortest round-trip floats, so every
    value reads back identical; a record of 1,000 metrics in ~0.2 ms instead of ~3 ms;
    a NaN that slipped through becomes null); otherwise the standard library's encoder,
    which raises on NaN/Inf.
    """
    if _orjson is not None:
        try:
            return _orjson.dumps(obj).decode()
        except TypeError:  # a type orjson does not take (e.g. an int key): stdlib below
            pass
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


class JsonlSink:
    """Append-only JSON-lines file: each record is one ``write`` of one whole line.

    The file is opened (``O_APPEND``) for each record and closed after it (records come
    once per flush, so this costs nothing and leaves no handle behind when a run is never
    finalized). Before the first record, and after any failed write, a last line that was
    cut short (a process killed mid-write, a full disk) is truncated, so every line in the
    file parses. An ``OSError`` is reported to ``health`` and the record is skipped.
    """

    def __init__(self, path: Path, health: WriteHealth | None = None) -> None:
        self.path = path
        self._health = health if health is not None else WriteHealth()
        self._repair = True
        try:
            self._prepare()
        except OSError as exc:
            self._health.failed(path, exc)

    def _prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            _truncate_partial_last_line(self.path)
        else:
            self.path.touch()
        self._repair = False

    def write(self, record: dict) -> bool:
        """Append ``record``; True if its line reached the file."""
        data = (dumps(record) + "\n").encode()
        try:
            if self._repair:
                self._prepare()
            _append(self.path, data)
        except OSError as exc:
            self._repair = True  # the line may be half written: cut it before the next one
            self._health.failed(self.path, exc)
            return False
        self._health.succeeded()
        return True


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` whole, or not at all: a write that fails part way (a full disk) is
    cut back at once, since on a disk that stays full no later write would repair it
    (cutting frees blocks, it never needs new ones)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask applies
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            if len(view) < len(data):
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass  # the next record's repair cuts it (JsonlSink._prepare)
            raise
    finally:
        os.close(fd)


class NullSink:
    """What non-writing ranks hold: accepts records, writes nothing."""

    def write(self, record: dict) -> bool:
        return True


def _truncate_partial_last_line(path: Path) -> None:
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(4096, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(pos - step + cut + 1)
                return
            pos -= step
        f.truncate(0)


class RunFiles:
    """The run folder on the writing rank: lock, streams, JSON files, write health.

    Args:
        run_dir: the folder; created if missing.
        run_id: written into the lock file (who holds it).

    Raises:
        ValueError: ``run_dir`` (or a folder above it) exists and is not a directory.
        RunDirLockedError: another live process holds the folder's lock.
    """

    is_writer = True

    def __init__(self, run_dir: str | os.PathLike, run_id: str = "") -> None:
        self.root = Path(run_dir)
        _check_is_dir_or_missing(self.root)
        self.health = WriteHealth()
        self.lock: RunLock | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.health.failed(self.root, exc)
            return
        self.lock = RunLock.acquire(self.root, run_id, self.health)
        if self.lock is not None:
            _remove_stale_temp_files(self.root, run_id)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def jsonl(self, relative: str) -> JsonlSink:
        return JsonlSink(self.path(relative), self.health)

    def read_json(self, relative: str) -> dict | None:
        """A JSON object file's content, or None when missing or unreadable (never raises)."""
        return read_json(self.path(relative))

    def read_jsonl(self, relative: str) -> list[dict]:
        """The records of a JSONL file, read by :func:`monitor.layout.read_records`."""
        return read_records(self.path(relative))

    def holds_records(self, layout: RunLayout) -> bool:
        """Whether any stream of ``layout``'s run already holds a record here."""
        return any(has_records(self.path(relative)) for part in layout.parts_in(self.root)
                   for relative in (layout.stream(part), layout.detailed(part)))

    def write_json(self, relative: str, obj: dict, *, pretty: bool = True,
                   durable: bool = True) -> bool:
        """Replace a JSON file atomically: readers see the old or the new file, never half.

        An ``OSError`` is reported to ``health`` (the old file stays as it was). On a full
        disk (``ENOSPC``, ``EDQUOT``: the temporary file needs new blocks) a ``durable``
        write overwrites the existing file in place instead, in the blocks it already has,
        so meta and the final summaries get their status whenever any write can succeed
        (not atomic: only a crash during that write could tear it; a resumed run rebuilds a
        torn meta from the streams).

        Args:
            pretty: indent for people (Python's encoder: slow for thousands of metrics).
            durable: ``fsync`` before the rename, so the new file survives a machine crash
                (a process crash never leaves half a file either way).

        Returns:
            True if the file was written.
        """
        target = self.path(relative)
        text = (json.dumps(obj, allow_nan=False, indent=2) if pretty else dumps(obj)) + "\n"
        try:
            _replace(target, text, durable)
        except OSError as exc:
            try:
                if not (durable and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
                    raise
                _overwrite(target, text.encode())
            except OSError:
                self.health.failed(target, exc)
                return False
        self.health.succeeded()
        return True

    def close(self) -> None:
        """Release the lock (the OS releases it anyway when the process ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _replace(target: Path, text: str, durable: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600 whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it (Linux ``/proc``), else by setting it
    and putting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _overwrite(target: Path, data: bytes) -> None:
    """Write ``data`` over an existing file's bytes, then cut it to length (no new inode;
    new blocks only if ``data`` is longer than what the file holds)."""
    fd = os.open(target, os.O_WRONLY)  # no O_CREAT: a missing file needs new blocks anyway
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_is_dir_or_missing(root: Path) -> None:
    for folder in (root, *root.parents):
        if folder.exists():
            if folder.is_dir():
                return
            if folder == root:
                raise ValueError(f"run_dir must be a directory, but {str(root)!r} is a file")
            raise ValueError(f"run_dir {str(root)!r} cannot be created: {str(folder)!r} "
                             "above it is a file")


def _remove_stale_temp_files(root: Path, run_id: str) -> None:
    """Temp files of an atomic replace that a killed writer left behind (ours only)."""
    if not run_id:
        return
    for tmp in RunLayout(run_id).temp_files(root):
        try:
            tmp.unlink()
        except OSError:
            pass  # harmless leftover: hidden, never read


class RunLock:
    """An exclusive ``flock`` on ``{run_dir}/.monitor.lock``, held for the session's life.

    One process writes a run folder: a second process gets :class:`RunDirLockedError`.
    Sessions of the same process share the lock (a rank-0-only eval monitor beside the
    training monitor, a facade and its parts). The OS drops the lock when the process
    dies (``kill -9`` included), so a restarted run (torchrun's elastic restart, a manual
    resume) takes it over; the lock file still names the dead holder, and a warning says
    it was taken over. A clean release removes the file.
    """

    _held: dict[str, RunLock] = {}

    def __init__(self, key: str, fd: int, path: Path) -> None:
        self.key, self.fd, self.path, self.users = key, fd, path, 1

    @classmethod
    def acquire(cls, root: Path, run_id: str, health: WriteHealth) -> RunLock | None:
        path = root / LOCK_NAME
        key = os.path.realpath(path)
        held = cls._held.get(key)
        if held is not None:
            held.users += 1
            return held
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
            except OSError as exc:
                health.failed(path, exc)  # no lock on a read-only folder: degraded, not fatal
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirLockedError(
                        f"run_dir {str(root)!r} is in use by another process ({holder}); two "
                        "processes must not write one run folder: give this run another "
                        f"run_dir/run_id, or stop the other process (lock file {str(path)!r})"
                    ) from None
                health.failed(path, exc)
                return None
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder released and removed it meanwhile: lock the new one
        previous = _read_holder(fd)
        if previous:
            warn_or_log(f"monitor: took over the lock of {str(root)!r} from {previous}, "
                        "which ended without releasing it (killed or crashed); this run "
                        "continues the same files", stacklevel=4)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                "time": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError as exc:
            health.failed(path, exc)
        lock = cls._held[key] = cls(key, fd, path)
        return lock

    def release(self) -> None:
        self.users -= 1
        if self.users > 0 or self._held.get(self.key) is not self:
            return
        del self._held[self.key]
        try:
            os.unlink(self.path)  # while still locked: a clean end leaves no lock file
        except OSError:
            pass  # a lock file left behind is harmless: the lock itself is dropped below
        fcntl.flock(self.fd, fcntl.LOCK_UN)  # also if a forked child still has the fd
        os.close(self.fd)

    @classmethod
    def _forget_in_child(cls) -> None:
        """A forked child (a DataLoader worker) must not keep the lock alive after its
        parent died: it closes its copies and holds nothing."""
        for lock in cls._held.values():
            os.close(lock.fd)  # closing a copy does not unlock the parent's
        cls._held.clear()


os.register_at_fork(after_in_child=RunLock._forget_in_child)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _read_holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    if not raw:
        return ""
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on {info['host']}, run_id {info['run_id']!r}"
    except (ValueError, KeyError, TypeError):
        return raw[:200]


class NullRunFiles:
    """The run folder as seen by a rank that never writes."""

    is_writer = False

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.root = Path(run_dir)
        self.health = WriteHealth()

    def path(self, relative: str) -> Path:
        return self.root / relative

    def jsonl(self, relative: str) -> NullSink:
        return NullSink()

    def read_json(self, relative: str) -> dict | None:
        return None

    def read_jsonl(self, relative: str) -> list[dict]:
        return []

    def holds_records(self, layout: RunLayout) -> bool:
        return False

    def write_json(self, relative: str, obj: dict, *, pretty: bool = True,
                   durable: bool = True) -> bool:
        return True

    def close(self) -> None:
        pass
