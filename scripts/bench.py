"""What the monitor costs: flush, training overhead, host syncs, memory (one table, one JSON).

    .venv/bin/python scripts/bench.py                 # every section, a few minutes on 2 cores
    .venv/bin/python scripts/bench.py --quick         # a smoke run: the smallest stand-in
                                                      # and counts (about 20-30 s on 2 cores)
    .venv/bin/python scripts/bench.py --sections flush overhead
    .venv/bin/python scripts/bench.py --sections forensics   # rank fields vs the flush of before

Sections (each writes its part of ``bench-results.json``; ``--out`` to change the path):

flush     K = 10 .. 10,000 scalar metrics on 2 and 3 gloo ranks (same process group, same
          values): time per flush and collectives per flush for ``monitor`` (one log
          interval per step), for a per-key ``all_reduce`` loop (what Lightning's
          ``sync_dist`` does per logged key) and for torchmetrics ``MeanMetric`` objects
          synced per key (skipped when torchmetrics is not installed, and in --quick).
          Medians; ratios.
overhead  The CogVLA stand-in at the real hook shapes that it can reach on a CPU (batch 16,
          2 images, K = 64 aggregation tokens per image: 128 visual tokens into the 24 LFP
          routers, 256 patches per image), trained with the facade fully on (every part,
          default intervals) and without it, steps alternated in one process (two copies
          of the same model): median and mean step-time ratio, and the time spent in the
          monitor's hooks and batched statistics per step. Then the same hook code fed the
          real model's widths (router input 4096, FiLM widths 1024/1152), where the stand-in
          cannot run them: hook milliseconds per step at real widths.
forensics The rank fields (``min_rank``, ``max_rank``, ``nonfinite_ranks``) against the flush
          of before, in the same gloo world and on the same values (default K = 1,000 on
          2 ranks): two monitors, one with ``Reducer.forensics`` off (the flush of before:
          no rank columns, no rank fields), flushed alternately; median ms per flush (the
          whole flush in wall and in CPU time, and its reduction), collectives per flush,
          and bytes per JSONL record line of each (a clean record, and one where one
          metric saw a NaN on rank 1).
groups    Per-task groups (issue 15) with 40 groups and every part on: the stand-in of
          ``overhead`` (same shapes) trained with the facade with ``group_names`` and a
          ``set_groups`` call per step, and without groups, steps alternated in one process
          (two copies of the model, default intervals): median step-time ratio (wall and
          process CPU), and the time in the monitor's hooks and batched statistics of each:
          the step without groups plus that difference, over the step (what grouping adds,
          measured where it happens: a loaded machine moves whole steps by more). Then the
          flush alone (hook work drained first; compact records every step, forwards only):
          median ms per flush of each, alternated, and the rows and record bytes it writes.
syncs     Calls that hand a tensor to the host (``.item()``, ``.cpu()``, ``.tolist()``,
          ``.numpy()``, ``__float__``, ``__bool__``, ``__int__``, ``__index__``) made by monitor
          code during training steps between flushes (must be 0), and at a flush; with 40
          groups and a ``set_groups`` call per step.
log       What one ``log()`` call costs (two host floats, or two 0-d tensors), with the
          session's thread lock and with the lock swapped for a no-op, alternated in one
          process (the fastest round of each: the least disturbed by other load): the
          lock's price per call (issue 12: thread-safe logging), and an uncontended
          ``RLock`` acquire + release alone.
memory    The monitor driven for 10,000 steps (hooks fed real-shaped tensors, flushes at
          the default intervals, records written): process RSS and Python allocations
          (tracemalloc) after 1,000 and after 10,000 steps.

Wall-clock numbers depend on the machine (and on what else runs on it): compare the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent


# -- flush cost ------------------------------------------------------------------------------

def _flush_rank(rank: int, world: int, store_path: str, run_dir: str, ks: list[int],
                reps: dict, quick: bool, out) -> None:
    torch.set_num_threads(1)
    logging.getLogger("monitor").setLevel(logging.WARNING)  # no console line per flush
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    from monitor import Monitor
    from monitor.testing.probes import count_collectives

    torchmetrics = None
    if not quick:  # a smoke run: its 3-4 s import buys no count
        try:
            import torchmetrics
        except ImportError:
            pass
    counter = count_collectives()
    reducing = _time_reductions()
    rows = []
    for k in ks:
        n, n_slow = reps[str(k)]
        values = {f"m{i:05d}": torch.tensor(float(rank + i)) for i in range(k)}
        row = {"K": k, "ranks": world, "flushes": n, "baseline_flushes": n_slow}
        mon = Monitor(run_dir=run_dir, run_id=f"k{k}-w{world}", log_interval=1,
                      participation="all")
        times, reduce_times, before = [], [], counter["n"]
        warmup = 3  # the first flush decides participation and fixes the capacity
        for step in range(warmup + n):
            with mon.step(step) as h:
                h.log(extra=values)
            reducing["s"] = 0.0
            t0 = time.perf_counter()
            mon.log_step(step + 1)  # the first call of the next step writes step's record
            if step >= warmup:
                times.append(time.perf_counter() - t0)
                reduce_times.append(reducing["s"])
            elif step == 0:
                row["monitor_collectives_first_flush"] = counter["n"] - before
            if step == warmup - 1:
                before = counter["n"]
        row["monitor_ms"] = statistics.median(times) * 1e3
        row["monitor_reduce_ms"] = statistics.median(reduce_times) * 1e3
        row["monitor_collectives"] = (counter["n"] - before) / n
        mon.finalize()
        dist.barrier()
        times, before = [], counter["n"]
        for _ in range(n_slow):
            t0 = time.perf_counter()
            for v in values.values():  # sync_dist: one all_reduce per key, then the mean
                reduced = v.clone()
                dist.all_reduce(reduced)
                reduced /= world
            times.append(time.perf_counter() - t0)
        row["per_key_ms"] = statistics.median(times) * 1e3
        row["per_key_collectives"] = (counter["n"] - before) / n_slow
        if quick:
            row["torchmetrics"] = "skipped in --quick"
        elif torchmetrics is None:
            row["torchmetrics"] = "not installed"
        elif k >= 10_000 and world > 2:  # ~70 s a flush on 2 cores
            row["torchmetrics"] = "skipped"
        else:
            metrics = {name: torchmetrics.MeanMetric() for name in values}
            times, before = [], counter["n"]
            n_tm = max(1, n_slow // 3)
            for _ in range(n_tm):
                for name, v in values.items():
                    metrics[name].update(v)
                t0 = time.perf_counter()
                for m in metrics.values():  # compute() syncs each metric's states
                    m.compute()
                    m.reset()
                times.append(time.perf_counter() - t0)
            row["torchmetrics_ms"] = statistics.median(times) * 1e3
            row["torchmetrics_collectives"] = (counter["n"] - before) / n_tm
        dist.barrier()
        rows.append(row)
    counter["restore"]()
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _time_reductions() -> dict:
    """Seconds spent in ``Reducer.reduce`` (pack check, collectives, unpack) since the
    caller last set ``["s"] = 0``: the part of a flush that the per-key loop also does
    (the rest of a flush builds and writes the record)."""
    from monitor.distributed import Reducer

    spent = {"s": 0.0}
    original = Reducer.reduce

    def reduce(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent["s"] += time.perf_counter() - t0

    Reducer.reduce = reduce
    return spent


def _world_rows(target, world: int, *args) -> list[dict]:
    """Run ``target(rank, world, store, run_dir, *args, out)`` on ``world`` spawned ranks
    and return the rows rank 0 puts on ``out`` (the ranks are killed if they hang). The
    ranks fork from a server that imported torch once (not a fresh interpreter each)."""
    ctx = mp.get_context("forkserver")
    # torchmetrics too (3-4 s to import; not in --quick): once in the server, not in every
    # rank of every world; a name that does not import is skipped
    ctx.set_forkserver_preload(["torch", "torch.distributed", "monitor",
                                *([] if QUICK else ["torchmetrics"])])
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target,
                             args=(r, world, os.path.join(tmp, "store"),
                                   os.path.join(tmp, "run"), *args, out))
                 for r in range(world)]
        for proc in procs:
            proc.start()
        try:
            return out.get(timeout=1800)
        finally:
            for proc in procs:
                proc.join(60)
                if proc.is_alive():
                    proc.kill()


def bench_flush(ranks: list[int], ks: list[int], quick: bool) -> list[dict]:
    # (monitor flushes, per-key loop flushes); torchmetrics gets a third of the latter
    reps = {str(k): (3, 3) if quick else (15, 2) if k >= 10_000 else (15, 9) for k in ks}
    results = []
    for world in ranks:
        rows = _world_rows(_flush_rank, world, ks, reps, quick)
        for row in rows:
            row["per_key_over_monitor"] = row["per_key_ms"] / row["monitor_ms"]
            row["per_key_over_monitor_reduce"] = row["per_key_ms"] / row["monitor_reduce_ms"]
            if "torchmetrics_ms" in row:
                row["torchmetrics_over_monitor"] = row["torchmetrics_ms"] / row["monitor_ms"]
        results.extend(rows)
        print_flush(rows)
    return results


def print_flush(rows: list[dict]) -> None:
    print(f"\nflush: {rows[0]['ranks']} gloo ranks, median ms per flush (collectives per flush; "
          f"monitor: {rows[0]['monitor_collectives_first_flush']} at the first)")
    print("  monitor = the whole flush (reduce, build and write the record); reduce = its "
          "collectives part")
    print(f"{'K':>6} {'monitor':>16} {'reduce':>7} {'per-key loop':>18} {'ratio':>7} "
          f"{'(reduce)':>8} {'torchmetrics':>18} {'ratio':>7}")
    for r in rows:
        tm = (f"{r['torchmetrics_ms']:>10.2f} ({r['torchmetrics_collectives']:>5.0f}) "
              f"{r['torchmetrics_over_monitor']:>6.1f}x" if "torchmetrics_ms" in r
              else f"{'(' + r.get('torchmetrics', 'not installed') + ')':>18} {'':>7}")
        print(f"{r['K']:>6} {r['monitor_ms']:>9.2f} ({r['monitor_collectives']:>4.0f}) "
              f"{r['monitor_reduce_ms']:>7.2f} "
              f"{r['per_key_ms']:>10.2f} ({r['per_key_collectives']:>5.0f}) "
              f"{r['per_key_over_monitor']:>6.1f}x {r['per_key_over_monitor_reduce']:>7.1f}x "
              f"{tm}")


# -- rank fields against the flush of before ------------------------------------------------

def _forensics_rank(rank: int, world: int, store_path: str, run_dir: str, ks: list[int],
                    flushes: int, out) -> None:
    torch.set_num_threads(1)
    logging.getLogger("monitor").setLevel(logging.ERROR)  # no console or alert lines
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    from monitor import Monitor
    from monitor.testing.probes import count_collectives

    counter = count_collectives()
    reducing = _time_reductions()
    rows = []
    for k in ks:
        values = {f"m{i:05d}": torch.tensor(float(rank + i)) for i in range(k)}
        bad = dict(values, m00000=torch.tensor(math.nan if rank == 1 else 0.0))
        mons = {}
        for name, on in (("before", False), ("forensics", True)):
            mons[name] = Monitor(run_dir=run_dir, run_id=f"{name}-k{k}-w{world}",
                                 log_interval=1, participation="all", console=False)
            mons[name].session.reducer().forensics = on
        times = {n: [] for n in mons}
        cpu_times = {n: [] for n in mons}
        reduce_times = {n: [] for n in mons}
        calls = {n: 0 for n in mons}
        warmup = 3  # the first flush decides participation and fixes the capacity
        for step in range(warmup + flushes + 1):
            order = list(mons) if step % 2 else list(mons)[::-1]  # alternate who goes first
            for name in order:
                before = counter["n"]
                with mons[name].step(step) as h:
                    # the last flush has a NaN on rank 1 (its record carries nonfinite_ranks)
                    h.log(extra=bad if step == warmup + flushes else values)
                reducing["s"] = 0.0
                t0, c0 = time.perf_counter(), time.process_time()
                mons[name].log_step(step + 1)  # the next step's first call writes the record
                if warmup <= step < warmup + flushes:
                    times[name].append(time.perf_counter() - t0)
                    cpu_times[name].append(time.process_time() - c0)
                    reduce_times[name].append(reducing["s"])
                    calls[name] += counter["n"] - before
        for mon in mons.values():
            mon.finalize()
        dist.barrier()
        row = {"K": k, "ranks": world, "flushes": flushes}
        for name, mon in mons.items():
            row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
            row[f"{name}_cpu_ms"] = statistics.median(cpu_times[name]) * 1e3
            row[f"{name}_reduce_ms"] = statistics.median(reduce_times[name]) * 1e3
            row[f"{name}_collectives"] = calls[name] / flushes
            if rank == 0:
                lines = [line for line in Path(mon.jsonl_path).read_bytes().split(b"\n")
                         if b'"metrics"' in line]
                row[f"{name}_bytes_per_line"] = statistics.median(len(x) + 1 for x in lines[:-1])
                row[f"{name}_bytes_nan_line"] = len(lines[-1]) + 1
        rows.append(row)
    counter["restore"]()
    if rank == 0:
        out.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def bench_forensics(ranks: list[int], ks: list[int], quick: bool) -> list[dict]:
    flushes = 3 if quick else 61
    results = []
    for world in ranks:
        rows = _world_rows(_forensics_rank, world, ks, flushes)
        for row in rows:
            row["flush_ratio"] = row["forensics_ms"] / row["before_ms"]
            row["cpu_ratio"] = row["forensics_cpu_ms"] / row["before_cpu_ms"]
            row["reduce_ratio"] = row["forensics_reduce_ms"] / row["before_reduce_ms"]
            row["bytes_ratio"] = row["forensics_bytes_per_line"] / row["before_bytes_per_line"]
        results.extend(rows)
        print_forensics(rows)
    return results


def print_forensics(rows: list[dict]) -> None:
    print(f"\nforensics: {rows[0]['ranks']} gloo ranks, median ms per flush over "
          f"{rows[0]['flushes']} alternated flushes (collectives per flush), bytes per "
          "record line")
    print("  wall = the whole flush (collectives waited for included), cpu = this process's "
          "CPU time in it, reduce = Reducer.reduce (wall)")
    print(f"{'K':>6} {'before':>13} {'forensics':>13} {'ratio':>6} {'cpu':>15} {'ratio':>6} "
          f"{'reduce':>15} {'ratio':>6} {'bytes/line':>21} {'ratio':>6} {'with a NaN':>10}")
    for r in rows:
        print(f"{r['K']:>6} {r['before_ms']:>8.2f} ({r['before_collectives']:.0f}) "
              f"{r['forensics_ms']:>8.2f} ({r['forensics_collectives']:.0f}) "
              f"{r['flush_ratio']:>5.2f}x "
              f"{r['before_cpu_ms']:>6.2f} / {r['forensics_cpu_ms']:>6.2f} "
              f"{r['cpu_ratio']:>5.2f}x "
              f"{r['before_reduce_ms']:>6.2f} / {r['forensics_reduce_ms']:>6.2f} "
              f"{r['reduce_ratio']:>5.2f}x "
              f"{r['before_bytes_per_line']:>10.0f} / {r['forensics_bytes_per_line']:>8.0f} "
              f"{r['bytes_ratio']:>5.2f}x {r['forensics_bytes_nan_line']:>10.0f}")


# -- training overhead -----------------------------------------------------------------------

QUICK = False
"""--quick: the smallest stand-in and counts (a smoke run: every section, every count)."""


def bench_config():
    from monitor.testing import TinyCogVLAConfig

    if QUICK:
        return TinyCogVLAConfig(num_vision_aggr=8, num_images_in_input=2, image_size=16)
    # real: batch 16, 2 images, K = 64 aggregation tokens per image and encoder (128 visual
    # tokens into the LLM), 224 px / 14 = 16 x 16 patches; widths stay toy-sized (CPU)
    return TinyCogVLAConfig(num_vision_aggr=64, num_images_in_input=2, image_size=32)


class HookTimer:
    """Seconds spent in every observer hook and batched-statistics drain (wall clock)."""

    def __init__(self) -> None:
        from monitor import observer

        self.seconds = 0.0
        self._depth = 0  # a drain can run inside a hook: count the outermost call only
        self._observer = observer
        self._hook, self._drain = observer.Observer.hook, observer.Observer.drain
        timer = self

        def hook(obs, module, fn, *, name):
            def timed(*args, **kwargs):
                return timer.timed(fn, *args, **kwargs)

            return timer._hook(obs, module, timed, name=name)

        def drain(obs):
            return timer.timed(timer._drain, obs)

        observer.Observer.hook, observer.Observer.drain = hook, drain

    def timed(self, fn, *args, **kwargs):
        self._depth += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._depth -= 1
            if not self._depth:
                self.seconds += time.perf_counter() - t0

    def restore(self) -> None:
        self._observer.Observer.hook, self._observer.Observer.drain = self._hook, self._drain


def _train_step(model, opt, batch, mon, step, tasks=None):
    if tasks is not None:
        mon.set_groups(tasks)  # before the forward, as a script does
    out = model(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if mon is not None:
        mon.log_step(step)  # after the forward, as the seed guide does
        with mon.step(step, mode="train") as h:
            h.log(loss=out.loss.detach(), lr=opt.param_groups[0]["lr"])
    return out


def bench_overhead(steps: int, batch_size: int, threads: int) -> dict:
    from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
    from monitor.testing import build_tiny_cogvla, synthetic_batch

    torch.set_num_threads(threads)
    cfg = bench_config()
    models = [build_tiny_cogvla(cfg, seed=0) for _ in range(2)]  # [monitored, bare]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    batch = synthetic_batch(cfg, batch_size=batch_size,
                            generator=torch.Generator().manual_seed(0))
    timer = HookTimer()
    with tempfile.TemporaryDirectory() as tmp:
        mon = CogVLAMonitoring(run_dir=f"{tmp}/run", run_id="bench", config_name="bench",
                               cfg=CogVLAMonitoringConfig(participation="local"))
        hooks = mon.attach(models[0])
        warmup = 0 if QUICK else 2  # --quick: a smoke run, its times are not figures
        times: dict[str, list[float]] = {"on": [], "off": []}
        hook_ms = []
        for i in range(warmup + steps):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")  # no position bias
            for which in order:
                gc.collect()
                before = timer.seconds
                t0 = time.perf_counter()
                if which == "on":
                    _train_step(models[0], opts[0], batch, mon, i)
                else:
                    _train_step(models[1], opts[1], batch, None, i)
                elapsed = time.perf_counter() - t0
                if i >= warmup:
                    times[which].append(elapsed)
                    if which == "on":
                        hook_ms.append((timer.seconds - before) * 1e3)
        mon.finalize()
    timer.restore()
    on, off = times["on"], times["off"]
    result = {
        "config": {"batch_size": batch_size, "images": cfg.num_images_in_input,
                   "visual_tokens": cfg.num_visual_tokens,
                   "patches_per_image": (cfg.image_size // cfg.patch_size) ** 2,
                   "lfp_layers": 24, "threads": threads,
                   "widths": {"llm": cfg.hidden_size, "dino": cfg.dino_width,
                              "siglip": cfg.siglip_width}},
        "hooks": hooks, "steps_each": steps,
        "median_on_s": statistics.median(on), "median_off_s": statistics.median(off),
        "median_ratio": statistics.median(on) / statistics.median(off),
        "mean_ratio": statistics.mean(on) / statistics.mean(off),
        "hook_ms_per_step_median": statistics.median(hook_ms),
        "hook_ms_per_step_mean": statistics.mean(hook_ms),
    }
    result["real_widths"] = bench_real_width_hooks(threads, batch_size, 3 if QUICK else 15)
    print_overhead(result)
    return result


def print_overhead(r: dict) -> None:
    c = r["config"]
    print(f"\noverhead: CogVLA stand-in, batch {c['batch_size']}, {c['images']} images, "
          f"{c['visual_tokens']} visual tokens into {c['lfp_layers']} LFP routers, "
          f"{c['threads']} thread(s), {r['steps_each']} steps each, alternated")
    print(f"  step median: monitor off {r['median_off_s']:.3f} s, on {r['median_on_s']:.3f} s: "
          f"ratio {r['median_ratio']:.4f} (means: {r['mean_ratio']:.4f})")
    print(f"  monitor hooks + batched statistics: {r['hook_ms_per_step_median']:.1f} ms per "
          f"step (median; mean {r['hook_ms_per_step_mean']:.1f})")
    rw = r["real_widths"]
    print(f"  the same hooks at the real widths (router in {rw['router_width']}, FiLM "
          f"{rw['film_widths']}): {rw['ms_per_step']:.1f} ms per step "
          f"({', '.join(f'{k} {v:.1f}' for k, v in rw['ms_by_part'].items())})")


class _LfpLayer:
    """What the LFP adapter reads of a decoder layer (``router_factor``, visual count)."""

    router_factor = 0.5

    def get_num_patches(self) -> int:
        return 64

    def get_num_images_in_input(self) -> int:
        return 2


def real_width_rig(session, batch_size: int, widths=(4096, 1024, 1152)):
    """The CogVLA adapters' hooks, fed what they get from the real model at its widths.

    LFP: 24 routers (``FiLMedTokenRouter``, input width 4096, on 217 tokens);
    FiLM: ``.scale``/``.shift`` outputs ``(B, 1024)`` for DINO layers 0/9/18 and ``(B, 1152)``
    for SigLIP layers 0/9/18/26; MoE: router logits ``(B, 2)``; aggregation: 64 tokens of
    width 1024/1152 per encoder. Returns ``(observers, parts)``: ``parts[part]()`` makes one
    forward's worth of that part's hook calls (the logits come from a real
    ``FiLMedTokenRouter`` at width 4096, run once beforehand: its cost is the model's).
    """
    from monitor.pruning import (
        AggregationObserver,
        FiLMObserver,
        MoERouterObserver,
        PruningObserver,
    )
    from monitor.pruning.adapters.cogvla_wiring import (
        CogVLAAggregationAdapter,
        CogVLAFiLMAdapter,
        CogVLALfpAdapter,
    )

    # BOS, 128 visual, proprio, a 30-token prompt, 8 x 7 action tokens and the stop token
    width, dino, siglip = widths
    seq, nv = 1 + 128 + 1 + 30 + 56 + 1, 128
    lfp = PruningObserver(session)
    lfp_adapter = CogVLALfpAdapter(lfp)
    comps = [f"layer_{i:02d}" for i in range(8, 32)]
    lfp.add_components(comps)
    layers = [_LfpLayer() for _ in comps]
    lfp_hooks = [lfp_adapter._hook(layer, c) for layer, c in zip(layers, comps)]
    film = FiLMObserver(session)
    film_adapter = CogVLAFiLMAdapter(film)
    film_calls = []
    for enc, w, idx in (("dino", dino, (0, 9, 18)), ("siglip", siglip, (0, 9, 18, 26))):
        for i in idx:
            c = f"{enc}/layer_{i:02d}"
            film.add_components([c])
            film_calls.append((film_adapter._hook(c, "gamma"), torch.randn(batch_size, w)))
            film_calls.append((film_adapter._hook(c, "beta"), torch.randn(batch_size, w)))
    moe = MoERouterObserver(session, experts=["dino", "siglip"])
    aggr = AggregationObserver(session, ["dino", "siglip"])
    aggr_adapter = CogVLAAggregationAdapter(aggr)
    aggr_calls = []
    for enc, w in (("dino", dino), ("siglip", siglip)):
        vit = torch.nn.Module()
        aggr_calls.append((aggr_adapter._in_hook(enc), aggr_adapter._out_hook(enc, 64, vit),
                           torch.randn(batch_size, 256, w), torch.randn(batch_size, 325, w)))
    from monitor.testing import FiLMedTokenRouter, LlamaConfig

    router = FiLMedTokenRouter(LlamaConfig(hidden_size=width))  # LFP's router at width 4096
    hidden = torch.randn(batch_size, seq, width)
    mask = torch.zeros(batch_size, 1, seq, seq)
    with torch.no_grad():
        out = router(hidden, mask, nv)  # (B, S, 2) logits, as every LFP layer's router gives
    logits = [out + 0.1 * torch.randn_like(out) for _ in layers]
    moe_logits = torch.randn(batch_size, 2)
    observers = {"lfp": lfp, "film": film, "moe": moe, "aggr": aggr}
    parts = {
        "lfp": lambda: [h(router, (hidden, mask, nv), {}, out)
                        for h, out in zip(lfp_hooks, logits)],
        "film": lambda: [h(None, (), {}, g) for h, g in film_calls],
        "moe": lambda: moe.observe_logits(moe_logits),
        "aggr": lambda: [(i(None, (), {}, x), o(None, (), {}, y)) for i, o, x, y in aggr_calls],
    }
    return observers, parts


def bench_real_width_hooks(threads: int, batch_size: int, reps: int = 15) -> dict:
    from monitor.session import MonitorSession

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        session = MonitorSession(f"{tmp}/run", "rig", participation="local")
        observers, parts = real_width_rig(session, batch_size)
        ms = {}
        with torch.no_grad():
            for name, call in parts.items():
                obs = observers[name]
                times = []
                for i in range(reps + 2):
                    t0 = time.perf_counter()
                    call()
                    obs.drain()
                    if i >= 2:
                        times.append(time.perf_counter() - t0)
                ms[name] = statistics.median(times) * 1e3
        for obs in observers.values():
            obs.finalize(flush=False)
    return {"router_width": 4096, "film_widths": [1024, 1152], "batch_size": batch_size,
            "ms_by_part": ms, "ms_per_step": sum(ms.values())}


# -- per-task groups ---------------------------------------------------------------------------

NUM_GROUPS = 40
"""LIBERO's 40 tasks."""


def _grouped_facades(tmp: str, models, **cfg):
    """Two facades with every part on, the first with 40 groups (``cfg``: intervals)."""
    from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig

    names = [f"task {i:02d}" for i in range(NUM_GROUPS)]
    mons = []
    for i, group_names in enumerate((names, None)):
        mon = CogVLAMonitoring(run_dir=f"{tmp}/run{i}", run_id=f"groups{i}", config_name="bench",
                               cfg=CogVLAMonitoringConfig(participation="local", console=False,
                                                          group_names=group_names, **cfg))
        mon.attach(models[i])
        mons.append(mon)
    return mons


def bench_groups(steps: int, flushes: int, batch_size: int, threads: int) -> dict:
    from monitor.testing import build_tiny_cogvla, synthetic_batch

    torch.set_num_threads(threads)
    logging.getLogger("monitor").setLevel(logging.ERROR)  # alerts of the untrained stand-in
    cfg = bench_config()
    gen = torch.Generator().manual_seed(0)
    tasks = torch.randint(0, NUM_GROUPS, (batch_size,), generator=gen)
    batch = synthetic_batch(cfg, batch_size=batch_size, generator=gen, tasks=tasks)
    models = [build_tiny_cogvla(cfg, seed=0) for _ in range(2)]  # [groups, no groups]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    result: dict = {"groups": NUM_GROUPS, "batch_size": batch_size, "threads": threads}
    timer = HookTimer()
    with tempfile.TemporaryDirectory() as tmp:
        mons = _grouped_facades(tmp, models)
        wall: dict[int, list[float]] = {0: [], 1: []}
        cpu: dict[int, list[float]] = {0: [], 1: []}
        hooks: dict[int, list[float]] = {0: [], 1: []}
        warmup = 0 if QUICK else 2
        for i in range(warmup + steps):
            for which in (0, 1) if i % 2 == 0 else (1, 0):  # no position bias
                gc.collect()
                before = timer.seconds
                t0, c0 = time.perf_counter(), time.process_time()
                _train_step(models[which], opts[which], batch, mons[which], i,
                            tasks if which == 0 else None)
                if i >= warmup:
                    wall[which].append(time.perf_counter() - t0)
                    cpu[which].append(time.process_time() - c0)
                    hooks[which].append(timer.seconds - before)
        for mon in mons:
            mon.finalize()
    timer.restore()
    med = {k: {w: statistics.median(v[w]) for w in (0, 1)} for k, v in
           (("wall", wall), ("cpu", cpu), ("hooks", hooks))}
    result.update(
        steps_each=steps, step_s_groups=med["wall"][0], step_s_plain=med["wall"][1],
        overhead_ratio=med["wall"][0] / med["wall"][1],
        mean_ratio=statistics.mean(wall[0]) / statistics.mean(wall[1]),
        cpu_ratio=med["cpu"][0] / med["cpu"][1],
        hook_ms_groups=med["hooks"][0] * 1e3, hook_ms_plain=med["hooks"][1] * 1e3,
        # what grouping itself adds (its hook and drain time), against the step without it:
        # robust to the load of a shared machine, which moves whole steps by seconds
        hook_ratio=(med["wall"][1] + med["hooks"][0] - med["hooks"][1]) / med["wall"][1])
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        mons = _grouped_facades(tmp, models, pruning_event_log_interval=1,
                                monitor_log_interval=1)
        flush_ms: dict[int, list[float]] = {0: [], 1: []}
        first = 1 if QUICK else 2  # the first flush decides participation, sizes buffers
        for i in range(first + flushes):
            for which in (0, 1) if i % 2 == 0 else (1, 0):
                mon = mons[which]
                if which == 0:
                    mon.set_groups(tasks)
                models[which](**batch)
                for obs in mon.observers.values():
                    obs.drain()  # the hook work: not the flush's
                t0 = time.perf_counter()
                mon.log_step(i)  # writes record i - 1 (every compact stream)
                if i >= first:
                    flush_ms[which].append((time.perf_counter() - t0) * 1e3)
                with mon.step(i) as h:
                    h.log(loss=0.5)
        for mon in mons:
            mon.finalize()
        line_bytes = []
        for i in range(2):
            path = Path(tmp, f"run{i}", "lfp_logs", f"groups{i}.jsonl")
            lines = [x for x in path.read_bytes().split(b"\n") if b'"metrics"' in x]
            line_bytes.append(statistics.median(len(x) + 1 for x in lines))
        rows = [sum(len(o.events.slots.names) for o in m.observers.values()) for m in mons]
    result.update(flushes_each=flushes, flush_ms_groups=statistics.median(flush_ms[0]),
                  flush_ms_plain=statistics.median(flush_ms[1]),
                  flush_ratio=statistics.median(flush_ms[0]) / statistics.median(flush_ms[1]),
                  compact_rows_groups=rows[0], compact_rows_plain=rows[1],
                  lfp_bytes_per_line_groups=line_bytes[0], lfp_bytes_per_line_plain=line_bytes[1])
    print(f"\ngroups: {NUM_GROUPS} groups, every part on, stand-in of 'overhead' (batch "
          f"{batch_size}, {threads} thread(s)), {steps} steps each, alternated")
    print(f"  step median: without groups {result['step_s_plain']:.3f} s, with "
          f"{result['step_s_groups']:.3f} s: ratio {result['overhead_ratio']:.4f} (means: "
          f"{result['mean_ratio']:.4f}; process CPU time: {result['cpu_ratio']:.4f})")
    print(f"  monitor hooks + batched statistics per step: {result['hook_ms_plain']:.1f} ms "
          f"without groups, {result['hook_ms_groups']:.1f} ms with: the step plus that "
          f"difference, {result['hook_ratio']:.4f}x (target <= 1.01)")
    print(f"  flush (compact records of every part, {flushes} each, alternated): "
          f"{result['flush_ms_plain']:.1f} ms without groups, {result['flush_ms_groups']:.1f} ms "
          f"with: ratio {result['flush_ratio']:.2f} (target <= 2); compact rows "
          f"{rows[1]} -> {rows[0]}, LFP record {line_bytes[1]:.0f} -> {line_bytes[0]:.0f} bytes")
    return result


# -- host syncs ------------------------------------------------------------------------------

def bench_syncs(steps: int, batch_size: int) -> dict:
    from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
    from monitor.testing import build_tiny_cogvla, synthetic_batch
    from monitor.testing.probes import HostSyncSpy

    cfg = bench_config()
    model = build_tiny_cogvla(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = synthetic_batch(cfg, batch_size=batch_size, generator=torch.Generator().manual_seed(0))
    interval = steps + 2  # the steps in between (2 .. steps + 1) flush nothing
    with tempfile.TemporaryDirectory() as tmp:
        mon = CogVLAMonitoring(run_dir=f"{tmp}/run", run_id="syncs", cfg=CogVLAMonitoringConfig(
            participation="local", monitor_log_interval=interval,
            pruning_event_log_interval=interval, detailed_log_interval=interval,
            group_names=[f"task {i:02d}" for i in range(NUM_GROUPS)]))
        mon.attach(model)
        tasks = torch.arange(batch_size) % NUM_GROUPS  # a CPU tensor: checked there, no read
        _train_step(model, opt, batch, mon, 0, tasks)  # step 0 is due everywhere
        _train_step(model, opt, batch, mon, 1, tasks)  # ... and flushed at step 1's first call
        with HostSyncSpy(only_from="monitor") as between:
            for step in range(2, steps + 2):
                _train_step(model, opt, batch, mon, step, tasks)
        with HostSyncSpy(only_from="monitor") as at_flush:
            _train_step(model, opt, batch, mon, interval)
            _train_step(model, opt, batch, mon, interval + 1)  # flushes step `interval`
            mon.finalize()
    result = {"steps_between_flushes": steps, "host_syncs_between_flushes": len(between.calls),
              "by_method_between": dict(between.counts),
              "host_syncs_in_a_flush_and_finalize": len(at_flush.calls)}
    print(f"\nsyncs: {len(between.calls)} host reads of tensors by monitor code in {steps} "
          f"training steps between flushes (40 groups, set_groups every step); "
          f"{len(at_flush.calls)} in a flushing step and "
          f"finalize ({dict(at_flush.counts)}: the reduced results are read; 2 per flush "
          "copy from the device, marked in monitor/distributed.py, the rest read host copies)")
    return result


# -- log() per call: the thread lock's price ---------------------------------------------------

class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def acquire(self, *args, **kwargs):
        return True

    def release(self):
        pass


def bench_log(calls: int, rounds: int) -> dict:
    import threading

    from monitor import Monitor

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        mon = Monitor(run_dir=f"{tmp}/run", run_id="log", log_interval=10**9, console=False)
        values = {"host floats": {"loss": 0.5, "lr": 1e-4},
                  "0-d tensors": {"loss": torch.tensor(0.5), "lr": torch.tensor(1e-4)}}
        locks = {"with lock": mon.session.lock, "no lock": _NoLock()}
        for kind, kwargs in values.items():
            times = {name: [] for name in locks}
            with mon.step(0) as h:
                for i in range(rounds):
                    order = list(locks.items())
                    for name, lock in order if i % 2 else order[::-1]:  # alternated, ABBA
                        mon.session.lock = lock
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            h.log(**kwargs)
                        times[name].append((time.perf_counter() - t0) / calls * 1e6)
            mon.session.lock = locks["with lock"]
            with_lock, without = (min(times[n]) for n in locks)
            out[kind] = {"us_per_call_with_lock": with_lock, "us_per_call_no_lock": without,
                         "lock_us_per_call": with_lock - without, "ratio": with_lock / without}
        mon.finalize()
    lock = threading.RLock()
    t0 = time.perf_counter()
    for _ in range(calls * 10):
        with lock:
            pass
    out["rlock_acquire_release_us"] = (time.perf_counter() - t0) / (calls * 10) * 1e6
    print(f"\nlog: one log() call ({calls} calls x {rounds} rounds, fastest round)")
    for kind in values:
        r = out[kind]
        print(f"  {kind}: {r['us_per_call_with_lock']:.2f} us with the lock, "
              f"{r['us_per_call_no_lock']:.2f} us without ({r['lock_us_per_call']:+.3f} us, "
              f"x{r['ratio']:.3f})")
    print(f"  an uncontended RLock acquire + release alone: "
          f"{out['rlock_acquire_release_us']:.3f} us")
    return out


# -- memory ------------------------------------------------------------------------------------

def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, Linux units


def bench_memory(checkpoints: list[int], batch_size: int, start: int = 100) -> dict:
    """RSS and Python allocations at each checkpoint, against step ``start``."""
    from monitor import Monitor
    from monitor.session import MonitorSession

    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        session = MonitorSession(f"{tmp}/run", "memory", participation="local")
        # the real model's calls, token counts and flushes; widths do not change what is
        # kept between steps, so they are small here (10,000 steps in about 2.5 minutes)
        observers, parts = real_width_rig(session, batch_size, widths=(64, 32, 48))
        train = Monitor(session=session, log_interval=100)  # the facade's defaults
        loss = torch.tensor(0.5)
        tracemalloc.start()
        start_rss, start_py = None, None
        step = 0
        with torch.no_grad():
            for target in [start, *checkpoints]:
                while step < target:
                    for call in parts.values():
                        call()
                    train.log_step(step)
                    with train.step(step) as h:
                        h.log(loss=loss, lr=1e-4)
                    step += 1
                gc.collect()
                rss, py = _rss_mb(), tracemalloc.get_traced_memory()[0] / 2**20
                if start_rss is None:
                    start_rss, start_py = rss, py
                    out[f"after_{start}"] = {"rss_mb": rss, "python_mb": py}
                    continue
                out[f"after_{target}"] = {"rss_mb": rss, "python_mb": py,
                                          "rss_growth_mb": rss - start_rss,
                                          "python_growth_mb": py - start_py}
        tracemalloc.stop()
        for obs in observers.values():
            obs.finalize()
        train.finalize()
        out["records_written"] = sum(
            len(p.read_text().splitlines()) for p in Path(tmp, "run").rglob("*.jsonl"))
    print("\nmemory: the monitor driven as by the real model (toy widths), default intervals")
    for key, v in out.items():
        if key.startswith("after_") and "rss_growth_mb" in v:
            print(f"  {key.replace('_', ' ')} steps: RSS {v['rss_mb']:.1f} MB "
                  f"({v['rss_growth_mb']:+.1f} since step {start}), Python allocations "
                  f"{v['python_mb']:.2f} MB ({v['python_growth_mb']:+.3f})")
    print(f"  records written: {out['records_written']}")
    return out


# -- main ----------------------------------------------------------------------------------------

def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+",
                   default=["flush", "forensics", "overhead", "groups", "syncs", "log",
                            "memory"],
                   choices=["flush", "forensics", "overhead", "groups", "syncs", "log",
                            "memory"])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    p.add_argument("--metrics", type=int, nargs="+", default=[10, 100, 1000, 10_000])
    p.add_argument("--forensics-ranks", type=int, nargs="+", default=[2])
    p.add_argument("--forensics-metrics", type=int, nargs="+", default=[1000])
    p.add_argument("--steps", type=int, default=12, help="overhead: steps each, alternated")
    p.add_argument("--group-steps", type=int, default=12,
                   help="groups: training steps each, alternated")
    p.add_argument("--group-flushes", type=int, default=15, help="groups: flushes each")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--memory-steps", type=int, nargs="+", default=[1000, 10_000])
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--out", default=str(ROOT / "bench-results.json"))
    args = p.parse_args()
    if args.quick:
        global QUICK
        QUICK = True
        args.metrics = [k for k in args.metrics if k <= 10] or [10]
        args.forensics_metrics = [k for k in args.forensics_metrics if k <= 100] or [100]
        args.steps, args.batch_size, args.memory_steps = 1, 1, [40, 60]
        args.group_steps, args.group_flushes = 1, 1
        args.threads = 1  # a loaded machine: no thread fights the others
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "machine": machine(), "time": time.time()}
    sections = {
        "flush": lambda: bench_flush(args.ranks, args.metrics, args.quick),
        "forensics": lambda: bench_forensics(args.forensics_ranks, args.forensics_metrics,
                                             args.quick),
        "overhead": lambda: bench_overhead(args.steps, args.batch_size, args.threads),
        "groups": lambda: bench_groups(args.group_steps, args.group_flushes, args.batch_size,
                                       args.threads),
        "syncs": lambda: bench_syncs(3 if args.quick else 5, args.batch_size),
        "log": lambda: bench_log(200 if args.quick else 500, 4 if args.quick else 40),
        # growth does not scale with tensor sizes, only with calls and flushes: batch 2
        # keeps 10,000 steps short
        "memory": lambda: bench_memory(args.memory_steps, 2, 20 if args.quick else 100),
    }
    results["seconds"] = {}
    for name, run in sections.items():
        if name in args.sections:
            t0 = time.perf_counter()
            results[name] = run()
            results["seconds"][name] = round(time.perf_counter() - t0, 1)
            print(f"  ({name}: {results['seconds'][name]:.0f} s)")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
