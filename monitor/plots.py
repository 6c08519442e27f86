"""The report's figures (matplotlib, given by ``monitor.report``): one function per part,
and :func:`plot_groups` for a run with groups.

An alert is drawn as a dashed red line at its step only on the panel of its own metric
(a ``nonfinite``, ``loss_spike`` or ``routing_ignores_instruction`` alert's ``metric``; an
``expert_collapse`` alert's ``{expert}_weight``; an ``undecided_router`` alert's
``margin``), labelled ``alert: {metric}`` in that panel's legend.
"""

from __future__ import annotations

import math
from pathlib import Path

from monitor.readback import PartLog, RunLog
from monitor.records import GROUP_PREFIX, combine_values

ALERT_STYLE = {"color": "tab:red", "linestyle": "--", "linewidth": 1.0, "alpha": 0.7}


def alert_metric(alert: dict) -> str | None:
    """The metric an alert record is about (None when it names none)."""
    body = alert.get("alert", {})
    if body.get("type") == "expert_collapse" and body.get("expert"):
        return f"{body['expert']}_weight"
    if body.get("type") == "undecided_router":
        return "margin"
    return body.get("metric")


def shows(metric: str, panel: tuple[str, ...]) -> bool:
    """Whether a panel plotting ``panel``'s metrics (a per-component panel plots every
    ``{component}/{m}``) shows ``metric``."""
    return any(metric == m or metric.endswith(f"/{m}") for m in panel)


def _mark_alerts(ax, run: RunLog, part: str, panel: tuple[str, ...]) -> None:
    labelled = set()
    for alert in run.alerts:
        metric = alert_metric(alert)
        if alert.get("part") != part or metric is None or not shows(metric, panel):
            continue
        ax.axvline(alert["step"], label=None if metric in labelled else f"alert: {metric}",
                   **ALERT_STYLE)
        labelled.add(metric)


