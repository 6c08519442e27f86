"""Early warnings computed from reduced records (host side, after the flush; no collective).

Each watcher sees the records of one part in order and returns the alert bodies a record
raises; the part writes them as alert records (``{"step", "time", "world_size", "alert":
{...}}``) right after that record, lists them in its summary and logs them (logger
``monitor``, rank 0). Every rank computes the same alerts from the same reduced values.

=============================  ===========================================================
``type``                       fires when (defaults; every setting can be changed, and the
                               first one set to None turns the warning off)
=============================  ===========================================================
``loss_spike`` (train)         a train record's ``max`` of ``metric`` (``"loss"``) exceeds
                               ``mean + k * std`` of every value of the previous ``window``
                               (32) train records holding it, pooled exactly from their
                               moments, ``k = 6``; checked once ``warmup`` (8) records were
                               seen. Every record that spikes alerts.
``undecided_router`` (lfp)     in every LFP layer of a compact record, the mean top-k
                               margin (``{layer}/margin``) is below ``threshold`` (1e-3),
                               for ``patience`` (5) records in a row, counting only records
                               after the first ``warmup`` (10). Alerts once; re-arms when a
                               layer's margin comes back over the threshold.
``routing_ignores_instruction``  with groups set, ``eta2`` of a watched metric (MoE: every
(moe, lfp)                     ``{expert}_weight``; LFP: ``p_keep``) stays below its chance
                               level plus ``threshold`` (``value < chance + 0.01``) for
                               ``patience`` (5) records in a row. Only informative records
                               count (eta2 defined and at least 2 samples per group:
                               ``count >= 2 * groups``); the others neither count nor break
                               the run. Alerts once per metric; re-arms when eta2 comes back
                               over it.
=============================  ===========================================================
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from monitor.checks import as_int, check_positive_int, check_positive_number
from monitor.groups import informative
from monitor.records import combine_values


class LossSpike:
    """``loss_spike`` alerts of one training metric (see the module docstring).

    Args:
        metric: the training metric watched (``None``: off).
        k: standard deviations above the window's mean.
        window: earlier train records pooled.
        warmup: records seen before the first check.
    """

    def __init__(self, metric: str | None = "loss", k: float = 6.0, window: int = 32,
                 warmup: int = 8, *, names: Sequence[str] = ("spike_metric", "spike_k",
                                                             "spike_window", "spike_warmup")
                 ) -> None:
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise TypeError(f"{names[0]} must be a metric name (str) or None, got {metric!r}")
        self.metric = metric
        self.k = check_positive_number(names[1], k)
        self.window = check_positive_int(names[2], window)
        self.warmup = check_positive_int(names[3], warmup)
        self._past: deque[dict] = deque(maxlen=self.window)  # the records' value objects
        self._seen = 0

    def settings(self) -> dict:
        return {"metric": self.metric, "k": self.k, "window": self.window,
                "warmup": self.warmup}

    def check(self, metrics: dict[str, dict]) -> list[dict]:
        """The alerts of one train record (its ``metrics``); then the record joins the
        window."""
        value = metrics.get(self.metric) if self.metric is not None else None
        if value is None or value.get("mean") is None:
            return []
        alerts = []
        pooled = combine_values(self._past)
        if self._seen >= self.warmup and pooled["count"] > 0:
            mean, std = pooled["mean"], pooled["std"]
            threshold = mean + self.k * std
            if value["max"] > threshold:
                alerts.append({"type": "loss_spike", "metric": self.metric,
                               "max": value["max"], "max_rank": value.get("max_rank"),
                               "threshold": threshold, "window_mean": mean,
                               "window_std": std, "k": self.k,
                               "window_records": len(self._past)})
        self.observe(value)
        return alerts

    def observe(self, value: dict) -> None:
        """Add a record's value to the window without checking it (resume)."""
        if value.get("mean") is None or not value.get("count"):
            return
        self._past.append({k: value.get(k) for k in ("count", "mean", "std", "min", "max")})
        self._seen += 1


class UndecidedRouter:
    """``undecided_router`` alerts of an LFP observer (see the module docstring).

    Args:
        threshold: mean margin under which a layer is undecided (``None``: off).
        patience: undecided records in a row before the alert.
        warmup: compact records never counted, at the start.
    """

    def __init__(self, threshold: float | None = 1e-3, patience: int = 5, warmup: int = 10, *,
                 names: Sequence[str] = ("margin_threshold", "margin_patience",
                                         "margin_warmup")) -> None:
        self.threshold = None if threshold is None else check_positive_number(names[0],
                                                                              threshold)
        self.patience = check_positive_int(names[1], patience)
        self.warmup = as_int(names[2], warmup)
        if self.warmup < 0:
            raise ValueError(f"{names[2]} must be >= 0, got {warmup}")
        self._records = 0
        self._below = 0

    def check(self, margins: dict[str, float]) -> list[dict]:
        """The alerts of one compact record, given each layer's mean margin in it."""
        if self.threshold is None or not margins:
            return []
        self._records += 1
        if self._records <= self.warmup:
            return []
        widest = max(margins, key=lambda c: margins[c])
        if margins[widest] >= self.threshold:
            self._below = 0
            return []
        self._below += 1
        if self._below != self.patience:
            return []
        return [{"type": "undecided_router", "threshold": self.threshold,
                 "consecutive_records": self._below, "layers": len(margins),
                 "widest_layer": widest, "widest_margin": margins[widest]}]


class IgnoresInstruction:
    """``routing_ignores_instruction`` alerts from a record's ``eta2`` values.

    Args:
        metrics: the eta2 keys watched.
        threshold: eta2 under which the routing counts as task-blind (``None``: off).
        patience: records in a row before the alert.
    """

    def __init__(self, metrics: Sequence[str], threshold: float | None = 0.01,
                 patience: int = 5, *, names: Sequence[str] = ("eta2_threshold",
                                                               "eta2_patience")) -> None:
        self.metrics = list(metrics)
        self.threshold = None if threshold is None else check_positive_number(names[0],
                                                                              threshold)
        if self.threshold is not None and self.threshold >= 1.0:
            raise ValueError(f"{names[0]} must be < 1 (eta2 is at most 1), got {threshold}")
        self.patience = check_positive_int(names[1], patience)
        self._below = dict.fromkeys(self.metrics, 0)

    def check(self, eta2: dict[str, dict]) -> list[dict]:
        """The alerts of one record, given its ``eta2`` objects (:mod:`monitor.groups`)."""
        if self.threshold is None:
            return []
        alerts = []
        for metric in self.metrics:
            value = eta2.get(metric)
            if value is None or not informative(value):
                continue
            if value["value"] >= value["chance"] + self.threshold:
                self._below[metric] = 0
                continue
            self._below[metric] += 1
            if self._below[metric] == self.patience:
                alerts.append({"type": "routing_ignores_instruction", "metric": metric,
                               "eta2": value["value"], "chance": value["chance"],
                               "groups": value["groups"], "count": value["count"],
                               "threshold": self.threshold,
                               "consecutive_records": self.patience})
        return alerts
