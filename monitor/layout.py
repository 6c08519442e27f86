"""The log tree's paths, and the one reader of its JSONL files.

:class:`RunLayout` is the only place that spells a path of the tree (relative to the run
folder ``runs/{run_id}``)::

    monitor_logs/{run_id}.jsonl            the training part's records (every mode)
    monitor_logs/{run_id}_summary.json     its summary
    monitor_logs/{run_id}_meta.json        the run's meta (one per run, beside ``train``)
    {part}_logs/{run_id}.jsonl             an observer part's compact records and alerts
    {part}_logs/{run_id}_detailed.jsonl    its detailed records
    {part}_logs/{run_id}_summary.json      its summary
    tensorboard/                           TensorBoard events (when on)
    .monitor.lock                          held by the writing process while it runs

Writers (:mod:`monitor.part`, :mod:`monitor.session`), :func:`monitor.read_run`, the
report and the tests all ask it. :func:`read_records` is the one JSONL reader, with one
policy for resume and read-back alike: a last line cut short (a write killed midway) is
dropped silently; any other line that is not a JSON object of the record shape is skipped
with one warning per file naming the file and the first bad line. It never raises on
content.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path

from monitor._log import warn_or_log

TRAIN = "train"
"""The training part's name (its folder is ``monitor_logs``, which also holds meta)."""
LOCK_NAME = ".monitor.lock"
TENSORBOARD = "tensorboard"
_FOLDER_SUFFIX = "_logs"
_PART_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_run_id(run_id: object) -> str:
    """A run id is a single, non-empty path component."""
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
    if "/" in run_id or "\\" in run_id or os.sep in run_id or ".." in run_id or run_id == ".":
        raise ValueError(f"run_id must not contain a path separator or '..', got {run_id!r}")
    if "\0" in run_id:
        raise ValueError(f"run_id must not contain a NUL character, got {run_id!r}")
    return run_id


def validate_part(name: object) -> str:
    """A part name names a folder (``{part}_logs``): letters, digits, ``_.-``; not the
    training folder's ``monitor``."""
    if not isinstance(name, str) or not _PART_NAME.fullmatch(name) or name == "monitor":
        raise ValueError("a part name must be letters, digits, '_', '.' or '-' (not "
                         f"'monitor', the training folder's), got {name!r}")
    return name


def _name_size(relative: str) -> int:
    return len(os.fsencode(relative.rsplit("/", 1)[-1]))


def _name_max(run_dir: Path) -> int:
    """``NAME_MAX`` of the filesystem that holds (or will hold) ``run_dir``."""
    folder = run_dir.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def folder_of(part: str) -> str:
    """The folder of ``part``'s files."""
    return "monitor_logs" if part == TRAIN else f"{part}{_FOLDER_SUFFIX}"


TEMP_NAME_EXTRA = len("..") + 8
"""What an atomic replace's temporary file adds to a JSON file's name:
``.{name}.XXXXXXXX`` (``tempfile.mkstemp``'s prefix and 8 random characters)."""


class RunLayout:
    """Every relative path of one run's log tree (see the module docstring).

    Args:
        run_id: the run id (a single path component).
        run_dir: where the tree goes; when given, the run id must also be short enough that
            every file name fits that filesystem's ``NAME_MAX`` (255 bytes where unknown).
    """

    def __init__(self, run_id: str, run_dir: str | os.PathLike | None = None) -> None:
        self.run_id = validate_run_id(run_id)
        if run_dir is not None:
            self._check_fits(Path(run_dir))

    def longest_name(self) -> int:
        """Bytes of the longest file name the tree uses (a summary's temporary file)."""
        plain = [_name_size(self.stream("x")), _name_size(self.detailed("x"))]
        replaced = [_name_size(self.meta), _name_size(self.summary("x"))]
        return max(plain + [size + TEMP_NAME_EXTRA for size in replaced])

    def _check_fits(self, run_dir: Path) -> None:
        limit = _name_max(run_dir)
        longest = self.longest_name()
        if longest > limit:
            size = len(os.fsencode(self.run_id))
            raise ValueError(
                f"run_id must be at most {size - (longest - limit)} bytes, so that its longest "
                f"file name (.{{run_id}}_summary.json.XXXXXXXX) fits the filesystem's limit of "
                f"{limit} bytes; got {size} bytes ({self.run_id[:40]!r}...)")

    @property
    def meta(self) -> str:
        return f"{folder_of(TRAIN)}/{self.run_id}_meta.json"

    def stream(self, part: str) -> str:
        """The part's main JSONL (training records of every mode, or compact records)."""
        return f"{folder_of(part)}/{self.run_id}.jsonl"

    def detailed(self, part: str) -> str:
        return f"{folder_of(part)}/{self.run_id}_detailed.jsonl"

    def summary(self, part: str) -> str:
        return f"{folder_of(part)}/{self.run_id}_summary.json"

    def temp_files(self, root: Path) -> list[Path]:
        """Temp files an atomic replace of this run's JSON files may have left behind."""
        from glob import escape

        return [tmp for folder in root.glob(f"*{_FOLDER_SUFFIX}")
                for tmp in folder.glob(f".{escape(self.run_id)}*.json.*")]

    def parts_in(self, root: Path, meta: dict | None = None) -> list[str]:
        """The parts with a main JSONL under ``root``: ``train`` first, then the order of
        meta's ``parts`` (the order they were built in), then any other by name."""
        found = set()
        for folder in root.glob(f"*{_FOLDER_SUFFIX}"):
            part = TRAIN if folder.name == folder_of(TRAIN) else folder.name[
                : -len(_FOLDER_SUFFIX)]
            if (root / self.stream(part)).is_file():
                found.add(part)
        listed = list((meta or {}).get("parts") or {}) if isinstance(meta, dict) else []
        order = [TRAIN] + [p for p in listed if isinstance(p, str)]
        ranked = [p for p in dict.fromkeys(order) if p in found]
        return ranked + sorted(found - set(ranked))

    @staticmethod
    def run_ids_in(root: Path) -> list[str]:
        """The run ids that have a meta file under ``root``."""
        suffix = "_meta.json"
        return sorted(m.name[: -len(suffix)] for m in (root / folder_of(TRAIN)).glob(
            f"*{suffix}"))


