"""``PruningObserver``: token routing (which candidate tokens a layer keeps), model-agnostic.

An adapter calls :meth:`PruningObserver.observe` once per routing call with the keep
probabilities of the candidate tokens, which of them were kept, and the keep probabilities
of the tokens that were kept by force. Every statistic is computed on the device from
those tensors; the adapter decides what "candidate" and "kept" mean for its model.

Keys (``{c}`` is a component, e.g. ``layer_08``; ``overall/{m}`` combines every component):

=========================  ==========================================================  =======
key                        samples (one per ...)                                       stream
=========================  ==========================================================  =======
``{c}/tokens_before``      candidate tokens entering, per sample                       events
``{c}/tokens_after``       candidate tokens kept, per sample                           events
``{c}/keep_ratio``         tokens_after / tokens_before, per sample                    events
``{c}/p_keep``             keep probability of each candidate token                    events
``{c}/p_keep_entropy``     binary entropy of each candidate's p_keep, in bits (0..1)   events
``{c}/margin``             lowest kept minus highest dropped p_keep, per sample that
                           both kept and dropped candidates (the top-k cut's margin)   events
``{c}/forced_p_keep``      keep probability of each force-kept token                   events
``{c}/overlap_prev``       Jaccard overlap of the kept candidates with the previous
                           component's, per sample (same forward)                      detailed
``{c}/p_keep`` histogram   counts of candidate p_keep in fixed bins                    detailed
=========================  ==========================================================  =======
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from monitor import stats
from monitor.observer import Observer
from monitor.pruning.summary import empty_value, pick
from monitor.session import MonitorSession

EVENT_METRICS = ("tokens_before", "tokens_after", "keep_ratio", "margin",
                 "p_keep", "p_keep_entropy", "forced_p_keep")
DEFAULT_P_EDGES = tuple(i / 20 for i in range(21))


class PruningObserver(Observer):
    """Statistics of token routing per component (layer).

    Args:
        session: the run (shared with the training monitor).
        components: component names in forward order (consecutive ones are compared by
            ``overlap_prev``); keys never depend on module paths.
        event_interval: steps between compact records.
        detailed_interval: steps between detailed records.
        hist_edges: bin edges of the keep-probability histogram.
    """

    part = "lfp"
    overall_metrics = EVENT_METRICS

    def __init__(self, session: MonitorSession, components: Sequence[str] = (), *,
                 event_interval: int = 10, detailed_interval: int = 500,
                 hist_edges: Sequence[float] = DEFAULT_P_EDGES) -> None:
        super().__init__(session, event_interval=event_interval,
                         detailed_interval=detailed_interval)
        self._edges = [float(e) for e in hist_edges]
        self.components: list[str] = []
        self._names: dict[str, tuple] = {}
        self._position: dict[str, int] = {}
        self._last_kept: dict[str, tuple[int, torch.Tensor]] = {}
        self._pass, self._last_index = 0, -1
        self.add_components(components)

    def add_components(self, components: Sequence[str]) -> None:
        """Declare the slots of ``components`` (call before their hooks fire)."""
        for c in components:
            if c in self._names:
                continue
            events = tuple(f"{c}/{m}" for m in EVENT_METRICS)
            overlap = (f"{c}/overlap_prev",)
            self.declare(events, overlap)
            hist = self.declare_histogram(f"{c}/p_keep", self._edges)
            self._names[c] = (events[:4], events[4:6], events[6:], overlap, hist)
            self._position[c] = len(self.components)
            self.components.append(c)

    def observe(self, component: str, keep_prob: torch.Tensor, kept: torch.Tensor,
                forced_keep_prob: torch.Tensor | None = None,
                forced_valid: torch.Tensor | None = None) -> None:
        """One routing call.

        Args:
            component: a declared component.
            keep_prob: ``(B, N)`` keep probabilities of the N candidate tokens.
            kept: ``(B, N)`` bool, the candidates the layer kept.
            forced_keep_prob: ``(B, M)`` keep probabilities of the force-kept tokens.
            forced_valid: ``(B, M)`` bool, which of those count (e.g. not padding).
        """
        per_sample, per_token, forced, overlap, hist = self._names[component]
        p = keep_prob.detach().to(stats.DTYPE)
        num = p.shape[1]
        if num == 0:
            return
        kept = kept.detach().to(torch.bool, copy=True)  # kept for the next layer's overlap
        n_kept = kept.sum(dim=1, dtype=stats.DTYPE)
        lowest_kept = torch.where(kept, p, math.inf).amin(dim=1)
        highest_dropped = torch.where(kept, -math.inf, p).amax(dim=1)
        margin = lowest_kept - highest_dropped
        sample_rows = torch.stack([torch.full_like(n_kept, num), n_kept, n_kept / num, margin])
        valid = torch.ones_like(sample_rows, dtype=torch.bool)
        valid[3] = (n_kept > 0) & (n_kept < num)
        entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)
        token_rows = torch.stack([p.reshape(-1), entropy.reshape(-1)])
        self.events.slots.update_rows(per_sample, stats.rows_of_samples(sample_rows, valid))
        self.events.slots.update_rows(per_token, stats.rows_of_samples(token_rows))
        if forced_keep_prob is not None and forced_keep_prob.numel():
            self.events.slots.update_rows(
                forced, stats.row_of_samples(forced_keep_prob, forced_valid))
        self.add_to_histogram(hist, p)
        self._overlap(component, kept, overlap)

    def _overlap(self, component: str, kept: torch.Tensor, names: tuple) -> None:
        index = self._position[component]
        if index <= self._last_index:
            self._pass += 1  # a new forward started
        self._last_index = index
        self._last_kept[component] = (self._pass, kept)
        if index == 0:
            return
        prev = self._last_kept.get(self.components[index - 1])
        if prev is None or prev[0] != self._pass or prev[1].shape != kept.shape:
            return
        inter = (kept & prev[1]).sum(dim=1, dtype=stats.DTYPE)
        union = (kept | prev[1]).sum(dim=1, dtype=stats.DTYPE)
        jaccard = inter / union.clamp(min=1)
        self.detailed.slots.update_rows(names, stats.row_of_samples(jaccard, union > 0))

    def get_summary(self) -> dict:
        """The last compact record, shaped as the public CogVLA script reads it.

        ``prune_ratio`` is the public script's name for the fraction of candidate tokens
        KEPT (it logs ``1 - prune_ratio`` as the pruned share); ``keep_ratio`` is the same
        object under its plain name.
        """
        m = self.last_metrics

        def block(prefix: str) -> dict:
            out = {name: pick(m, f"{prefix}/{name}") for name in EVENT_METRICS}
            out["prune_ratio"] = out["keep_ratio"]
            out["count"] = out["keep_ratio"]["count"]
            return out

        return {"step": self.last_step, "overall": block("overall"),
                "by_component": {c: block(c) for c in self.components}}


__all__ = ["PruningObserver", "empty_value"]