def _series(log: PartLog, key: str, stat: str = "mean", mode: str | None = None,
            detailed: bool = False):
    steps, values = log.metric(key, stat, mode=mode if log.name == "train" else None,
                               detailed=detailed)
    pairs = [(s, v) for s, v in zip(steps, values) if v is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _band(ax, log: PartLog, key: str, label: str, mode: str | None = None, **style) -> bool:
    steps, mean = _series(log, key, "mean", mode)
    if not steps:
        return False
    line, = ax.plot(steps, mean, marker="o", markersize=3, label=label, **style)
    s_lo, lo = _series(log, key, "min", mode)
    s_hi, hi = _series(log, key, "max", mode)
    if s_lo == steps and s_hi == steps:
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    return True


def _finish(plt, fig, axes, run: RunLog, path: Path, title: str, *, part: str,
            panels: list[tuple[str, ...]], legend: bool = True, rect=(0, 0, 1, 1)) -> Path:
    """``panels[i]``: the metrics ``axes[i]`` plots (where its alerts go)."""
    for ax, panel in zip(axes, panels, strict=True):
        _mark_alerts(ax, run, part, panel)
        ax.grid(True, alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("step")
    fig.suptitle(f"{run.run_id}: {title}")
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_train(plt, run: RunLog, path: Path) -> Path | None:
    log = run["train"]
    if not log.records:
        return None
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    _band(ax_loss, log, "loss", "train loss (mean, min-max)", "train")
    for mode in ("eval", "val", "test"):
        steps, mean = _series(log, "loss", mode=mode)
        if steps:
            ax_loss.plot(steps, mean, "s", label=f"{mode} loss")
    ax_loss.set_ylabel("loss")
    steps, lr = _series(log, "lr", mode="train")
    if steps:
        ax_lr.plot(steps, lr, marker="o", markersize=3, color="tab:green", label="lr")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.set_ylabel("learning rate")
    return _finish(plt, fig, [ax_loss, ax_lr], run, path, "training", part="train",
                   panels=[("loss",), ("lr",)])


def _per_component(plt, fig, ax, log: PartLog, metric: str, cmap: str,
                   labels: bool = True) -> None:
    comps = sorted({k.rsplit("/", 1)[0] for k in log.metric_names()
                    if k.endswith(f"/{metric}") and not k.startswith(("overall/", GROUP_PREFIX))})
    colors = plt.get_cmap(cmap)
    for i, comp in enumerate(comps):
        steps, mean = _series(log, f"{comp}/{metric}")
        if steps:
            ax.plot(steps, mean, color=colors(i / max(len(comps) - 1, 1)), linewidth=1.2,
                    label=comp if len(comps) <= 10 and labels else None)
    steps, mean = _series(log, f"overall/{metric}")
    if steps:
        ax.plot(steps, mean, color="black", linewidth=2.2,
                label="overall (all components)" if labels else None)
    ax.set_ylabel(metric)
    if len(comps) > 10:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(comps) - 1))
        bar = fig.colorbar(sm, ax=ax, pad=0.01)
        ticks = list(range(0, len(comps), max(1, len(comps) // 6)))
        bar.set_ticks(ticks)
        bar.set_ticklabels([comps[t] for t in ticks], fontsize=7)


def plot_lfp(plt, run: RunLog, path: Path) -> Path | None:
    log = run["lfp"]
    if not log.records:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    _per_component(plt, fig, axes[0], log, "p_keep", "viridis")
    axes[0].set_title("keep probability of visual tokens (mean per layer)", fontsize=9)
    _per_component(plt, fig, axes[1], log, "margin", "viridis")
    axes[1].set_title("top-k margin: lowest kept minus highest dropped p_keep", fontsize=9)
    return _finish(plt, fig, list(axes), run, path, "LFP routing", part="lfp",
                   panels=[("p_keep",), ("margin",)])


def plot_film(plt, run: RunLog, path: Path) -> Path | None:
    log = run["film"]
    if not log.records:
        return None
    metrics = ("gamma_norm", "beta_norm", "modulation_strength")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 8), sharex=True)
    for i, (ax, metric) in enumerate(zip(axes, metrics)):
        _per_component(plt, fig, ax, log, metric, "tab10", labels=i == 0)
    axes[0].set_title("FiLM per sampled block (encoder/layer)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend for the three panels, outside them
        fig.legend(handles, labels, loc="center right", fontsize=7)
        fig.subplots_adjust(right=0.8)
    return _finish(plt, fig, list(axes), run, path, "FiLM modulation", part="film",
                   panels=[(m,) for m in metrics], legend=False, rect=(0, 0, 0.8, 1))


def plot_moe(plt, run: RunLog, path: Path) -> Path | None:
    log = run["moe"]
    if not log.records:
        return None
    fig, (ax_w, ax_h) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    weights = [k for k in log.metric_names() if k.endswith("_weight")
               and not k.startswith(GROUP_PREFIX)]
    for key in weights:
        _band(ax_w, log, key, f"{key} (mean, min-max)")
    ax_w.set_ylabel("expert weight")
    ax_w.set_ylim(-0.02, 1.02)
    ax_w.axhline(0.5, color="grey", linewidth=0.8)
    _band(ax_h, log, "entropy", "routing entropy (nats)", color="tab:purple")
    n = max(len(weights), 2)
    ax_h.axhline(math.log(n), color="grey", linestyle=":", label=f"maximum, ln {n}")
    ax_h.ticklabel_format(axis="y", useOffset=False)
    ax_h.set_ylabel("entropy (nats)")
    return _finish(plt, fig, [ax_w, ax_h], run, path, "MoE fusion", part="moe",
                   panels=[tuple(weights), ("entropy",)])


PART_PLOTS = {"train": plot_train, "lfp": plot_lfp, "film": plot_film, "moe": plot_moe}

GROUP_PANELS = (("moe", "siglip_weight", "MoE SigLIP weight", "tab:orange"),
                ("film", "gamma_norm", "FiLM gamma norm", "tab:purple"),
                ("lfp", "p_keep", "LFP visual p_keep", "tab:green"))
"""(part, group metric, title, colour) of the panels of groups.png."""


def _pooled_by_group(log: PartLog, metric: str, names: list[str]) -> list[dict]:
    """Per group, the value object of ``metric`` pooled over every record (exact moments)."""
    return [combine_values([rec["metrics"][f"{GROUP_PREFIX}{g}/{metric}"] for rec in log.records
                     if f"{GROUP_PREFIX}{g}/{metric}" in rec.get("metrics", {})])
            for g in names]


def _eta2_of(values: list[dict]) -> dict:
    """The eta^2 object (``value``, ``chance``) of value objects, one per group: between-
    group over total sum of squares, as the observers compute it (``monitor.groups``)."""
    seen = [v for v in values if v["count"] and v["mean"] is not None]
    n = sum(v["count"] for v in seen)
    chance = (len(seen) - 1) / (n - 1) if len(seen) >= 2 and n > 1 else None
    if len(seen) < 2 or max(v["max"] for v in seen) <= min(v["min"] for v in seen):
        return {"value": None, "chance": chance}
    mean = sum(v["count"] * v["mean"] for v in seen) / n
    between = sum(v["count"] * (v["mean"] - mean) ** 2 for v in seen)
    total = between + sum(v["count"] * (v["std"] or 0.0) ** 2 for v in seen)
    return {"value": between / total if total > 0 else None, "chance": chance}


def _group_names(run: RunLog, parts: list[str]) -> list[str]:
    """The groups in declared order (meta's ``parts``), else in order of appearance."""
    for part in parts:
        declared = ((run.meta or {}).get("parts", {}).get(part) or {}).get("groups")
        if declared:
            return list(declared)
    seen: dict[str, None] = {}
    for part in parts:
        seen.update(dict.fromkeys(run[part].group_names()))
    return list(seen)


def _short(text: str, width: int = 38) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def plot_groups(plt, run: RunLog, path: Path) -> Path | None:
    """groups.png: per group (one row each, in the declared order, shared by the panels),
    the MoE SigLIP weight, the FiLM gamma norm and the LFP visual ``p_keep`` pooled over
    the run (dot: mean, whiskers: std), with eta^2 of the last record and of the whole run
    in each panel's title; below, eta^2 of each over steps. None when no part has groups."""
    panels = [(part, metric, title, colour) for part, metric, title, colour in GROUP_PANELS
              if part in run and any(k.startswith(GROUP_PREFIX) and k.endswith(f"/{metric}")
                                     for k in run[part].metric_names())]
    if not panels:
        return None
    names = _group_names(run, [p for p, _, _, _ in panels])
    rows = max(len(names), 1)
    small = 7 if rows > 24 else 8
    fig = plt.figure(figsize=(3.6 * len(panels) + 2.6, 0.2 * rows + 4.4))
    grid = fig.add_gridspec(2, len(panels), height_ratios=[max(0.2 * rows, 2.0), 1.6])
    bars = [fig.add_subplot(grid[0, i]) for i in range(len(panels))]
    for ax, (part, metric, title, colour) in zip(bars, panels):
        log = run[part]
        pooled = _pooled_by_group(log, metric, names)
        ys = [i for i, v in enumerate(pooled) if v["mean"] is not None]
        # dots, not bars from 0: tasks differ in the third digit of a weight near 0.5
        ax.errorbar([pooled[i]["mean"] for i in ys], ys, xerr=[pooled[i]["std"] for i in ys],
                    fmt="o", color=colour, markersize=4, elinewidth=0.9, capsize=2)
        overall = combine_values(pooled)
        if overall["mean"] is not None:
            ax.axvline(overall["mean"], color="black", linewidth=0.8, linestyle=":",
                       label="all groups")
            ax.legend(fontsize=small, loc="lower right")
        for i, v in enumerate(pooled):
            if v["mean"] is None:
                ax.text(0.02, i, "no samples", transform=ax.get_yaxis_transform(),
                        fontsize=small, color="0.5", va="center")
        last: dict = next((rec["eta2"][metric] for rec in reversed(log.records)
                           if isinstance((rec.get("eta2") or {}).get(metric), dict)), {})
        ax.set_title(f"{title}\n\u03b7\u00b2 last record {_eta_text(last)}\n"
                     f"whole run {_eta_text(_eta2_of(pooled))}", fontsize=9)
        ax.set_ylim(rows - 0.5, -0.5)
        ax.grid(True, alpha=0.3)
        ax.tick_params(axis="x", labelsize=small)
        ax.set_xlabel(f"{metric} (mean \u00b1 std over the run)", fontsize=small)
        ax.set_yticks(range(rows))
        ax.set_yticklabels([_short(n) for n in names] if ax is bars[0] else [],
                           fontsize=small)
    trend = fig.add_subplot(grid[1, :])
    for part, metric, title, colour in panels:
        steps, series = run[part].eta2(metric)
        pairs = [(s, v) for s, v in zip(steps, series) if v is not None]
        if pairs:
            trend.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", markersize=3,
                       color=colour, label=title)
    trend.set_ylim(-0.02, 1.02)
    trend.set_ylabel("\u03b7\u00b2 per record", fontsize=8)
    trend.set_xlabel("step")
    trend.grid(True, alpha=0.3)
    if trend.get_legend_handles_labels()[0]:
        trend.legend(fontsize=7, loc="best")
    fig.suptitle(f"{run.run_id}: per group ({len(names)} groups). \u03b7\u00b2: share of "
                 "the variance the group explains (0: every group alike, 1: the group "
                 "decides everything)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _eta_text(eta2: dict) -> str:
    """``0.42 (chance 0.06)``: an eta^2 object's value beside what chance alone gives."""
    value, chance = eta2.get("value"), eta2.get("chance")
    text = "-" if value is None else f"{value:.2f}"
    return text if chance is None else f"{text} (chance {chance:.2f})"

COMPARED: list[tuple[str, str, list[tuple[str, str | None]]]] = [  # (file, part, [(key, mode)])
    ("compare_train.png", "train", [("loss", "train"), ("lr", "train")]),
    ("compare_lfp.png", "lfp", [("overall/p_keep", None), ("overall/margin", None)]),
    ("compare_film.png", "film", [("overall/gamma_norm", None), ("overall/beta_norm", None),
                                  ("overall/modulation_strength", None)]),
    ("compare_moe.png", "moe", [("dino_weight", None), ("siglip_weight", None),
                                ("entropy", None)]),
]


def compare(plt, runs: list[RunLog], out_dir: Path) -> list[Path]:
    written = []
    for name, part, keys in COMPARED:
        if not any(part in r and r[part].records for r in runs):
            continue
        fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), sharex=True)
        axes = list(axes) if len(keys) > 1 else [axes]
        for ax, (key, mode) in zip(axes, keys):
            for run, style in zip(runs, ("-", "--")):
                if part in run:
                    steps, mean = _series(run[part], key, mode=mode)
                    if steps:
                        ax.plot(steps, mean, style, marker="o", markersize=3,
                                label=f"{run.run_id}")
            ax.set_ylabel(key.replace("overall/", ""), fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[-1].set_xlabel("step")
        fig.suptitle(f"{part}: {' vs '.join(r.run_id for r in runs)}")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written
