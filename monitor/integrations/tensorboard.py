"""TensorBoard: rank 0 writes the records as event files under ``{run_dir}/tensorboard/``.

Scalars and histograms carry the names of :mod:`monitor.integrations.names`, at the
record's step and wall time (compact export by default, every value with
``export_all=True``; per-layer series, ``mean_hist``, are histograms of the per-layer
means); alerts become text entries (``monitor/{prefix}/~record/alert``). The writer is
created at the first record. In a resumed run (``meta["resumed"]``) it is created with
``purge_step`` = this segment's first step, so TensorBoard hides what the dead segment
wrote at that step and later (the steps this segment trains again).

View: ``tensorboard --logdir runs/{run_id}/tensorboard``.
"""

from __future__ import annotations

import json

import numpy as np

from monitor.integrations import check_extras, names
from monitor.layout import TENSORBOARD
from monitor.session import MonitorSession


class TensorBoardListener:
    """A session listener that writes TensorBoard event files (rank 0)."""

    def __init__(self, session: MonitorSession, *, export_all: bool = False) -> None:
        check_extras(tensorboard=True)
        self.session = session
        self.export_all = export_all
        self.log_dir = session.files.path(TENSORBOARD)
        self._writer = None
        self._closed = False

    def _get_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = self.session.first_step if self.session.meta.get("resumed") else None
            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        return self._writer

    def publish(self, part: str, stream: str, record: dict) -> None:
        if self._closed:
            return
        writer = self._get_writer()
        step, walltime = record["step"], record.get("time")
        base = names.prefix(part, stream)
        if stream == "alert":
            writer.add_text(names.name(base, names.RECORD, "alert"), json.dumps(record["alert"]),
                            step, walltime=walltime)
        # one event holding every scalar of the record (5x faster than one add_scalar each
        # for an LFP record's 700 values; TensorBoard reads them as the same scalars)
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=name, simple_value=value)
                  for name, value in names.scalars(part, stream, record, self.export_all)]
        if values:
            writer.file_writer.add_summary(Summary(value=values), step, walltime)
        for name, hist in names.histograms(part, stream, record, self.export_all):
            writer.add_histogram_raw(name, walltime=walltime, global_step=step,
                                     **histogram_fields(hist))
        for name, means in names.layer_profiles(part, stream, record, self.export_all):
            writer.add_histogram(name, np.asarray(means, dtype=np.float64), step,
                                 walltime=walltime, bins=min(len(means), 32))
        writer.flush()

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def histogram_fields(hist: dict) -> dict:
    """``add_histogram_raw`` arguments from a record's histogram (fixed edges and counts).

    TensorBoard buckets are given by their right edge: the values below the first edge
    go into a bucket ending at ``edges[0]``, those at or above the last edge into one
    ending just above it. Sums are taken at bucket centres (the exact values are gone).
    """
    edges, counts = hist["edges"], list(hist["counts"])
    width = edges[-1] - edges[0]
    limits = [edges[0]] + list(edges[1:]) + [edges[-1] + width / max(len(counts), 1)]
    counts = [hist["below"]] + counts + [hist["above"]]
    centres = [edges[0]] + [(a + b) / 2 for a, b in zip(edges, edges[1:])] + [edges[-1]]
    num = sum(counts)
    used = [i for i, c in enumerate(counts) if c]
    lo = limits[used[0] - 1] if used and used[0] > 0 else edges[0]
    hi = limits[used[-1]] if used else edges[-1]
    return {"min": lo, "max": hi, "num": num,
            "sum": sum(c * x for c, x in zip(counts, centres)),
            "sum_squares": sum(c * x * x for c, x in zip(counts, centres)),
            "bucket_limits": limits, "bucket_counts": counts}
