"""Reading a run's log tree back: ``monitor.read_run(run_dir)``.

Example::

    import monitor

    run = monitor.read_run("runs/demo")
    run.parts                                 # ['train', 'lfp', 'film', 'moe', 'aggr']
    run["train"].records[-1]["metrics"]["loss"]["mean"]
    run["moe"].alerts                         # alert records
    df = run["lfp"].to_pandas()               # needs pandas: one row per compact record
    df[["step", "overall/p_keep.mean"]]
    run["lfp"].to_pandas("detailed")          # detailed records (histograms left out)
    run.meta["participation"]["decision"], run["lfp"].summary["status"]

Each part is a :class:`PartLog` with plain lists of dicts, exactly the JSONL lines:
``records`` (compact, or the training records of every mode with their ``mode``),
``detailed``, ``alerts``, and ``summary`` (the part's ``*_summary.json``, or None).
Files are read by :func:`monitor.layout.read_records`: a last line cut short (a run killed
mid-write) is dropped; any other unreadable or wrong-shaped line is skipped with one warning
naming the file and line. Parts are found in the tree (any ``{part}_logs/`` folder with a
compact JSONL, so a user's own observer reads back too), ordered as meta lists them.
A resumed run reads as one history: the dead segment's records at steps the new segment
did again are dropped, like the resume markers (``monitor.records.live_records``).
DataFrames have flat columns: ``step``, ``time``, ``world_size``, ``mode`` (training),
then ``{metric}.{field}`` for ``mean``, ``std``, ``min``, ``max``, ``count``, ``nonfinite``,
``min_rank``, ``max_rank`` and ``nonfinite_ranks`` (a list of ranks, or None where the
record had no NaN/Inf in that metric), and ``eta2/{metric}.{field}`` (``value``,
``chance``, ``groups``, ``count``) for each ``eta2`` of a run with groups. Per-group values
are metrics like the others (``groups/{group}/{metric}.mean``); :meth:`PartLog.eta2` and
:meth:`PartLog.group_names` read them too::

    run["moe"].eta2("siglip_weight")          # (steps, eta2 per record)
    run["moe"].group_names()                  # ['open the drawer', ...]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from monitor.layout import TRAIN, RunLayout, read_json, read_records
from monitor.records import GROUP_PREFIX, live_records

FIELDS = ("mean", "std", "min", "max", "count", "nonfinite", "min_rank", "max_rank",
          "nonfinite_ranks")
ETA2_FIELDS = ("value", "chance", "groups", "count")


@dataclass
class PartLog:
    """One part's records, as plain dicts."""

    name: str
    records: list[dict] = field(default_factory=list)
    detailed: list[dict] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    summary: dict | None = None

    def metric(self, key: str, stat: str = "mean", *, mode: str | None = "train",
               detailed: bool = False) -> tuple[list[int], list[float | None]]:
        """``(steps, values)`` of one metric's ``stat`` over the records that hold it
        (training records of ``mode`` only; ``mode=None`` for observer parts)."""
        steps, values = [], []
        for rec in self.detailed if detailed else self.records:
            if self.name == "train" and mode is not None and rec.get("mode") != mode:
                continue
            value = rec.get("metrics", {}).get(key)
            if value is not None:
                steps.append(rec["step"])
                values.append(value.get(stat))
        return steps, values

    def metric_names(self, detailed: bool = False) -> list[str]:
        """Every metric key seen, in order of first appearance."""
        seen: dict[str, None] = {}
        for rec in self.detailed if detailed else self.records:
            seen.update(dict.fromkeys(rec.get("metrics", {})))
        return list(seen)

    def eta2(self, metric: str, *, detailed: bool = False
             ) -> tuple[list[int], list[float | None]]:
        """``(steps, eta2 values)`` of ``metric`` over the records that computed it (the
        objects' ``value``: None where it was undefined)."""
        steps, values = [], []
        for rec in self.detailed if detailed else self.records:
            table = rec.get("eta2")
            if isinstance(table, dict) and isinstance(table.get(metric), dict):
                steps.append(rec["step"])
                values.append(table[metric].get("value"))
        return steps, values

    def eta2_names(self, detailed: bool = False) -> list[str]:
        """Every metric with an ``eta2``, in order of first appearance."""
        seen: dict[str, None] = {}
        for rec in self.detailed if detailed else self.records:
            seen.update(dict.fromkeys(rec.get("eta2") or {}))
        return list(seen)

    def group_names(self) -> list[str]:
        """The groups that have values, in order of first appearance (the declared order
        of ``group_names`` in a run reduced on matching ranks)."""
        seen: dict[str, None] = {}
        for key in (*self.metric_names(), *self.metric_names(detailed=True)):
            if key.startswith(GROUP_PREFIX):
                seen[key[len(GROUP_PREFIX):].partition("/")[0]] = None
        return list(seen)

    def to_pandas(self, which: str = "records"):
        """A DataFrame of ``records``, ``detailed`` or ``alerts`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError('to_pandas() needs pandas: pip install "monitor[pandas]"') from exc
        if which not in ("records", "detailed", "alerts"):
            raise ValueError(f"which must be 'records', 'detailed' or 'alerts', got {which!r}")
        rows = [flatten(rec) for rec in getattr(self, which)]
        return pd.DataFrame(rows)


def flatten(rec: dict) -> dict:
    """One flat row: top-level scalars, ``{metric}.{field}``, ``eta2/{metric}.{field}``,
    ``alert.{key}``."""
    row = {k: v for k, v in rec.items() if k not in ("metrics", "histograms", "alert", "eta2")}
    for key, value in rec.get("metrics", {}).items():
        for f in FIELDS:
            row[f"{key}.{f}"] = value.get(f)
    for key, value in (rec.get("eta2") or {}).items():
        for f in ETA2_FIELDS:
            row[f"eta2/{key}.{f}"] = value.get(f) if isinstance(value, dict) else None
    for key, value in (rec.get("alert") or {}).items():
        row[f"alert.{key}"] = value
    return row


@dataclass
class RunLog:
    """A run folder read back: ``meta`` and one :class:`PartLog` per part found."""

    run_dir: Path
    run_id: str
    meta: dict | None
    logs: dict[str, PartLog]

    @property
    def parts(self) -> list[str]:
        return list(self.logs)

    def __getitem__(self, part: str) -> PartLog:
        try:
            return self.logs[part]
        except KeyError:
            raise KeyError(f"run {self.run_id!r} has no {part!r} logs "
                           f"(parts: {self.parts})") from None

    def __contains__(self, part: str) -> bool:
        return part in self.logs

    def to_pandas(self) -> dict:
        """``{part: DataFrame of its records}`` (needs pandas)."""
        return {name: log.to_pandas() for name, log in self.logs.items()}

    @property
    def alerts(self) -> list[dict]:
        """Every part's alert records, each with its ``part``, by step."""
        out = [{**a, "part": name} for name, log in self.logs.items() for a in log.alerts]
        return sorted(out, key=lambda a: a["step"])


