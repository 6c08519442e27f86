"""A small CogVLA training script that the reliability tests run in a subprocess and break.

    python tests/fault_script.py RUN_DIR MODE [RUN_ID]

MODE: ``with_inside``/``with_outside`` (the ``with CogVLAMonitoring(...)`` form, 1/0 raised
at step 5 inside/outside the step context), ``exit_inside``/``exit_outside`` (the same crash,
but ``finalize()`` is never called: the exit handler must write the end), ``exit_clean``
(no crash, no ``finalize()``), ``sysexit_N``/``with_sysexit_N`` (``sys.exit(N)`` at step 5,
outside the step context, without ``finalize()``/leaving the ``with`` block), ``forever``
(log every step until killed), ``hold`` (open the run, print ``ready`` and wait to be
killed), ``hold_fork`` (the same, after forking a child that sleeps, as a DataLoader worker
would: its pid follows ``ready``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

CRASH_STEP = 5


def main(run_dir: str, mode: str, run_id: str = "run") -> None:
    torch.set_num_threads(1)
    interval = 1 if mode == "forever" else 2
    cfg = CogVLAMonitoringConfig(monitor_log_interval=interval,
                                 pruning_event_log_interval=interval, detailed_log_interval=4,
                                 film_sample_layers=[0, 9])
    monitor = CogVLAMonitoring(run_dir=run_dir, run_id=run_id, config_name="fault", cfg=cfg)
    if mode.startswith("hold"):
        child = os.fork() if mode == "hold_fork" else None
        if child == 0:
            time.sleep(600)
            os._exit(0)
        print("ready", "" if child is None else child, flush=True)
        time.sleep(600)
        return
    model_cfg = TinyCogVLAConfig(image_size=16)
    model = build_tiny_cogvla(model_cfg, seed=0)
    monitor.attach(model)
    scope = monitor if mode.startswith("with_") else contextlib.nullcontext(monitor)
    gen = torch.Generator().manual_seed(0)
    with scope as m:
        step = 0
        while mode == "forever" or step < 8:
            with torch.no_grad():
                out = model(**synthetic_batch(model_cfg, batch_size=1, generator=gen))
            m.log_step(step)
            with m.step(step) as h:
                h.log(loss=out.loss, lr=1e-3)
                if mode.endswith("_inside") and step == CRASH_STEP:
                    raise ZeroDivisionError("division by zero (an injected crash)")
            if mode.endswith("_outside") and step == CRASH_STEP:
                raise ZeroDivisionError("division by zero (an injected crash)")
            if "sysexit_" in mode and step == CRASH_STEP:
                sys.exit(int(mode.rsplit("_", 1)[1]))
            if mode == "forever" and step == 2:
                print("ready", flush=True)
            step += 1
    # exit_clean ends here without finalize(): the exit handler marks the run incomplete


if __name__ == "__main__":
    main(*sys.argv[1:])
