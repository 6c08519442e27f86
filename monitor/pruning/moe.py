"""``MoERouterObserver``: dense mixture weights over named experts, model-agnostic.

An adapter feeds the router's logits ``(B, E)`` (or the weights themselves); the observer
takes their softmax in float64.

Keys (``{e}`` an expert name, e.g. ``dino`` and ``siglip`` in CogVLA):

======================  ============================================================  ========
key                     samples (one per sample routed)                               stream
======================  ============================================================  ========
``{e}_weight``          the expert's mixing weight                                    events
``{e}_dominant``        1 when the expert has the largest weight, else 0 (the mean
                        is the share of samples it dominates)                          events
``entropy``             routing entropy ``-sum_e w_e ln w_e`` in nats (0 .. ln E)      events
``{e}_weight``          histogram of the weight over fixed bins                       detailed
======================  ============================================================  ========

Collapse alert: when an expert's mean weight in a compact record is above
``collapse_threshold`` for ``collapse_patience`` records in a row, an alert record
``{"step", "time", "world_size", "alert": {"type": "expert_collapse", "expert",
"mean_weight", "threshold", "consecutive_records"}}`` is appended to the compact stream,
listed in the summary and logged (logger ``monitor``) once; it re-arms when the weight
falls back under the threshold.

With ``group_names``: ``groups/{g}/{e}_weight`` and ``groups/{g}/entropy`` (one value per
sample routed), the record's ``eta2``, and the ``routing_ignores_instruction`` alert on the
weights' eta2 (:mod:`monitor.alerts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monitor import stats
from monitor.alerts import IgnoresInstruction
from monitor.checks import check_fraction, check_positive_int
from monitor.observer import Observer
from monitor.pruning.summary import pick
from monitor.session import MonitorSession

DEFAULT_EDGES = tuple(i / 20 for i in range(21))


class MoERouterObserver(Observer):
    """Statistics of a dense router's mixing weights.

    Args:
        session: the run (shared with the training monitor).
        experts: names of the experts in the router's output order.
        collapse_threshold: mean weight above which an expert counts as taking over.
        collapse_patience: consecutive compact records above it before the alert.
        event_interval: steps between compact records.
        detailed_interval: steps between detailed records.
        group_names: per-task groups (see :class:`~monitor.observer.Observer`): each
            ``{e}_weight`` and ``entropy`` gets ``groups/{group}/{m}`` and ``eta2/{m}``.
        eta2_threshold, eta2_patience: the ``routing_ignores_instruction`` alert on the
            eta2 of the expert weights (:mod:`monitor.alerts`; threshold None: off).
    """

    part = "moe"

    def __init__(self, session: MonitorSession, experts: Sequence[str] = ("dino", "siglip"), *,
                 collapse_threshold: float = 0.95, collapse_patience: int = 3,
                 event_interval: int = 10, detailed_interval: int = 500,
                 hist_edges: Sequence[float] = DEFAULT_EDGES,
                 group_names: Sequence[str] | None = None,
                 eta2_threshold: float | None = 0.01, eta2_patience: int = 5) -> None:
        collapse_threshold, collapse_patience = self.check_collapse_settings(
            collapse_threshold, collapse_patience)
        _check_experts(experts)  # before the streams are registered in the session
        IgnoresInstruction([], eta2_threshold, eta2_patience)  # checked before, too
        super().__init__(session, event_interval=event_interval,
                         detailed_interval=detailed_interval, group_names=group_names)
        self.collapse_threshold = collapse_threshold
        self.collapse_patience = collapse_patience
        self._eta2_settings = (eta2_threshold, eta2_patience)
        self._edges = [float(e) for e in hist_edges]
        self.set_experts(experts)

    @staticmethod
    def check_collapse_settings(threshold: object, patience: object, *,
                                names: tuple[str, str] = ("collapse_threshold",
                                                          "collapse_patience"),
                                ) -> tuple[float, int]:
        """The collapse alert's settings checked (``names``: how the caller calls them)."""
        return check_fraction(names[0], threshold), check_positive_int(names[1], patience)

    def set_experts(self, experts: Sequence[str]) -> None:
        """Name the experts (router output order); an adapter calls it before any hook."""
        experts = _check_experts(experts)
        self.experts = experts
        self._names = tuple([f"{e}_weight" for e in experts]
                            + [f"{e}_dominant" for e in experts] + ["entropy"])
        self.declare(self._names)
        self._hist = [self.declare_histogram(f"{e}_weight", self._edges)
                      for e in experts]
        self._above = dict.fromkeys(experts, 0)
        self._expert_index = torch.arange(len(experts))
        for old in getattr(self, "_group_metrics", ()):  # renamed experts: theirs go
            self._group_slots["events"].pop(old, None)
        self._group_metrics = tuple([f"{e}_weight" for e in experts] + ["entropy"])
        self.declare_groups(self._group_metrics)
        self._ignores = IgnoresInstruction(self._group_metrics[:-1], *self._eta2_settings)

    def observe_logits(self, logits: torch.Tensor) -> None:
        """Router logits ``(..., E)``: the weights are their softmax over the last dim."""
        self.observe_weights(torch.softmax(logits.detach().to(stats.DTYPE), dim=-1))

    def observe_weights(self, weights: torch.Tensor) -> None:
        """Mixing weights ``(..., E)`` (each row sums to 1)."""
        w = weights.detach().to(stats.DTYPE).reshape(-1, weights.shape[-1])
        if w.shape[1] != len(self.experts):
            raise ValueError(f"expected {len(self.experts)} experts, got weights of shape "
                             f"{tuple(weights.shape)}")
        # not F.one_hot: it checks its input's range on the host (a device sync on CUDA)
        experts = self.on_device(self._expert_index, w.device)
        dominant = (w.argmax(dim=1, keepdim=True) == experts).to(stats.DTYPE)
        # argmax of a NaN row is 0: such a sample dominates nothing (counted non-finite)
        dominant = torch.where(torch.isfinite(w).all(dim=1, keepdim=True), dominant, torch.nan)
        entropy = -torch.special.xlogy(w, w).sum(dim=1, keepdim=True)
        table = torch.cat([w, dominant, entropy], dim=1).T
        self.events.slots.update_rows(self._names, stats.rows_of_samples(table))
        self.add_to_histograms(self._hist, w.T)
        if self.group_names is not None:
            grouped = torch.cat([w, entropy], dim=1).T.unsqueeze(2)  # (E + 1, N, 1)
            self.add_group_rows(self._group_metrics, grouped)

    def check_alerts(self, step: int, metrics: dict[str, dict]) -> list[dict]:
        alerts = []
        for e in self.experts:
            mean = metrics.get(f"{e}_weight", {}).get("mean")
            if mean is None:
                continue
            if mean <= self.collapse_threshold:
                self._above[e] = 0
                continue
            self._above[e] += 1
            if self._above[e] == self.collapse_patience:
                alerts.append({"type": "expert_collapse", "expert": e, "mean_weight": mean,
                               "threshold": self.collapse_threshold,
                               "consecutive_records": self._above[e]})
        return alerts + self._ignores.check(self.last_eta2)

    def get_summary(self) -> dict:
        """Last compact record: ``{e}_weight``, ``{e}_dominant``, ``entropy``, alerts."""
        out: dict = {"step": self.last_step}
        out.update({name: pick(self.last_metrics, name) for name in self._names})
        out["alerts"] = [a["alert"] for a in self.alerts]
        return out


def _check_experts(experts: Sequence[str]) -> list[str]:
    names = [str(e) for e in experts]
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"experts must be >= 2 distinct names, got {names}")
    return names
