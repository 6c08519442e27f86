"""Flat names for TensorBoard tags and W&B keys, built in this one place.

Every name the monitor exports has the form ``monitor/{prefix}/{name}/{field}``:

==========  ===========================================================================
part        meaning
==========  ===========================================================================
prefix      the training record's mode (``train``, ``eval``, ``val``, ``test``) or the
            observer's part (``lfp``, ``film``, ``moe``, ``aggr``)
name        a JSONL metric or histogram key (``loss``, ``overall/p_keep``,
            ``layer_08/p_keep``), with ``%`` and ``~`` escaped as ``%25`` and ``%7E``;
            or a combination, which always holds a ``~``: ``~record`` (the whole record)
            and ``{before}~layers/{after}`` (every layer of a per-layer key ``{before}
            layer_NN/{after}``, e.g. ``~layers/p_keep``, ``dino/~layers/gamma_norm``)
field       ``mean``, ``std``, ``min``, ``max``: scalars; ``nonfinite``: the number of
            non-finite values (scalar, only when > 0); ``value``: a record's ``eta2``
            of a metric, under the name ``eta2/{metric}``; ``hist``: a histogram;
            ``mean_hist``: a histogram, over layers, of the per-layer means; ``alerts``:
            the running number of alerts (W&B), ``alert``: an alert's text (TensorBoard)
==========  ===========================================================================

and ``monitor/{prefix}/step`` is the record's step (W&B's step metric for that prefix's
keys). A field never holds a ``/``, so a name splits back into ``(prefix, name, field)``
from its ends: two different values can never share a name, whatever metric names a user
picks (``loss/min``'s mean is ``monitor/train/loss/min/mean``, ``loss``'s min is
``monitor/train/loss/min``), and escaped keys never look like a combination. An observer
part that is also a mode name (or holds a ``/`` or ``~``) is refused. (``~``, not ``*``:
W&B's ``define_metric`` takes ``*`` only as a trailing glob.)

The public CogVLA script writes its own ``monitor/...`` keys into the same W&B run
(``monitor/train/loss``, ``monitor/lfp/prune_ratio_mean``, ``monitor/lfp/layer_08/
tokens_after``, ...): none of them ends in one of the fields above or in ``step``, so none
is ever written by the monitor.

Two exports (``export_all``):

* compact (default): keys without a ``layer_NN`` segment as scalars; each per-layer key
  ``{before}layer_NN/{after}`` only as its combination over layers (exact moments, scalars
  ``{before}~layers/{after}/{field}``, left out where the record's own ``overall/{after}``
  is that same combination) and as one ``mean_hist`` of its layers' means; per-layer
  histograms summed into one ``{before}~layers/{after}/hist``; the non-finite counts of a
  record summed into ``~record/nonfinite``; per-group values (``groups/{group}/...``) left
  out, each metric's ``eta2`` in (``eta2/{metric}/value``: one key per metric, whatever
  the number of groups; not for the metrics of :data:`ETA2_DERIVED`). With every CogVLA
  part on this is under 200 scalar keys, with or without groups (see ``monitor/README.md``),
  where the full export has about 1,000 (and, with groups, 4 fields of each of the 17
  group metrics per group more).
* all: every value of every record as scalars (``nonfinite`` per metric), every
  ``eta2`` and every histogram, names as above.

The rank fields (``min_rank``, ``max_rank``, ``nonfinite_ranks``) are not exported as
scalars: a rank number plotted over steps is an identifier, not a quantity (its "mean" or
smoothing means nothing), and one series per metric would double the tags. They stay in
the JSONL (``read_run``, ``python -m monitor report``), and TensorBoard's alert text
entries carry the alert's ``nonfinite_ranks``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from monitor.records import combine_values

MODES = ("train", "eval", "val", "test")
SCALAR_FIELDS = ("mean", "std", "min", "max")
FIELDS = (*SCALAR_FIELDS, "nonfinite", "value", "hist", "mean_hist", "alerts", "alert")
ETA2 = "eta2"
GROUPS = "groups/"
ETA2_DERIVED = frozenset({"p_keep_entropy", "modulation_strength", "entropy"})
"""Metrics whose eta2 the compact export leaves out: each is a function of others that it
exports (LFP ``p_keep``; FiLM ``gamma_norm``/``beta_norm``; the MoE weights). The records,
the summary and ``export_all`` keep them."""
STEP = "step"
MARK = "~"
RECORD = "~record"
LAYERS = "~layers"
_LAYER = re.compile(r"^(?P<before>(?:[^/]*/)*?)layer_\d+(?P<after>/.*)$")


def escape(key: str) -> str:
    """A record key as a name part: ``%`` and ``~`` escaped (combinations hold a ``~``)."""
    return key.replace("%", "%25").replace(MARK, "%7E")


def prefix(part: str, kind: str) -> str:
    """``monitor/{mode}`` for training records, ``monitor/{part}`` for observer records.

    Raises:
        ValueError: an observer part that would share a prefix with a training mode, or
            that holds a ``/`` or ``~``.
    """
    if part == "train":
        return f"monitor/{kind}"
    if part in MODES or not part or "/" in part or MARK in part:
        raise ValueError(f"an observer's part must be a single name that is not a training "
                         f"mode {MODES}, got {part!r}: its W&B/TensorBoard names would clash")
    return f"monitor/{part}"


def step_key(part: str, kind: str) -> str:
    """``monitor/{prefix}/step``: the record's step, the x axis of that prefix's charts."""
    return f"{prefix(part, kind)}/{STEP}"


def name(base: str, key: str, field: str) -> str:
    return f"{base}/{key}/{field}"


def _fields(value: dict) -> Iterator[tuple[str, float]]:
    for field in SCALAR_FIELDS:
        if value.get(field) is not None:
            yield field, value[field]


def scalars(part: str, kind: str, record: dict, export_all: bool = False
            ) -> Iterator[tuple[str, float]]:
    """``(flat name, value)`` of a record's metrics (nulls skipped; see the module doc)."""
    base = prefix(part, kind)
    metrics = record.get("metrics", {})
    for key, v in (record.get(ETA2) or {}).items():
        if isinstance(v, dict) and v.get("value") is not None and \
                (export_all or key not in ETA2_DERIVED):
            yield name(base, f"{ETA2}/{escape(key)}", "value"), v["value"]
    if export_all:
        for key, value in metrics.items():
            key = escape(key)
            for field, v in _fields(value):
                yield name(base, key, field), v
            if value.get("nonfinite"):
                yield name(base, key, "nonfinite"), value["nonfinite"]
        return
    nonfinite = 0
    groups: dict[str, list[dict]] = {}
    for key, value in metrics.items():
        if key.startswith(GROUPS):  # per group: export_all only
            continue
        if not key.startswith("overall/"):
            nonfinite += value.get("nonfinite") or 0
        group = layer_group(escape(key))
        if group is None:
            for field, v in _fields(value):
                yield name(base, escape(key), field), v
        else:
            groups.setdefault(group, []).append(value)
    for group, values in groups.items():
        before, after = group.split(f"{LAYERS}/", 1)
        if not before and f"overall/{after}" in metrics:
            continue  # the record's own overall value is this combination
        for field, v in _fields(combine_values(values)):
            yield name(base, group, field), v
    if nonfinite:
        yield name(base, RECORD, "nonfinite"), nonfinite


