"""Functions each rank of a test world runs (importable by spawned processes)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from monitor import Monitor, RankMismatchError, layout
from monitor.testing.probes import COLLECTIVES, count_collectives  # noqa: F401


def as_kind(value, kind: str):
    """The same numbers as a Python float, numpy value, CPU tensor or bf16 tensor."""
    if kind == "float":
        return float(value)
    if kind == "numpy":
        return np.asarray(value, dtype=np.float64)
    if kind == "tensor":
        return torch.as_tensor(np.asarray(value), dtype=torch.float64)
    if kind == "float32":
        return torch.as_tensor(np.asarray(value), dtype=torch.float32)
    raise ValueError(kind)


def log_plan(rank, world_size, run_dir, run_id, plan, interval, kinds=None, **monitor_kwargs):
    """Log ``plan[rank]``: a list of (step, mode, {name: value}); return collective deltas."""
    counter = count_collectives()
    try:
        mon = Monitor(run_dir=run_dir, run_id=run_id, log_interval=interval, **monitor_kwargs)
        deltas = []
        for step, mode, values in plan[rank]:
            before = counter["n"]
            with mon.step(step, mode=mode) as h:
                kinded = {k: as_kind(v, (kinds or {}).get(k, "numpy")) for k, v in values.items()}
                h.log(extra=kinded)
            deltas.append(counter["n"] - before)
        before = counter["n"]
        mon.finalize()
        deltas.append(counter["n"] - before)
    finally:
        counter["restore"]()
    return {"deltas": deltas, "calls": counter["calls"]}


def many_metrics(rank, world_size, run_dir, num_metrics, steps, interval):
    """Log ``num_metrics`` scalars per step; return the collectives issued at each flush."""
    counter = count_collectives()
    mon = Monitor(run_dir=run_dir, run_id="many", log_interval=interval, participation="all")
    per_step = []
    names = [f"m{i:05d}" for i in range(num_metrics)]
    for step in range(steps):
        before = counter["n"]
        with mon.step(step) as h:
            h.log(extra={n: torch.tensor(float(rank + i + step)) for i, n in enumerate(names)})
        per_step.append(counter["n"] - before)
    mon.finalize()
    return per_step


def growing_metrics(rank, world_size, run_dir, counts):
    """Log ``counts[step]`` metrics ``m0..`` at each step (interval 1); return the
    collectives of each flush."""
    counter = count_collectives()
    mon = Monitor(run_dir=run_dir, run_id="grow", log_interval=1, participation="all")
    per_step = []
    for step, k in enumerate(counts):
        before = counter["n"]
        with mon.step(step) as h:
            h.log(extra={f"m{i}": torch.tensor(float(rank * 100 + i + step)) for i in range(k)})
        per_step.append(counter["n"] - before)
    before = counter["n"]
    mon.finalize()
    per_step.append(counter["n"] - before)
    return per_step


def out_of_step(rank, world_size, run_dir, interval):
    """Rank r logs step 10 * (r + 1): every rank must raise RankMismatchError.

    With ``interval=10`` both steps are due and the error comes at the next context's
    entry (the first call with a later step writes the due record); with a large interval
    it comes from the pending record that ``finalize()`` writes.
    """
    mon = Monitor(run_dir=run_dir, run_id="oos", log_interval=interval, participation="all")
    try:
        for step in (10 * (rank + 1), 10 * (rank + 1) + 1):
            with mon.step(step) as h:
                h.log(loss=1.0)
    except RankMismatchError as err:
        return "context: " + str(err)
    try:
        mon.finalize()
    except RankMismatchError as err:
        return "finalize: " + str(err)
    return None


def rank0_only(rank, world_size, run_dir, wait):
    """The public CogVLA script's pattern: the monitor exists on rank 0 alone."""
    if rank != 0:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = Monitor(run_dir=run_dir, run_id="r0", log_interval=2,
                      participation_timeout=wait)
        for step in range(5):
            with mon.step(step) as h:
                h.log(loss=torch.tensor([1.0, 2.0, 3.0]) * step)
        mon.finalize()
    return [str(w.message) for w in caught]


def no_process_group(rank, world_size, run_dir_pattern):
    """torchrun environment (RANK/WORLD_SIZE set) but no process group initialised."""
    run_dir = run_dir_pattern.format(rank=rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = Monitor(run_dir=run_dir, run_id="nopg", log_interval=1)
        with mon.step(0) as h:
            h.log(loss=float(rank))
        mon.finalize()
    return {"warnings": [str(w.message) for w in caught], "exists": Path(run_dir).exists()}


def read_jsonl(path) -> list[dict]:
    """Every record of a JSONL file, through the package's one reader (the tests read
    files with the same policy as resume and ``read_run``)."""
    return layout.read_records(path)


def read_records(path) -> list[dict]:
    """The metric records of a JSONL stream (no alert or resume lines)."""
    return [r for r in read_jsonl(path) if "metrics" in r]


def log_plan_per_rank_dir(rank, world_size, pattern, plan):
    """Every rank points at its own folder: only rank 0's may exist afterwards."""
    run_dir = pattern.format(rank=rank)
    log_plan(rank, world_size, run_dir, "w", plan, interval=1)
    dist.barrier()
    return Path(run_dir).exists()


def late_rank1(rank, world_size, run_dir):
    """Rank 1 builds its monitor only after rank 0 has decided (and flushed) without it."""
    import time

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if rank == 1:
            store = dist.distributed_c10d._get_default_store()
            store.wait(["rank0-done"])
        mon = Monitor(run_dir=run_dir, run_id="late", log_interval=1, participation_timeout=0.5)
        with mon.step(0) as h:
            h.log(loss=float(rank))
        mon.finalize()
        if rank == 0:
            dist.distributed_c10d._get_default_store().set("rank0-done", "1")
        time.sleep(0.1)
    return [str(w.message) for w in caught]


def rank0_eval_beside_global_train(rank, world_size, run_dir):
    """The documented pattern: a global train monitor plus a rank-0-only eval monitor."""
    train = Monitor(run_dir=run_dir, run_id="tr", log_interval=2)
    evals = Monitor(run_dir=run_dir, run_id="tr-eval", participation="local") if rank == 0 \
        else None
    for step in range(1, 5):
        with train.step(step) as h:
            h.log(loss=float(rank))
        if evals is not None and step % 2 == 0:
            with evals.step(step, mode="eval") as h:
                h.log(acc=0.5)
    train.finalize()
    if evals is not None:
        evals.finalize()
