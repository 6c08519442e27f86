"""Turning reduced rows into the JSON objects the log tree holds (host-side, after a flush).

Every reduced value is written as the same object::

    {"mean": 0.71, "std": 0.05, "min": 0.62, "max": 0.80, "count": 202, "nonfinite": 0,
     "min_rank": 3, "max_rank": 0}

``std`` is the population standard deviation of the finite values, ``count`` their number,
``nonfinite`` the number of NaN/Inf values seen (kept out of the other fields). With
``count == 0`` the four moments are ``null``. ``min_rank``/``max_rank`` name the lowest
rank whose finite values include ``min``/``max`` (``null`` with ``min``/``max``), and
``nonfinite_ranks``, present only when ``nonfinite > 0``, lists every rank (sorted) that
saw a NaN/Inf in the interval. In one process, or with rank 0 reducing alone, they are 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch

from monitor import stats

SCHEMA_VERSION = 1
GROUP_PREFIX = "groups/"
"""Per-group values' keys start with this (:mod:`monitor.groups`)."""


def metrics_of(names: Sequence[str], rows: torch.Tensor) -> dict[str, dict]:
    """``{name: value object}`` for the names whose rows saw anything (finite or not).

    ``rows`` are reduced rows on the CPU, one per name. The arithmetic is vectorised; only
    building the dicts is per metric.
    """
    seen = ((rows[:, stats.COUNT] > 0) | (rows[:, stats.NONFINITE] > 0)).tolist()
    return dict(zip((n for n, s in zip(names, seen) if s), _value_objects(rows, seen)))


def _value_objects(rows: torch.Tensor, keep: list[bool]) -> list[dict]:
    """One value object per row whose ``keep`` is True, in order (with the rank fields
    when ``rows`` carry rank columns, see :mod:`monitor.stats`)."""
    count, nonfinite = rows[:, stats.COUNT], rows[:, stats.NONFINITE]
    std = (rows[:, stats.M2] / count.clamp(min=1.0)).clamp(min=0.0).sqrt()
    table = torch.stack([rows[:, stats.MEAN], std, rows[:, stats.MIN], rows[:, stats.MAX]], 1)
    table = torch.where(torch.isfinite(table) & (count > 0).unsqueeze(1), table, math.nan)
    if rows.shape[1] > stats.NUM_COLS:
        return _value_objects_with_ranks(rows, keep, table.tolist())
    counts, nonfinites, values = count.tolist(), nonfinite.tolist(), table.tolist()
    out = []
    for wanted, (mean, sd, lo, hi), n, bad in zip(keep, values, counts, nonfinites):
        if not wanted:
            continue
        if mean != mean or sd != sd or lo != lo or hi != hi:  # NaN -> null (rare)
            mean, sd, lo, hi = (v if v == v else None for v in (mean, sd, lo, hi))
        out.append({"mean": mean, "std": sd, "min": lo, "max": hi, "count": int(n),
                    "nonfinite": int(bad)})
    return out


def _value_objects_with_ranks(rows, keep, values) -> list[dict]:
    """:func:`_value_objects` for rows with rank columns: ``min_rank``/``max_rank`` (null
    with ``min``/``max``) and, where there are NaN/Inf, ``nonfinite_ranks``."""
    flags = rows[:, stats.NUM_COLS:]
    lows = stats.lowest_ranks(flags, stats.HOLDS_MIN).tolist()
    highs = stats.lowest_ranks(flags, stats.HOLDS_MAX).tolist()
    counts = rows[:, stats.COUNT].to(torch.int64).tolist()  # ints without int() per value
    nonfinites = rows[:, stats.NONFINITE].to(torch.int64).tolist()
    out: list[dict] = []
    append = out.append
    for wanted, (mean, sd, lo, hi), n, bad, lo_rank, hi_rank in zip(
            keep, values, counts, nonfinites, lows, highs):
        if not wanted:
            continue
        if mean != mean or sd != sd or lo != lo or hi != hi:  # NaN -> null (rare)
            mean, sd, lo, hi = (v if v == v else None for v in (mean, sd, lo, hi))
            lo_rank = lo_rank if lo is not None else None
            hi_rank = hi_rank if hi is not None else None
        append({"mean": mean, "std": sd, "min": lo, "max": hi, "count": n, "nonfinite": bad,
                "min_rank": lo_rank, "max_rank": hi_rank})
    if any(nonfinites):  # rare: a loop over those rows' bits
        kept = [i for i, wanted in enumerate(keep) if wanted]
        for value, i in zip(out, kept):
            if value["nonfinite"]:
                value["nonfinite_ranks"] = stats.flagged_ranks(flags[i].tolist(),
                                                               stats.SAW_NONFINITE)
    return out


def resume_marker(step: int, world_size: int, segment: int, superseded: int) -> dict:
    """The line a resumed run appends to each stream before its first record.

    Records above it with ``step >= supersedes_from_step`` belong to the dead segment's
    overlap (steps the resumed run does again): readers drop them (:func:`live_records`).
    """
    return {"step": step, "time": time.time(), "world_size": world_size,
            "resume": {"segment": segment, "supersedes_from_step": step,
                       "superseded_lines": superseded}}


def live_records(lines: list[dict]) -> list[dict]:
    """The records of a stream with every resume's overlap dropped (markers dropped too).

    At each resume marker, the records read so far at steps at or after its
    ``supersedes_from_step`` are removed, so no step is counted twice.
    """
    out: list[dict] = []
    for rec in lines:
        resume = rec.get("resume")
        if isinstance(resume, dict):
            start = resume.get("supersedes_from_step")
            if isinstance(start, int):
                out = [r for r in out if not isinstance(r.get("step"), int) or r["step"] < start]
            continue
        out.append(rec)
    return out


