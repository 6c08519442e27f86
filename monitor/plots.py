"""The report's figures (matplotlib, given by ``monitor.report``): one function per part.

An alert is drawn as a dashed red line at its step only on the panel of its own metric
(a ``nonfinite`` alert's ``metric``; an ``expert_collapse`` alert's ``{expert}_weight``),
labelled ``alert: {metric}`` in that panel's legend.
"""

from __future__ import annotations

import math
from pathlib import Path

from monitor.readback import PartLog, RunLog

ALERT_STYLE = {"color": "tab:red", "linestyle": "--", "linewidth": 1.0, "alpha": 0.7}


def alert_metric(alert: dict) -> str | None:
    """The metric an alert record is about (None when it names none)."""
    body = alert.get("alert", {})
    if body.get("type") == "expert_collapse" and body.get("expert"):
        return f"{body['expert']}_weight"
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
                    if k.endswith(f"/{metric}") and not k.startswith("overall/")})
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
    weights = [k for k in log.metric_names() if k.endswith("_weight")]
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