def read_run(run_dir: str | os.PathLike, run_id: str | None = None) -> RunLog:
    """Read ``run_dir``'s log tree (see the module docstring).

    Args:
        run_dir: the run folder (``runs/{run_id}``).
        run_id: which files, when the folder holds several runs' files (default: the one
            meta file in ``monitor_logs/``, else the folder's name).

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder.
        ValueError: several runs' files and no ``run_id``.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no run folder at {str(root)!r}")
    layout = RunLayout(run_id or _guess_run_id(root))
    meta = read_json(root / layout.meta)
    logs = {}
    for part in layout.parts_in(root, meta):
        lines = live_records(read_records(root / layout.stream(part)))  # resume overlap dropped
        log = PartLog(part, records=[r for r in lines if "alert" not in r],
                      alerts=[r for r in lines if "alert" in r],
                      summary=read_json(root / layout.summary(part)))
        if part != TRAIN:
            log.detailed = live_records(read_records(root / layout.detailed(part)))
        logs[part] = log
    return RunLog(root, layout.run_id, meta, logs)


def _guess_run_id(root: Path) -> str:
    ids = RunLayout.run_ids_in(root)
    if len(ids) == 1:
        return ids[0]
    if len(ids) > 1:
        raise ValueError(f"{str(root)!r} holds several runs {ids}: pass run_id=")
    return root.name
