"""Flush cost of ``monitor`` against a per-key all-reduce loop, in one gloo world.

    .venv/bin/python scripts/bench_flush.py [--ranks 2] [--metrics 10 100 1000]

Every rank logs K scalar tensors per step with ``log_interval=1`` (a flush at every step)
and times the step context's exit (the flush: pack, 3 collectives, unpack, record and
summary on rank 0). Then, in the same processes and on the same values, it times what
Lightning's ``sync_dist`` does: one ``all_reduce`` per key. Rank 0 prints medians and the
ratio. Wall-clock numbers depend on the machine; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _counting(counter: dict):
    original = dist.all_reduce

    def all_reduce(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    return all_reduce


def _rank(rank: int, world: int, store_path: str, run_dir: str, ks: list[int], steps: int,
          out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    from monitor import Monitor

    counter = {"n": 0}
    dist.all_reduce = _counting(counter)
    rows = []
    for k in ks:
        values = {f"m{i:05d}": torch.tensor(float(rank + i)) for i in range(k)}
        mon = Monitor(run_dir=run_dir, run_id=f"k{k}", log_interval=1, participation="all")
        flush_s, before = [], counter["n"]
        for step in range(steps):
            with mon.step(step) as h:
                h.log(extra=values)
                t0 = time.perf_counter()
            flush_s.append(time.perf_counter() - t0)
        per_flush = (counter["n"] - before) / steps
        mon.finalize()
        loop_s = []
        for _ in range(steps):
            t0 = time.perf_counter()
            for v in values.values():
                dist.all_reduce(v.clone())
            loop_s.append(time.perf_counter() - t0)
        rows.append((k, statistics.median(flush_s), per_flush, statistics.median(loop_s)))
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--metrics", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--steps", type=int, default=15)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, args.ranks, os.path.join(tmp, "store"),
                                                 os.path.join(tmp, "run"), args.metrics,
                                                 args.steps, out))
                 for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        rows = out.get(timeout=600)
        for proc in procs:
            proc.join(60)
    print(f"{args.ranks} gloo ranks, median of {args.steps} flushes")
    print(f"{'K':>6} {'monitor ms':>11} {'collectives':>12} {'per-key ms':>11} {'ratio':>7}")
    for k, flush, per_flush, loop in rows:
        print(f"{k:>6} {flush * 1e3:>11.2f} {per_flush:>12.0f} {loop * 1e3:>11.2f} "
              f"{loop / flush:>6.1f}x")


if __name__ == "__main__":
    main()
