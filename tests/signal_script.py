"""Training scripts that the signal tests run in a subprocess (or under torchrun) and end.

    python tests/signal_script.py RUN_DIR MODE [ARGS...]

MODE:

``lone [facade] [ignore_term] [no_signals]``
    One process logs ``loss=1.0`` at every step (train interval 1000: one record at step 0,
    then everything stays pending) and prints ``ready`` after step 5; it runs until a
    signal ends it. ``facade``: the CogVLA facade on the stand-in model instead of a plain
    ``Monitor``. ``ignore_term``: the script's own SIGTERM handler, installed before the
    monitor, which prints ``handler`` and lets the process go on (then exits 0 by itself).
    ``no_signals``: ``handle_signals=False``.
``gloo RANK STORE_PATH``
    Rank RANK of a 2-rank gloo world (FileStore STORE_PATH, group timeout 120 s,
    ``participation="all"``, interval 5). Both ranks log steps 0..9; rank 1 then stops
    answering (alive, never at the collective), and rank 0 prints ``blocked`` and enters the
    flush of step 10: it waits inside the gloo collective until a signal ends it.
``torchrun``
    Under ``torchrun --nproc_per_node 2``: every rank logs a step every 20 ms (interval
    1000: after the first record, no collective for a long while, as under NCCL with a long
    interval); rank 1 raises at step 20, torchrun then sends SIGTERM to rank 0.
``inside SIGNAME``
    Records step 0, logs step 1 (pending), then sends itself SIGNAME while it holds the
    session's lock, as if the signal came in the middle of the monitor's own work; prints
    what it sees inside (``inside: open 1``), then ``left`` once out of it, and waits.
``fork_exit``
    The process forks; the child exits normally (its exit handlers run) while the parent
    goes on and finalizes: the parent's status must be the parent's.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import torch

from monitor import Monitor


def lone(run_dir: str, *flags: str) -> None:
    if "ignore_term" in flags:
        def handler(signum, frame):
            print("handler", flush=True)
        signal.signal(signal.SIGTERM, handler)
    if "facade" in flags:
        from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
        from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

        model_cfg = TinyCogVLAConfig(image_size=16)
        model = build_tiny_cogvla(model_cfg, seed=0)
        mon = CogVLAMonitoring(run_dir=run_dir, run_id="run", cfg=CogVLAMonitoringConfig(
            monitor_log_interval=1000, pruning_event_log_interval=1000,
            detailed_log_interval=1000, film_sample_layers=[0, 9], console=False))
        mon.attach(model)
        gen = torch.Generator().manual_seed(0)
    else:
        mon = Monitor(run_dir=run_dir, run_id="run", log_interval=1000, console=False,
                      handle_signals="no_signals" not in flags)
    step = 0
    while True:
        mon.log_step(step)
        if "facade" in flags:
            with torch.no_grad():
                model(**synthetic_batch(model_cfg, batch_size=1, generator=gen))
        with mon.step(step) as h:
            h.log(loss=1.0)
        if step == 5:
            print("ready", flush=True)
        if "ignore_term" in flags and step == 60:
            mon.finalize()
            return
        step += 1
        time.sleep(0.005)


def gloo(run_dir: str, rank: str, store_path: str) -> None:
    import torch.distributed as dist

    rank = int(rank)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    mon = Monitor(run_dir=run_dir, run_id="run", log_interval=5, participation="all",
                  console=False)
    for step in range(11):
        if step == 10 and rank == 1:
            print("stuck", flush=True)
            time.sleep(600)  # alive, never at the collective
        if step == 10:
            print("blocked", flush=True)
        with mon.step(step) as h:  # step 10 is due: rank 0 waits in its collective here
            h.log(loss=float(step + rank))
    print("not reached", flush=True)


def torchrun(run_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    mon = Monitor(run_dir=run_dir, run_id="run", log_interval=1000, participation="all",
                  console=False)
    step = 0
    while True:
        if rank == 1 and step == 20:
            raise RuntimeError("rank 1 fails (an OOM, say)")
        with mon.step(step) as h:
            h.log(loss=float(step), extra={"rank": float(rank)})
        step += 1
        time.sleep(0.02)


def inside(run_dir: str, name: str) -> None:
    mon = Monitor(run_dir=run_dir, run_id="run", log_interval=1000, console=False)
    with mon.step(0) as h:
        h.log(loss=1.0)
    with mon.step(1) as h:
        h.log(loss=2.0)
    with mon.session.lock:
        os.kill(os.getpid(), getattr(signal, name))  # the main thread's handler runs here
        time.sleep(0.3)  # the watcher waits for the lock meanwhile
        lines = len(mon.jsonl_path.read_text().splitlines())
        print("inside:", "closed" if mon.session.closed else "open", lines, flush=True)
    print("left", flush=True)
    time.sleep(60)  # the watcher ends the run, then the signal ends the process


def fork_exit(run_dir: str) -> None:
    mon = Monitor(run_dir=run_dir, run_id="run", log_interval=1, console=False)
    with mon.step(0) as h:
        h.log(loss=1.0)
    child = os.fork()
    if child == 0:
        sys.exit(0)  # the child's exit handlers run here
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    print("child exited", flush=True)
    with mon.step(1) as h:
        h.log(loss=2.0)
    mon.finalize()


if __name__ == "__main__":
    run_dir, mode, *args = sys.argv[1:]
    {"lone": lone, "gloo": gloo, "torchrun": torchrun, "fork_exit": fork_exit,
     "inside": inside}[mode](
        run_dir, *args)
