"""Functions the ranks of the reliability tests run: faults injected for real."""

from __future__ import annotations

import errno
import json
import os
import warnings
from datetime import timedelta

import torch.distributed as dist
from workers import count_collectives

from monitor import Monitor, sinks
from monitor.layout import RunLayout


def _fail_writes() -> dict:
    """Make every file write on this process raise ``OSError(ENOSPC)`` (a full disk)."""
    originals = {"_append": sinks._append, "_replace": sinks._replace}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    sinks._append = sinks._replace = full
    return originals


def _disk_at(rank, step, fail_from, fail_until, originals):
    """Rank 0's writes start failing at step ``fail_from`` and work again at ``fail_until``;
    returns the saved writers to pass back next step."""
    if rank == 0 and step == fail_from:
        return _fail_writes()
    if rank == 0 and step == fail_until:
        sinks._append, sinks._replace = originals["_append"], originals["_replace"]
    return originals


def disk_fails_on_rank0(rank, world_size, run_dir, steps, fail_from, fail_until):
    """Every rank logs each step (interval 1); rank 0's writes fail for steps
    ``fail_from <= step < fail_until``. Returns the collectives issued at each step."""
    counter = count_collectives()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = Monitor(run_dir=run_dir, run_id="disk", log_interval=1, participation="all")
        deltas, originals = [], None
        for step in range(steps):
            originals = _disk_at(rank, step, fail_from, fail_until, originals)
            before = counter["n"]
            with mon.step(step) as h:
                h.log(loss=float(step + rank))
            deltas.append(counter["n"] - before)
        before = counter["n"]
        mon.finalize()
        deltas.append(counter["n"] - before)
    counter["restore"]()
    return {"deltas": deltas, "warnings": [str(w.message) for w in caught],
            "degraded": mon.session.degraded}


def rank_dies(rank, world_size, run_dir, how):
    """Rank 1 dies (``exit``) or stops answering (``stuck``) before the flush of step 3;
    rank 0 must get the process group's error, not hang. Returns what rank 0 saw."""
    store = dist.distributed_c10d._get_default_store()
    error = None
    try:
        with Monitor(run_dir=run_dir, run_id="die", log_interval=1, participation="all") as mon:
            for step in range(6):
                if rank == 1 and step == 3:
                    if how == "exit":
                        os._exit(17)  # no exception, no clean-up: the process is gone
                    store.set_timeout(timedelta(seconds=120))
                    store.wait(["rank0-done"])  # alive but never at the collective
                    os._exit(0)
                with mon.step(step) as h:
                    h.log(loss=float(step))
    except Exception as exc:  # noqa: BLE001 - what rank 0 saw is the result
        error = exc
    if rank == 0:
        store.set("rank0-done", "1")
    meta = json.loads((mon.session.files.path(RunLayout("die").meta)).read_text())
    return {"type": type(error).__name__, "is_runtime_error": isinstance(error, RuntimeError),
            "message": str(error)[:500], "meta_status": meta["status"],
            "meta_error": meta["error"]}


def facade_disk_fails_on_rank0(rank, world_size, run_dir, steps, fail_from, fail_until):
    """The CogVLA facade (training metrics and four observers, one fused flush per due step)
    on the stand-in model; rank 0's writes fail for ``fail_from <= step < fail_until``."""
    import torch

    from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
    from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

    model_cfg = TinyCogVLAConfig(image_size=16)
    model = build_tiny_cogvla(model_cfg, seed=0)
    counter = count_collectives()
    gen = torch.Generator().manual_seed(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = CogVLAMonitoring(run_dir=run_dir, run_id="disk", cfg=CogVLAMonitoringConfig(
            monitor_log_interval=1, pruning_event_log_interval=1, detailed_log_interval=2,
            film_sample_layers=[0, 9], participation="all"))
        mon.attach(model)
        deltas, originals = [], None
        for step in range(steps):
            originals = _disk_at(rank, step, fail_from, fail_until, originals)
            before = counter["n"]
            with torch.no_grad():
                out = model(**synthetic_batch(model_cfg, batch_size=1, generator=gen))
            mon.log_step(step)
            with mon.step(step) as h:
                h.log(loss=out.loss)
            deltas.append(counter["n"] - before)
        before = counter["n"]
        mon.finalize()
        deltas.append(counter["n"] - before)
    counter["restore"]()
    return {"deltas": deltas, "degraded": mon.session.degraded,
            "warnings": [str(w.message) for w in caught if "cannot write" in str(w.message)]}


def finalize_after_destroy(rank, world_size, run_dir, facade):
    """Records at steps 0, 2, 4 (interval 2); step 5 stays pending; the script then destroys
    the process group *before* ``finalize()``, a common end-of-script order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if facade:
            from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig

            mon = CogVLAMonitoring(run_dir=run_dir, run_id="gone", cfg=CogVLAMonitoringConfig(
                monitor_log_interval=2, participation="all", enable_lfp_monitor=False,
                enable_film_monitor=False, enable_moe_monitor=False, enable_aggr_monitor=False))
        else:
            mon = Monitor(run_dir=run_dir, run_id="gone", log_interval=2, participation="all")
        for step in range(6):
            with mon.step(step) as h:
                h.log(loss=float(10 * rank + step))
        dist.destroy_process_group()
        mon.finalize()
    return [str(w.message) for w in caught]