# -- the one JSONL reader ----------------------------------------------------------------


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file of the log tree (missing file: none).

    A last line without its newline (a write cut short) is dropped; blank lines are
    ignored; any other line that does not parse as a record (not UTF-8, not JSON, not an
    object, a ``step`` that is not an int, ``metrics`` that are not objects of numbers) is
    skipped, with one warning for the file naming it and the first bad line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        warn_or_log(f"monitor: cannot read {path} ({type(exc).__name__}: {exc}); no records "
              "taken from it")
        return []
    lines = data.split(b"\n")
    out: list[dict] = []
    bad: list[tuple[int, str]] = []
    for number, line in enumerate(lines[:-1], start=1):  # after the last \n: cut short
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
            bad.append((number, f"not a JSON line ({type(exc).__name__})"))
            continue
        problem = shape_problem(rec)
        if problem is not None:
            bad.append((number, problem))
            continue
        out.append(rec)
    if bad:
        number, problem = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        warn_or_log(f"monitor: {path}:{number}: {problem}; skipped that line{more} (the other "
              "records are read)")
    return out


def shape_problem(rec: object) -> str | None:
    """Why ``rec`` is not a record of the log tree, or None when it is one."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    step = rec.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        return f"'step' is {step!r}, not an int"
    if "mode" in rec and not isinstance(rec["mode"], str):
        return "'mode' is not a string"
    for key in ("alert", "resume", "histograms"):
        if key in rec and not isinstance(rec[key], dict):
            return f"{key!r} is not an object"
    resume = rec.get("resume")
    if resume is not None and not _is_int(resume.get("supersedes_from_step")):
        return "'resume' has no int 'supersedes_from_step'"
    metrics = rec.get("metrics")
    if metrics is None:
        return None if any(k in rec for k in ("alert", "resume")) else "no 'metrics'"
    if not isinstance(metrics, dict):
        return "'metrics' is not an object"
    for name, value in metrics.items():
        if not isinstance(value, dict):
            return f"metric {name!r} is not an object"
        for key in VALUE_FIELDS:
            problem = _value_problem(key, value.get(key, _MISSING))
            if problem is not None:
                return f"metric {name!r} has {problem}"
    return None


VALUE_FIELDS = ("mean", "std", "min", "max", "count", "nonfinite")
"""The fields of every reduced value object (see ``monitor/README.md``)."""
_MISSING = object()


def _value_problem(key: str, value: object) -> str | None:
    """Why ``value`` cannot be field ``key`` of a value object (None when it can): the
    moments are null or finite numbers, the counts ints >= 0 (the writer never writes NaN
    or Infinity, which Python's reader would accept)."""
    if value is _MISSING:
        return f"no {key!r}"
    if key in ("count", "nonfinite"):
        return None if isinstance(value, int) and _is_int(value) and value >= 0 \
            else f"a {key} of {value!r}"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        return f"a {key} of {value!r}"
    return None


def has_records(path: str | os.PathLike) -> bool:
    """Whether the JSONL file at ``path`` holds at least one whole line of the record shape
    (reads only up to the first one; never raises, never warns)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    return False  # the last line, cut short
                try:
                    rec = json.loads(line.decode("utf-8"))
                except ValueError:
                    continue
                if shape_problem(rec) is None:
                    return True
    except OSError:
        return False
    return False


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object file's content, or None when missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