def histograms(part: str, kind: str, record: dict, export_all: bool = False
               ) -> Iterator[tuple[str, dict]]:
    """``(flat name, histogram)`` of a record's histograms that have edges: each one
    (export_all), or those of a per-layer key summed over its layers."""
    base = prefix(part, kind)
    groups: dict[str, list[dict]] = {}
    for key, hist in record.get("histograms", {}).items():
        if not hist.get("edges"):
            continue
        group = None if export_all else layer_group(escape(key))
        if group is None:
            yield name(base, escape(key), "hist"), hist
        else:
            groups.setdefault(group, []).append(hist)
    for group, hists in groups.items():
        total = sum_histograms(hists)
        if total is not None:
            yield name(base, group, "hist"), total


def layer_profiles(part: str, kind: str, record: dict, export_all: bool = False
                   ) -> Iterator[tuple[str, list[float]]]:
    """``(flat name, per-layer means)``: one series per per-layer key (compact export)."""
    if export_all:
        return
    base = prefix(part, kind)
    groups: dict[str, list[float]] = {}
    for key, value in record.get("metrics", {}).items():
        if key.startswith(GROUPS):
            continue
        group = layer_group(escape(key))
        if group is not None and value.get("mean") is not None:
            groups.setdefault(group, []).append(value["mean"])
    for group, means in groups.items():
        yield name(base, group, "mean_hist"), means


def layer_group(key: str) -> str | None:
    """``{before}~layers{after}`` for a key ``{before}layer_NN{after}`` (its first
    ``layer_NN`` segment, ``after`` starting with ``/``), else None."""
    m = _LAYER.match(key)
    if m is None:
        return None
    return f"{m.group('before')}{LAYERS}{m.group('after')}"


def sum_histograms(hists: list[dict]) -> dict | None:
    """The bin-wise sum of histograms over the same edges (None if the edges differ)."""
    edges = hists[0]["edges"]
    if any(h["edges"] != edges for h in hists[1:]):
        return None
    return {"edges": edges,
            "counts": [sum(c) for c in zip(*(h["counts"] for h in hists))],
            "below": sum(h["below"] for h in hists), "above": sum(h["above"] for h in hists),
            "nonfinite": sum(h["nonfinite"] for h in hists)}
