"""``python -m monitor report RUN_DIR`` and ``compare RUN_A RUN_B``: tables and PNG plots.

``report`` prints, for each part, a table of every metric's mean over the records (last,
min, max, records) with the steps covered and the ranks that ever saw a NaN/Inf in it
(``nonfinite on``: ``-`` for none, runs shortened as in ``0-2,5``), the part's status and
the run's participation, and writes PNGs into ``{run_dir}/report/``:

============  ==================================================================
file          what it shows
============  ==================================================================
train.png     loss (mean, min-max band, eval points) and lr over steps
lfp.png       keep probability ``p_keep`` and top-k ``margin`` of each LFP layer
film.png      ``gamma_norm``, ``beta_norm``, ``modulation_strength`` per sampled block
moe.png       DINOv2/SigLIP weights (min-max band) and the routing entropy
groups.png    a run with groups: per group, the MoE SigLIP weight, the FiLM
              ``gamma_norm`` and the LFP ``p_keep`` over the run (mean +- std), eta^2 in
              each panel's title, and eta^2 of each over steps
============  ==================================================================

Per-group values are left out of the tables (``--all`` shows them); each ``eta2/{metric}``
gets a row (last, min, max of its per-record values).

Alert steps are marked with red dashed lines in every plot. ``compare`` overlays two runs
(loss, lr, LFP ``overall/p_keep`` and ``overall/margin``, FiLM ``overall/*``, MoE weights
and entropy) into ``--out`` (default ``{RUN_A}/report/compare-{name of RUN_B}/``).
Plots need matplotlib (``pip install "monitor[report]"``); without it the tables still
print and a message says so.
"""

from __future__ import annotations

import math
from pathlib import Path

from monitor.readback import RunLog
from monitor.records import GROUP_PREFIX, ranks_text

TABLE_KEYS = {  # what the table shows without --all (components are many: 24 LFP layers)
    "lfp": lambda k: k.startswith("overall/"),
    "film": lambda k: k.startswith("overall/"),
    "aggr": lambda k: k.startswith("overall/"),
}
NO_MATPLOTLIB = ('plots need matplotlib, which is not installed: pip install "monitor[report]" '
                 "(the tables above are complete)")


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4g}"


def part_table(run: RunLog, part: str, *, all_metrics: bool = False) -> str:
    """The text table of one part (see the module docstring)."""
    log = run[part]
    meta = run.meta or {}
    participation = meta.get("participation", {})
    steps = [r["step"] for r in log.records]
    status = (log.summary or {}).get("status", "unknown (no summary)")
    head = (f"== {part}: {len(log.records)} records"
            + (f", steps {min(steps)}..{max(steps)}" if steps else "")
            + (f", {len(log.detailed)} detailed" if part != "train" else "")
            + f", status {status}, participation {participation.get('decision', '?')}"
            + f" ({participation.get('statistics', '?')} statistics)"
            + (f", {len(log.alerts)} alerts" if log.alerts else ""))
    lines = [head]
    modes = sorted({r.get("mode", "train") for r in log.records}) if part == "train" else [None]
    keep = TABLE_KEYS.get(part) if not all_metrics else None
    hidden = hidden_groups = 0
    rows = []
    for mode in modes:
        for detailed in (False, True) if part != "train" else (False,):
            for key in log.metric_names(detailed):
                if key.startswith(GROUP_PREFIX) and not all_metrics:
                    hidden_groups += 1
                    continue
                if keep is not None and not keep(key) and not key.startswith(GROUP_PREFIX):
                    hidden += 1
                    continue
                s, series = log.metric(key, mode=mode, detailed=detailed)
                values = [v for v in series if v is not None]
                if not s:
                    continue
                name = f"{mode}/{key}" if mode else key + (" (detailed)" if detailed else "")
                bad_ranks: set[int] = set()  # every rank that ever saw a NaN/Inf in it
                for ranks in log.metric(key, "nonfinite_ranks", mode=mode, detailed=detailed)[1]:
                    if isinstance(ranks, list):
                        bad_ranks.update(ranks)
                rows.append((name, _fmt(values[-1] if values else None),
                             _fmt(min(values) if values else None),
                             _fmt(max(values) if values else None), f"{s[0]}..{s[-1]}",
                             str(len(s)), ranks_text(bad_ranks) if bad_ranks else "-"))
            for key in log.eta2_names(detailed) if mode is None else ():
                s, series = log.eta2(key, detailed=detailed)
                values = [v for v in series if v is not None]
                rows.append((f"eta2/{key}" + (" (detailed)" if detailed else ""),
                             _fmt(values[-1] if values else None),
                             _fmt(min(values) if values else None),
                             _fmt(max(values) if values else None), f"{s[0]}..{s[-1]}",
                             str(len(s)), "-"))
    if rows:
        header = ("metric", "last", "min", "max", "steps", "records", "nonfinite on")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for r in [header] + rows:
            lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                          for i, (c, w) in enumerate(zip(r, widths))))
    if hidden:
        lines.append(f"  ({hidden} per-component metrics not shown: --all shows them)")
    if hidden_groups:
        lines.append(f"  ({hidden_groups} per-group metrics of {len(log.group_names())} "
                     "groups not shown: --all shows them, groups.png draws them)")
    for alert in log.alerts:
        lines.append(f"  alert at step {alert['step']}: {alert['alert']}")
    return "\n".join(lines)


def run_tables(run: RunLog, *, all_metrics: bool = False) -> str:
    meta = run.meta or {}
    head = (f"run {run.run_id} ({run.run_dir}): world_size {meta.get('world_size', '?')}, "
            f"status {meta.get('status', 'running or killed')}, "
            f"resumed {meta.get('resumed', '?')}")
    return "\n\n".join([head] + [part_table(run, p, all_metrics=all_metrics)
                                 for p in run.parts])


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def report(run: RunLog, out_dir: Path | None = None) -> list[Path]:
    """Write the report PNGs of ``run``; returns their paths (empty without matplotlib)."""
    from monitor import plots

    plt = pyplot()
    if plt is None:
        return []
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for part, draw in plots.PART_PLOTS.items():
        if part in run:
            path = draw(plt, run, out_dir / f"{part}.png")
            if path is not None:
                written.append(path)
    path = plots.plot_groups(plt, run, out_dir / "groups.png")
    if path is not None:
        written.append(path)
    return written


def compare(run_a: RunLog, run_b: RunLog, out_dir: Path | None = None) -> list[Path]:
    """Write PNGs overlaying two runs; returns their paths (empty without matplotlib)."""
    from monitor import plots

    plt = pyplot()
    if plt is None:
        return []
    if out_dir is None:
        out_dir = run_a.run_dir / "report" / f"compare-{run_b.run_dir.name}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return plots.compare(plt, [run_a, run_b], out_dir)
