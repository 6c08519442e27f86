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

With ``group_names``: ``groups/{g}/{m}`` for each of the seven ``overall/{m}`` (one value per
sample per forward: its mean over every layer and candidate) and the record's ``eta2``.
Alerts (:mod:`monitor.alerts`): ``undecided_router`` (every layer's mean margin below
``margin_threshold``) and, with groups, ``routing_ignores_instruction`` on ``p_keep``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from monitor import stats
from monitor.alerts import IgnoresInstruction, UndecidedRouter
from monitor.groups import GroupIds
from monitor.observer import CURRENT_GROUPS, Observer, joined_names
from monitor.pruning.summary import empty_value, pick
from monitor.session import MonitorSession

EVENT_METRICS = ("tokens_before", "tokens_after", "keep_ratio", "margin",
                 "p_keep", "p_keep_entropy", "forced_p_keep")
SAMPLE_METRICS, TOKEN_METRICS, FORCED_METRICS = EVENT_METRICS[:4], EVENT_METRICS[4:6], \
    EVENT_METRICS[6:]
DEFAULT_P_EDGES = tuple(i / 20 for i in range(21))


class _ComponentSlots(NamedTuple):
    """The slot names of one component (layer)."""

    sample: tuple[str, ...]   # tokens_before, tokens_after, keep_ratio, margin (per sample)
    token: tuple[str, ...]    # p_keep, p_keep_entropy (one per candidate token)
    forced: tuple[str, ...]   # forced_p_keep
    overlap: tuple[str, ...]  # overlap_prev (detailed)
    hist: tuple[str, ...]     # the p_keep histogram's bins (detailed)


class _RoutingCall(NamedTuple):
    """One deferred routing call."""

    component: str
    keep_prob: torch.Tensor
    kept: torch.Tensor
    forced: torch.Tensor | None
    valid: torch.Tensor | None
    labels: GroupIds | None