def alert_record(step: int, world_size: int, alert: dict) -> dict:
    """One JSONL alert line (in a compact or training stream, beside the records)."""
    return {"step": step, "time": time.time(), "world_size": world_size, "alert": alert}


def nonfinite_alerts(metrics: dict[str, dict], seen: set, scope_key: str,
                     scope: str) -> list[dict]:
    """The alerts of a record's metrics that have non-finite values for the first time in
    ``scope`` (a mode or a stream, named ``scope_key`` in the alert); ``seen`` remembers
    ``(scope, metric)`` so each alerts once. An alert names the ranks that saw them
    (``nonfinite_ranks``) when the value does. Per-group values (``groups/...``) never
    alert: they repeat the samples of a metric that does."""
    alerts = []
    for name, value in metrics.items():
        if name.startswith(GROUP_PREFIX):  # the component's own value alerts (no repeat)
            continue
        if value["nonfinite"] and (scope, name) not in seen:
            seen.add((scope, name))
            alert = {"type": "nonfinite", scope_key: scope, "metric": name,
                     "nonfinite": value["nonfinite"], "count": value["count"]}
            if "nonfinite_ranks" in value:
                alert["nonfinite_ranks"] = value["nonfinite_ranks"]
            alerts.append(alert)
    return alerts


def nonfinite_text(metrics: dict[str, dict], limit: int = 3) -> str | None:
    """``"nonfinite: loss (ranks 1,3), grad (rank 0)"`` for a record's metrics with
    NaN/Inf values (the first ``limit``, then how many more), or None when there are none."""
    bad = [(name, value.get("nonfinite_ranks")) for name, value in metrics.items()
           if value.get("nonfinite")]
    if not bad:
        return None
    parts = []
    for name, ranks in bad[:limit]:
        if ranks:
            parts.append(f"{name} (rank{'s' if len(ranks) > 1 else ''} {ranks_text(ranks)})")
        else:
            parts.append(name)
    more = f", +{len(bad) - limit} more" if len(bad) > limit else ""
    return "nonfinite: " + ", ".join(parts) + more


def ranks_text(ranks) -> str:
    """Sorted ranks with runs shortened: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    ranks = sorted(set(ranks))
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def record(step: int, mode: str | None, world_size: int, metrics: dict) -> dict:
    """One JSONL record: step, mode (when it applies), wall time, world size, metrics."""
    rec: dict = {"step": step}
    if mode is not None:
        rec["mode"] = mode
    rec.update(time=time.time(), world_size=world_size, metrics=metrics)
    return rec


class SummaryTracker:
    """Per mode and metric: first, last, min and max of the flushed means.

    ``first_step``/``last_step`` are the steps of the records ``first``/``last`` came from;
    ``records`` counts every record that held the metric (a record whose values were all
    non-finite has a null mean and does not move first/last/min/max);
    ``nonfinite_ranks`` is every rank (sorted) that ever saw a NaN/Inf in the metric.
    Also counts records and remembers the last step, for ``*_summary.json``.
    """

    def __init__(self) -> None:
        self.modes: dict[str, dict[str, dict]] = {}
        self.records_written = 0
        self.last_step: int | None = None

    def add(self, step: int, mode: str, metrics: dict[str, dict]) -> None:
        self.records_written += 1
        self.last_step = step if self.last_step is None else max(self.last_step, step)
        table = self.modes.setdefault(mode, {})
        for name, value in metrics.items():
            mean = value["mean"]
            entry = table.get(name)
            if entry is None:
                entry = table[name] = {"first": None, "last": None, "min": None, "max": None,
                                       "first_step": None, "last_step": None, "records": 0,
                                       "nonfinite_ranks": []}
            entry["records"] += 1
            if value["nonfinite"] and value.get("nonfinite_ranks"):  # rare
                known = entry.setdefault("nonfinite_ranks", [])
                known[:] = sorted(set(known).union(value["nonfinite_ranks"]))
            if mean is None:
                continue
            if entry["first"] is None:
                entry["first"] = entry["min"] = entry["max"] = mean
                entry["first_step"] = step
            elif mean < entry["min"]:  # (comparisons: this loop runs per metric per flush)
                entry["min"] = mean
            elif mean > entry["max"]:
                entry["max"] = mean
            entry["last"], entry["last_step"] = mean, step

    def to_dict(self, run_id: str, start_time: float, status: str,
                error: str | None = None) -> dict:
        return {
            "run_id": run_id,
            "status": status,
            "records_written": self.records_written,
            "last_step": self.last_step,
            "start_time": start_time,
            "wall_time_s": time.time() - start_time,
            "schema_version": SCHEMA_VERSION,
            "error": error,
            "metrics": self.modes,
        }


def combine_values(values: Iterable[dict]) -> dict:
    """The value object of the union of the samples behind ``values`` (exact: population
    moments combined through their counts)."""
    n, mean, m2 = 0, 0.0, 0.0
    lo, hi, bad = math.inf, -math.inf, 0
    for v in values:
        bad += v.get("nonfinite") or 0
        k = v.get("count") or 0
        if not k or v.get("mean") is None:
            continue
        delta = v["mean"] - mean
        total = n + k
        mean += delta * k / total
        m2 += (v["std"] or 0.0) ** 2 * k + delta * delta * n * k / total
        n = total
        lo, hi = min(lo, v["min"]), max(hi, v["max"])
    if not n:
        return {"mean": None, "std": None, "min": None, "max": None, "count": 0,
                "nonfinite": bad}
    return {"mean": mean, "std": math.sqrt(max(m2 / n, 0.0)), "min": lo, "max": hi,
            "count": n, "nonfinite": bad}
