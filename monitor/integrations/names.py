"""Flat names for TensorBoard tags and W&B keys, built in this one place.

=====================================  ==================================================
JSONL                                  flat name
=====================================  ==================================================
train record (mode ``m``), metric k    ``monitor/{m}/{k}`` = mean; ``monitor/{m}/{k}/std``,
                                       ``/min``, ``/max``; ``/nonfinite`` when > 0
observer ``p`` record, metric k        ``monitor/{p}/{k}`` (same suffixes), compact and
                                       detailed alike (e.g. ``monitor/lfp/overall/p_keep``,
                                       ``monitor/lfp/layer_09/overlap_prev``)
observer histogram h                   ``monitor/{p}/{h}/hist``
observer alert                         ``monitor/{p}/alert`` (text), ``monitor/{p}/alerts``
                                       (running count, W&B)
=====================================  ==================================================

``m`` is ``train``, ``eval``, ``val`` or ``test``; ``p`` is ``lfp``, ``film``, ``moe`` or
``aggr``. The public CogVLA script's hand-written W&B export uses the same
``monitor/<part>/`` prefixes.

The rank fields (``min_rank``, ``max_rank``, ``nonfinite_ranks``) are not exported as
scalars: a rank number plotted over steps is an identifier, not a quantity (its "mean" or
smoothing means nothing), and one series per metric would double the tags. They stay in
the JSONL (``read_run``, ``python -m monitor report``), and TensorBoard's alert text
entries carry the alert's ``nonfinite_ranks``.
"""

from __future__ import annotations

from collections.abc import Iterator

SUFFIXES = ("std", "min", "max")


def prefix(part: str, kind: str) -> str:
    """``monitor/{mode}`` for training records, ``monitor/{part}`` for observer records."""
    return f"monitor/{kind}" if part == "train" else f"monitor/{part}"


def scalars(part: str, kind: str, record: dict) -> Iterator[tuple[str, float]]:
    """``(flat name, value)`` for every value of a record's ``metrics`` (nulls skipped)."""
    base = prefix(part, kind)
    for key, value in record.get("metrics", {}).items():
        name = f"{base}/{key}"
        if value.get("mean") is not None:
            yield name, value["mean"]
        for suffix in SUFFIXES:
            if value.get(suffix) is not None:
                yield f"{name}/{suffix}", value[suffix]
        if value.get("nonfinite"):
            yield f"{name}/nonfinite", value["nonfinite"]


def histograms(part: str, kind: str, record: dict) -> Iterator[tuple[str, dict]]:
    """``(flat name, histogram object)`` for a detailed record's histograms with edges."""
    base = prefix(part, kind)
    for key, hist in record.get("histograms", {}).items():
        if hist.get("edges"):
            yield f"{base}/{key}/hist", hist
