"""What each rank of the forensics worlds logs (importable by spawned processes), and the
numpy reference of which rank holds a value's min, max and non-finite values."""

from __future__ import annotations

import math

import numpy as np
import torch

from monitor import Monitor
from monitor.observer import Observer
from monitor.testing.probes import count_collectives

NAN, INF = math.nan, math.inf


def train_values(rank: int, world: int, step: int) -> dict[str, list[float]]:
    """Chosen ranks hold the min, the max, ties, NaN/Inf at chosen steps (interval 1)."""
    last = world - 1
    v = {
        "tie_all": [5.0],  # every rank: the lowest (0) holds both
        "tie_hi": [7.0] if rank else [1.0],  # max tied on ranks 1..last: 1
        # 0.0 == -0.0: every rank holds the min (lowest: 0); the max 1.0 is rank 0's
        "signed_zero": [-0.0] if rank == last else [0.0, 1.0] if rank == 0 else [0.0],
        "max_last": [float(rank)],
        "min_mid": [-1.0] if rank == 1 else [3.0 + rank],
        "rand": np.random.default_rng(100 * step + rank).normal(size=3 + rank).tolist(),
    }
    if step == 1:  # NaN on rank 1, +Inf on the last rank
        v["loss"] = [1.0, NAN] if rank == 1 else [INF, -2.0] if rank == last else [0.5]
    elif step == 2:  # -Inf alone on rank 0: it saw no finite loss
        v["loss"] = [-INF] if rank == 0 else [0.5 + rank]
    else:
        v["loss"] = [0.5 + rank]
    if step < 2:
        v["sparse"] = [100.0 + rank]
    elif step == 2 and rank == last:  # the others saw nothing: they must not claim it
        v["sparse"] = [-3.0]
    if step < 3:
        v["only_nan"] = [1.0]
    elif rank == 1:  # nobody has a finite value: min/max (and their ranks) null
        v["only_nan"] = [NAN]
    if rank == 1 and step in (0, 3):  # a name only rank 1 logs: step 0 is the union path
        v["u"] = [42.0] if step == 0 else [-1.0]
    return v


def probe_values(rank: int, world: int, step: int) -> dict[str, dict[str, list[float]]]:
    """An observer's compact (``a/x``, ``b/x``, pooled into ``overall/x``) and detailed
    (``a/d``) values."""
    last = world - 1
    ax = [float(world)] if rank in (0, last) else [0.5]  # max tied on 0 and last
    bx = [-5.0] if rank == 1 else [0.0]
    if step == 1 and rank == last:
        bx = [NAN, 0.0]
    d = [float(rank) - step] if step != 2 or rank != 0 else [INF]
    return {"events": {"a/x": ax, "b/x": bx}, "detailed": {"a/d": d}}


class Probe(Observer):
    """A generic observer fed directly."""

    part = "probe"
    overall_metrics = ("x",)

    def __init__(self, session) -> None:
        super().__init__(session, event_interval=1, detailed_interval=2)
        self.declare(events=["a/x", "b/x"], detailed=["a/d"])

    def feed(self, values: dict[str, dict[str, list[float]]]) -> None:
        for kind, metrics in values.items():
            getattr(self, kind).slots.update(
                {k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})


def planted(rank: int, world: int, run_dir: str, steps: int = 4) -> list[int]:
    """The training monitor and a :class:`Probe` in one session, one record per step;
    returns the collectives of each step."""
    counter = count_collectives()
    try:
        mon = Monitor(run_dir=run_dir, run_id="f", log_interval=1, participation="all",
                      console=False)
        probe = Probe(mon.session)
        per_step = []
        for step in range(steps):
            before = counter["n"]
            probe.feed(probe_values(rank, world, step))  # the forward, before its step call
            with mon.step(step) as h:
                h.log(extra={k: torch.tensor(v, dtype=torch.float64)
                             for k, v in train_values(rank, world, step).items()})
            per_step.append(counter["n"] - before)
        probe.finalize()
        mon.finalize()
    finally:
        counter["restore"]()
    return per_step


def collectives(rank: int, world: int, run_dir: str, ks: list[int]) -> dict:
    """K metrics per step, interval 1; NaN on rank 1 in ``m00000`` from step 2 on.
    Returns the collectives of each flush per K."""
    counter = count_collectives()
    out = {}
    try:
        for k in ks:
            mon = Monitor(run_dir=run_dir, run_id=f"k{k}", log_interval=1,
                          participation="all", console=False)
            names = [f"m{i:05d}" for i in range(k)]
            per_step = []
            for step in range(4):
                values = torch.arange(k, dtype=torch.float64) + rank + step
                if step >= 2 and rank == 1:
                    values[0] = NAN
                before = counter["n"]
                with mon.step(step) as h:
                    h.log(extra=dict(zip(names, values.unbind())))
                per_step.append(counter["n"] - before)
            before = counter["n"]
            mon.finalize()
            per_step.append(counter["n"] - before)
            out[k] = per_step
    finally:
        counter["restore"]()
    return out


def rank0_local(rank: int, world: int, run_dir: str) -> None:
    """participation='local': rank 0 writes its own values."""
    mon = Monitor(run_dir=run_dir, run_id="loc", log_interval=1, participation="local",
                  console=False)
    with mon.step(0) as h:
        h.log(loss=torch.tensor([1.0 + 10 * rank, NAN if rank == 0 else INF]))
    mon.finalize()


def two_ranks(rank: int, world: int, run_dir: str, ks: list[int]) -> dict:
    """:func:`planted`, :func:`collectives` and :func:`rank0_local` in one world."""
    out = {"planted": planted(rank, world, run_dir),
           "collectives": collectives(rank, world, run_dir, ks)}
    rank0_local(rank, world, run_dir)
    return out


def pooled(per_rank: list[dict[str, list[float]]]) -> dict[str, list[list[float]]]:
    """``{metric: [values of rank 0, of rank 1, ...]}`` (empty lists where a rank had none)."""
    names = {n for values in per_rank for n in values}
    return {n: [list(values.get(n, [])) for values in per_rank] for n in names}


def expected_ranks(per_rank: list[list[float]]) -> dict:
    """The rank fields a value over these per-rank samples must carry (numpy reference)."""
    finite = [np.asarray([x for x in v if math.isfinite(x)], dtype=np.float64)
              for v in per_rank]
    have = [r for r, f in enumerate(finite) if f.size]
    out: dict = {"min_rank": None, "max_rank": None}
    if have:
        lo = min(finite[r].min() for r in have)
        hi = max(finite[r].max() for r in have)
        out["min_rank"] = next(r for r in have if finite[r].min() == lo)
        out["max_rank"] = next(r for r in have if finite[r].max() == hi)
    bad = [r for r, v in enumerate(per_rank) if any(not math.isfinite(x) for x in v)]
    if bad:
        out["nonfinite_ranks"] = bad
    return out
