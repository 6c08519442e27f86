"""Demo training job: the CogVLA stand-in under DDP with every monitor part on.

Run under torchrun (see scripts/demo.sh), or as a plain process (one rank, no process
group). Each rank trains the tiny CogVLA stand-in (``monitor.testing``: the real model's
module names, call order and shapes at toy widths) on its own synthetic batches, with DDP
(``find_unused_parameters=True``: the last block of each ViT never gets a gradient, as in
the real model). ``CogVLAMonitoring`` is built on every rank with all five parts on and is
called exactly as the public CogVLA training script calls it; rank 0 writes
``runs/{run_id}/``. Each sample is drawn from one of ``--tasks`` synthetic tasks (its
instruction tokens are that task's), passed to ``monitor.set_groups`` before the forward,
so the records carry per-task statistics and the report draws ``groups.png``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import math
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32,
                   help="the stand-in's image side in pixels (32: 16 x 16 patches per image, "
                        "as the real 224 px / 14; the tests take 16 for speed)")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=10, help="monitor_log_interval")
    p.add_argument("--event-interval", type=int, default=5, help="pruning_event_log_interval")
    p.add_argument("--detailed-interval", type=int, default=15, help="detailed_log_interval")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tasks", type=int, default=40,
                   help="synthetic tasks the samples are drawn from, given to the monitor as "
                        "group_names (LIBERO has 40); 0: no groups")
    p.add_argument("--inject-nan", metavar="RANK:STEP", default=None,
                   help="log a NaN loss on RANK at STEP (training itself is untouched): "
                        "see README 'Which rank?'")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction,
                   default=importlib.util.find_spec("tensorboard") is not None,
                   help="enable_tensorboard (default: on when tensorboard is installed)")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                   help="enable_wandb (default: only into an existing wandb.run; with "
                        "--wandb and WANDB_MODE=offline the run goes to RUN_DIR/wandb/)")
    return p.parse_args()


VERBS = ("pick up", "put", "open", "close", "push", "turn on", "stack", "place")
OBJECTS = ("the black bowl", "the top drawer of the cabinet", "the alphabet soup",
           "the cream cheese box", "the ketchup bottle")


def task_names(n: int) -> list[str]:
    """``n`` distinct synthetic task instructions (LIBERO-like, made up)."""
    names = [f"{verb} {obj}" for obj in OBJECTS for verb in VERBS]
    return [names[i] if i < len(names) else f"task {i}" for i in range(n)]


def main() -> None:
    args = parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    torch.manual_seed(0)
    cfg = TinyCogVLAConfig(image_size=args.image_size)
    vla = build_tiny_cogvla(cfg, seed=0)
    if distributed:
        vla = DDP(vla, find_unused_parameters=True)
    opt = torch.optim.AdamW(vla.parameters(), lr=args.lr)
    total = args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    monitor_cfg = CogVLAMonitoringConfig(
        enable_train_monitor=True, enable_lfp_monitor=True, enable_film_monitor=True,
        enable_moe_monitor=True, enable_aggr_monitor=True,
        monitor_log_interval=args.log_interval, detailed_log_interval=args.detailed_interval,
        pruning_event_log_interval=args.event_interval, enable_tensorboard=args.tensorboard,
        enable_wandb=args.wandb, film_sample_layers=[0, 9, 18, 26],
        console_samples_per_step=args.batch_size * args.grad_accumulation * world,
        group_names=task_names(args.tasks) if args.tasks else None,
    )
    monitor = CogVLAMonitoring(run_dir=args.run_dir, run_id=args.run_id,
                               config_name="synthetic-libero", cfg=monitor_cfg)
    with warnings.catch_warnings(record=True) as caught:  # none with the released settings
        warnings.simplefilter("always")
        counts = monitor.attach(vla)  # after DDP wrapping, as the public script does
    if rank == 0:
        print(f"[rank 0] hooks per part: {counts}", flush=True)
        for w in caught:
            print(f"[rank 0] attach warning: {w.message}", flush=True)
    nan_at = tuple(int(v) for v in args.inject_nan.split(":")) if args.inject_nan else None
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    for batch_idx in range(args.steps * args.grad_accumulation):
        step = batch_idx // args.grad_accumulation
        tasks = None
        if args.tasks:
            tasks = torch.randint(0, args.tasks, (args.batch_size,), generator=gen)
            monitor.set_groups(tasks)  # before the forward: which task each sample is
        out = vla(**synthetic_batch(cfg, batch_size=args.batch_size, generator=gen,
                                    tasks=tasks))
        (out.loss / args.grad_accumulation).backward()
        monitor.log_step(step)  # after the forward: it labels what the hooks just saw
        last_micro_batch = (batch_idx + 1) % args.grad_accumulation == 0
        grad_norm = None
        if last_micro_batch:
            grad_norm = torch.nn.utils.clip_grad_norm_(vla.parameters(), 1.0)
        loss = out.loss.detach()
        if nan_at == (rank, step):
            loss = loss * float("nan")
        with monitor.step(step, mode="train") as h:
            h.log(loss=loss, lr=sched.get_last_lr()[0],
                  extra={"grad_norm": grad_norm})
        if last_micro_batch:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if rank == 0 and step % args.log_interval == 0 and last_micro_batch:
            lfp = monitor.lfp_observer.get_summary()["overall"]
            if lfp["count"]:
                print(f"[rank 0] step {step}: visual tokens kept "
                      f"{lfp['prune_ratio']['mean']:.3f} (last LFP record, step "
                      f"{monitor.lfp_observer.last_step})", flush=True)
    paths = monitor.finalize()
    if rank == 0:
        print(f"[rank 0] summaries: {sorted(paths)}", flush=True)
    if distributed:
        # Tear down while the interpreter is fully alive: a gloo group left to interpreter
        # shutdown can abort a rank (seen with torch 2.13, about 1 run in 6 under load).
        dist.barrier()
        del vla, opt
        dist.destroy_process_group()
        gc.collect()


if __name__ == "__main__":
    main()