class PruningObserver(Observer):
    """Statistics of token routing per component (layer).

    Args:
        session: the run (shared with the training monitor).
        components: component names in forward order (consecutive ones are compared by
            ``overlap_prev``); keys never depend on module paths.
        event_interval: steps between compact records.
        detailed_interval: steps between detailed records.
        hist_edges: bin edges of the keep-probability histogram.
        group_names: per-task groups (see :class:`~monitor.observer.Observer`): every
            ``overall/{m}`` gets ``groups/{group}/{m}`` and ``eta2/{m}``.
        margin_threshold, margin_patience, margin_warmup: the ``undecided_router`` alert
            (:mod:`monitor.alerts`; threshold None: off).
        eta2_threshold, eta2_patience: the ``routing_ignores_instruction`` alert on the
            eta2 of ``p_keep`` (with groups; threshold None: off).
    """

    part = "lfp"
    overall_metrics = EVENT_METRICS

    def __init__(self, session: MonitorSession, components: Sequence[str] = (), *,
                 event_interval: int = 10, detailed_interval: int = 500,
                 hist_edges: Sequence[float] = DEFAULT_P_EDGES,
                 group_names: Sequence[str] | None = None,
                 margin_threshold: float | None = 1e-3, margin_patience: int = 5,
                 margin_warmup: int = 10, eta2_threshold: float | None = 0.01,
                 eta2_patience: int = 5) -> None:
        undecided = UndecidedRouter(margin_threshold, margin_patience, margin_warmup)
        ignores = IgnoresInstruction(["p_keep"], eta2_threshold, eta2_patience)
        super().__init__(session, event_interval=event_interval,
                         detailed_interval=detailed_interval, group_names=group_names)
        self._undecided, self._ignores = undecided, ignores
        self.declare_groups(EVENT_METRICS)
        self._edges = [float(e) for e in hist_edges]
        self.components: list[str] = []
        self._names: dict[str, _ComponentSlots] = {}
        self._position: dict[str, int] = {}
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
            self._names[c] = _ComponentSlots(sample=events[:4], token=events[4:6],
                                             forced=events[6:], overlap=overlap, hist=hist)
            self._position[c] = len(self.components)
            self.components.append(c)

    def observe(self, component: str, keep_prob: torch.Tensor, kept: torch.Tensor,
                forced_keep_prob: torch.Tensor | None = None,
                forced_valid: torch.Tensor | None = None) -> None:
        """One routing call (deferred: computed with the other calls of its forward pass).

        Args:
            component: a declared component.
            keep_prob: ``(B, N)`` keep probabilities of the N candidate tokens.
            kept: ``(B, N)`` bool, the candidates the layer kept.
            forced_keep_prob: ``(B, M)`` keep probabilities of the force-kept tokens.
            forced_valid: ``(B, M)`` bool, which of those count (e.g. not padding).

        Raises:
            KeyError: ``component`` was not declared.
            ValueError: the shapes do not fit together.
        """
        if component not in self._names:
            raise KeyError(f"component {component!r} was not declared; "
                           f"declared: {self.components}")
        if keep_prob.dim() != 2 or kept.shape != keep_prob.shape:
            raise ValueError(f"keep_prob and kept must both be (B, N), got "
                             f"{tuple(keep_prob.shape)} and {tuple(kept.shape)}")
        if keep_prob.shape[1] == 0:
            return
        forced = valid = None
        if forced_keep_prob is not None and forced_keep_prob.numel():
            forced = forced_keep_prob.detach().to(stats.DTYPE, copy=True)
            if forced_valid is not None:
                if forced_valid.shape != forced.shape:
                    raise ValueError(f"forced_valid {tuple(forced_valid.shape)} must have "
                                     f"the shape of forced_keep_prob {tuple(forced.shape)}")
                valid = forced_valid.detach().to(torch.bool, copy=True)
        call = _RoutingCall(component, keep_prob.detach().to(stats.DTYPE, copy=True),
                            kept.detach().to(torch.bool, copy=True), forced, valid,
                            self.current_groups)
        self.defer(component, self._observe_deferred, call)

    def _observe_deferred(self, calls: list[_RoutingCall]) -> None:
        groups: dict[tuple, list[_RoutingCall]] = {}
        for call in calls:
            key = (call.keep_prob.shape, call.keep_prob.device,
                   None if call.forced is None else call.forced.shape, call.valid is None,
                   id(call.labels))
            groups.setdefault(key, []).append(call)
        for group in groups.values():
            forced = [c.forced for c in group if c.forced is not None]
            valid = [c.valid for c in group if c.valid is not None]
            self.observe_many(  # a group shares None-ness: all or none of each are given
                [c.component for c in group], torch.stack([c.keep_prob for c in group]),
                torch.stack([c.kept for c in group]),
                torch.stack(forced) if forced else None, torch.stack(valid) if valid else None,
                labels=group[0].labels)

    def observe_many(self, components: Sequence[str], keep_prob: torch.Tensor,
                     kept: torch.Tensor, forced_keep_prob: torch.Tensor | None = None,
                     forced_valid: torch.Tensor | None = None, *,
                     labels: object = CURRENT_GROUPS) -> None:
        """The routing calls of several components of one forward pass, stacked (``L``
        components, in forward order): ``(L, B, N)`` / ``(L, B, M)`` tensors as in
        :meth:`observe`. Every statistic of every component in one batch of kernels.
        ``labels``: the samples' groups (default: those of the last ``set_groups``)."""
        num_comp, _, num = keep_prob.shape
        if num == 0:
            return
        p = keep_prob.detach().to(stats.DTYPE)
        kept = kept.detach().to(torch.bool)
        n_kept = kept.sum(dim=2, dtype=stats.DTYPE)  # (L, B)
        lowest_kept = torch.where(kept, p, math.inf).amin(dim=2)
        highest_dropped = torch.where(kept, -math.inf, p).amax(dim=2)
        sample = torch.stack([torch.full_like(n_kept, num), n_kept, n_kept / num,
                              lowest_kept - highest_dropped], dim=1)  # (L, 4, B)
        valid = torch.ones_like(sample, dtype=torch.bool)
        valid[:, 3] = (n_kept > 0) & (n_kept < num)  # margin: both kept and dropped
        entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)
        token = torch.stack([p.reshape(num_comp, -1), entropy.reshape(num_comp, -1)], dim=1)
        rows = [stats.rows_of_samples(sample.reshape(num_comp * 4, -1),
                                      valid.reshape(num_comp * 4, -1)).reshape(num_comp, 4, -1),
                stats.rows_of_samples(token.reshape(num_comp * 2, -1)).reshape(num_comp, 2, -1)]
        names = [self._names[c] for c in components]
        groups = [n.sample + n.token for n in names]
        if forced_keep_prob is not None and forced_keep_prob.numel():
            fvalid = None if forced_valid is None else forced_valid.reshape(num_comp, -1)
            rows.append(stats.rows_of_samples(forced_keep_prob.reshape(num_comp, -1),
                                              fvalid).unsqueeze(1))
            groups = [g + n.forced for g, n in zip(groups, names)]
        self.events.slots.update_rows(
            joined_names(groups), torch.cat(rows, dim=1).reshape(-1, stats.NUM_COLS))
        self.add_to_histograms([n.hist for n in names], p.reshape(num_comp, -1))
        self._overlap(components, kept, names)
        if self.group_names is not None:
            self._group_rows(sample, valid, token, forced_keep_prob, forced_valid, labels)

    def _group_rows(self, sample, valid, token, forced, forced_valid, labels) -> None:
        """Each sample's values over every component, into its group's slots."""
        num_comp, _, batch = sample.shape
        self.add_group_rows(SAMPLE_METRICS, sample.permute(1, 2, 0), valid.permute(1, 2, 0),
                            labels=labels)
        tokens = token.reshape(num_comp, 2, batch, -1).permute(1, 2, 0, 3)
        self.add_group_rows(TOKEN_METRICS, tokens.reshape(2, batch, -1), labels=labels)
        if forced is not None and forced.numel():
            fvalid = None if forced_valid is None else \
                forced_valid.permute(1, 0, 2).reshape(1, batch, -1)
            self.add_group_rows(FORCED_METRICS, forced.permute(1, 0, 2).reshape(1, batch, -1),
                                fvalid, labels=labels)

    def _overlap(self, components: Sequence[str], kept: torch.Tensor,
                 names: list[_ComponentSlots]) -> None:
        """Jaccard overlap of each component's kept set with the previous component's
        (the one declared just before it), when both are in this forward pass."""
        where = {self._position[c]: i for i, c in enumerate(components)}
        pairs = [(i, where[self._position[c] - 1]) for i, c in enumerate(components)
                 if self._position[c] - 1 in where]
        if not pairs:
            return
        cur = kept[[i for i, _ in pairs]]
        prev = kept[[j for _, j in pairs]]
        inter = (cur & prev).sum(dim=2, dtype=stats.DTYPE)
        union = (cur | prev).sum(dim=2, dtype=stats.DTYPE)
        self.detailed.slots.update_rows(
            joined_names([names[i].overlap for i, _ in pairs]),
            stats.rows_of_samples(inter / union.clamp(min=1), union > 0))

    def check_alerts(self, step: int, metrics: dict[str, dict]) -> list[dict]:
        margins = {c: metrics[f"{c}/margin"]["mean"] for c in self.components
                   if metrics.get(f"{c}/margin", {}).get("mean") is not None}
        return self._undecided.check(margins) + self._ignores.check(self.last_eta2)

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
