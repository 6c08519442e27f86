"""``AggregationObserver``: token compression by learned aggregation tokens, model-agnostic.

An adapter reports, per encoder call, how many tokens entered and how many left (host
integers taken from tensor shapes: no device work), and may pass the aggregation tokens
that left, ``(B, K, width)``, for the detailed similarity statistic.

Keys (``{enc}`` an encoder, e.g. ``dino``; ``overall/{m}`` combines every encoder):

=========================  ==========================================================  ========
key                        samples (one per sample per encoder call)                   stream
=========================  ==========================================================  ========
``{enc}/tokens_in``        tokens entering the encoder (patches)                       events
``{enc}/tokens_out``       tokens leaving it (aggregation tokens)                      events
``{enc}/compression_ratio``  tokens_in / tokens_out (4.0 for 256 patches -> 64 tokens)  events
``{enc}/token_cosine``     mean pairwise cosine similarity of the K tokens that left
                           (1: all alike, 0: orthogonal; as low as -1/(K-1))           detailed
=========================  ==========================================================  ========

With ``group_names``: ``groups/{g}/{m}`` for each ``overall/{m}`` (``token_cosine``'s in the
detailed stream; one value per sample per encoder call) and the record's ``eta2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from monitor import stats
from monitor.observer import Observer, joined_names
from monitor.pruning.summary import by_group
from monitor.session import MonitorSession

EVENT_METRICS = ("tokens_in", "tokens_out", "compression_ratio")


class _EncoderSlots(NamedTuple):
    """The slot names of one encoder."""

    events: tuple[str, ...]  # tokens_in, tokens_out, compression_ratio
    cosine: tuple[str, ...]  # token_cosine (detailed)


class AggregationObserver(Observer):
    """Compression statistics per encoder.

    Args:
        session: the run (shared with the training monitor).
        encoders: encoder names, e.g. ``["dino", "siglip"]``.
        event_interval: steps between compact records.
        detailed_interval: steps between detailed records.
        group_names: per-task groups (see :class:`~monitor.observer.Observer`): each
            ``overall/{m}`` gets ``groups/{group}/{m}`` and ``eta2/{m}`` (those of
            ``token_cosine`` in the detailed stream, with it).
    """

    part = "aggr"
    overall_metrics = EVENT_METRICS + ("token_cosine",)

    def __init__(self, session: MonitorSession, encoders: Sequence[str] = (), *,
                 event_interval: int = 10, detailed_interval: int = 500,
                 group_names: Sequence[str] | None = None) -> None:
        super().__init__(session, event_interval=event_interval,
                         detailed_interval=detailed_interval, group_names=group_names)
        self.declare_groups(EVENT_METRICS)
        self.declare_groups(("token_cosine",), kind="detailed")
        self.encoders: list[str] = []
        self._names: dict[str, _EncoderSlots] = {}
        self.add_encoders(encoders)

    def add_encoders(self, encoders: Sequence[str]) -> None:
        """Declare the slots of ``encoders`` (call before their hooks fire)."""
        for enc in encoders:
            if enc in self._names:
                continue
            events = tuple(f"{enc}/{m}" for m in EVENT_METRICS)
            cosine = (f"{enc}/token_cosine",)
            self.declare(events, cosine)
            self._names[enc] = _EncoderSlots(events, cosine)
            self.encoders.append(enc)

    def observe(self, encoder: str, tokens_in: int, tokens_out: int, batch_size: int,
                tokens: torch.Tensor | None = None) -> None:
        """One encoder call over ``batch_size`` samples.

        Args:
            tokens_in: tokens entering per sample (a host int).
            tokens_out: tokens leaving per sample (a host int).
            tokens: the ``(B, K, width)`` aggregation tokens that left, for
                ``token_cosine`` (optional).
        """
        slots = self._names[encoder]
        ratio = tokens_in / tokens_out if tokens_out else float("nan")
        values = [float(tokens_in), float(tokens_out), ratio]
        rows = stats.constant_rows(values, batch_size)
        self.events.slots.update_rows(slots.events, rows)
        labels = self.current_groups
        if labels is not None and self.group_names is not None:
            if batch_size != labels.batch:
                self.add_group_rows(EVENT_METRICS, torch.zeros(3, batch_size, 1),
                                    labels=labels)  # says so, once, and counts it
            else:  # host numbers, the same for every encoder call of the step: once
                self.events.slots.update_rows(
                    joined_names([self._group_slots["events"][m] for m in EVENT_METRICS]),
                    labels.memo(("aggr", tuple(values)),
                                lambda: self._constant_group_rows(values, labels)))
        if tokens is not None and tokens.dim() == 3 and tokens.shape[1] > 1:
            x = torch.nn.functional.normalize(tokens.detach().to(stats.DTYPE), dim=-1)
            k = x.shape[1]
            gram = torch.bmm(x, x.transpose(1, 2))
            off = (gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1))
            cosine = off / (k * (k - 1))
            self.detailed.slots.update_rows(slots.cosine, stats.row_of_samples(cosine))
            if labels is not None:
                self.add_group_rows(("token_cosine",), cosine.reshape(1, -1, 1),
                                    labels=labels, kind="detailed")

    def _constant_group_rows(self, values: list[float], labels) -> torch.Tensor:
        """The group rows of host numbers seen once per labelled sample, where the ids are
        (fill kernels: no copy to the device)."""
        assert self.group_names is not None
        device = labels.ids.device
        samples = torch.stack([torch.full((labels.batch, 1), v, dtype=stats.DTYPE,
                                          device=device) for v in values])
        return stats.grouped_rows(samples, labels.ids, len(self.group_names)).reshape(
            -1, stats.NUM_COLS)

    def get_summary(self) -> dict:
        """Last compact record: overall ``compression_ratio``, ``tokens_in``,
        ``tokens_out`` and the same per encoder."""
        return by_group(self.last_metrics, self.last_step, EVENT_METRICS, self.encoders,
                        EVENT_METRICS, "by_encoder")
