"""What each rank of a CogVLA test world runs (importable by spawned processes)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from workers import count_collectives

from monitor import MonitorSession
from monitor.pruning import AggregationObserver, FiLMObserver, MoERouterObserver, PruningObserver
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch


def public_script(rank, world_size, run_dir, steps, grad_accumulation_steps, monitor_ranks,
                  wandb_log_freq=2, lfp_monitor_interval=2):
    """The public CogVLA finetune.py's calls, in its order (vla-scripts/finetune.py)."""
    torch.manual_seed(0)
    cfg = TinyCogVLAConfig(image_size=16)
    vla = DDP(build_tiny_cogvla(cfg, seed=0), find_unused_parameters=True)
    opt = torch.optim.AdamW(vla.parameters(), lr=1e-3)
    monitor = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the film index 26 warning; rank-0-only notes
        if rank in monitor_ranks:
            monitor = CogVLAMonitoring(
                run_dir=run_dir, run_id="cogvla", config_name="libero_spatial",
                cfg=CogVLAMonitoringConfig(
                    enable_train_monitor=True, enable_lfp_monitor=True,
                    enable_film_monitor=True, enable_moe_monitor=True,
                    enable_aggr_monitor=True, monitor_log_interval=2,
                    detailed_log_interval=4, pruning_event_log_interval=2,
                    enable_tensorboard=False, film_sample_layers=[0, 9, 18, 26],
                    # the whole wait when only rank 0 monitors (no one else can come):
                    # short there; room for a slow rank 1 when every rank monitors
                    participation_timeout=3.0 if len(monitor_ranks) == world_size else 1.0))
            monitor.attach(vla)
    train_monitor = monitor.train_monitor if monitor else None
    observers = [o for o in (monitor.lfp_observer, monitor.film_observer, monitor.moe_observer,
                             monitor.aggr_observer) if o is not None] if monitor else []
    gen = torch.Generator().manual_seed(100 + rank)
    exported, per_batch = [], []
    counter = count_collectives()
    for batch_idx in range(steps * grad_accumulation_steps):
        before = counter["n"]
        out = vla(**synthetic_batch(cfg, batch_size=2, generator=gen))
        (out.loss / grad_accumulation_steps).backward()
        log_step = batch_idx // grad_accumulation_steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if train_monitor is not None and log_step % wandb_log_freq == 0:
                with train_monitor.step(log_step, mode="train") as h:
                    h.log(loss=out.loss.detach(), lr=1e-3,
                          extra={"curr_action_l1_loss": out.loss.detach() * 0.5})
            for observer in observers:
                observer.log_step(log_step)
        per_batch.append(counter["n"] - before)  # DDP's own all_reduce is not counted
        if (batch_idx + 1) % grad_accumulation_steps == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if monitor is not None and rank == 0 and log_step % lfp_monitor_interval == 0:
            exported.append(_export(monitor))
    before = counter["n"]
    paths = monitor.finalize() if monitor is not None else None
    per_batch.append(counter["n"] - before)
    counter["restore"]()
    del vla, opt
    return {"paths": paths, "exported": exported, "collectives": per_batch}


def _export(monitor) -> dict:
    """What the script sends to W&B from the observers' summaries."""
    out = {}
    lfp = monitor.lfp_observer.get_summary()
    if lfp["overall"]["count"] > 0:
        out["monitor/lfp/pruned_percent"] = 1 - lfp["overall"]["prune_ratio"]["mean"]
        out["monitor/lfp/tokens_before"] = lfp["overall"]["tokens_before"]["mean"]
        out["monitor/lfp/tokens_after"] = lfp["overall"]["tokens_after"]["mean"]
        for name, comp in lfp["by_component"].items():
            if comp["count"]:
                out[f"monitor/lfp/{name}/kept"] = comp["prune_ratio"]["mean"]
    for part, obs, keys in (
            ("film", monitor.film_observer, ("gamma_norm", "beta_norm", "modulation_strength")),
            ("moe", monitor.moe_observer, ("siglip_weight", "dino_weight", "entropy")),
            ("aggr", monitor.aggr_observer, ("compression_ratio",))):
        summary = obs.get_summary()
        for key in keys:
            if summary[key]["count"]:
                out[f"monitor/{part}/{key}"] = summary[key]["mean"]
    return out


def rank_inputs(rank: int, step: int, call: int) -> dict:
    """Deterministic per-rank observer inputs (the parent regenerates them)."""
    rng = np.random.default_rng(1000 * rank + 10 * step + call)
    batch = 2 + rank  # uneven batches across ranks
    p = rng.random((batch, 12))
    if (rank + step) % 3 == 1:
        p[0, 0] = np.nan
    kept = np.zeros_like(p, dtype=bool)
    order = np.argsort(-np.nan_to_num(p, nan=-1.0), axis=1)
    for b in range(batch):
        kept[b, order[b, : 5 + b % 3]] = True
    return {"p": p, "kept": kept, "forced": rng.random((batch, 4)),
            "gamma": rng.normal(0, 0.1 * (rank + 1), (batch, 6)),
            "beta": rng.normal(0.05, 0.2, (batch, 6)),
            "logits": rng.normal(0, 1 + rank, (batch, 2)),
            "tokens": rng.normal(size=(batch, 4, 5)), "batch": batch}


def observers_world(rank, world_size, run_dir, steps, calls_per_step):
    """Every observer on every rank, fed rank_inputs(); returns collectives per call."""
    counter = count_collectives()
    try:
        session = MonitorSession(run_dir, "obs", participation="all")
        lfp = PruningObserver(session, ["layer_00", "layer_01"], event_interval=2,
                              detailed_interval=4)
        film = FiLMObserver(session, ["dino/layer_00"], event_interval=2, detailed_interval=4)
        moe = MoERouterObserver(session, ["dino", "siglip"], event_interval=2,
                                detailed_interval=4)
        aggr = AggregationObserver(session, ["dino"], event_interval=2, detailed_interval=4)
        per_step = []
        for step in range(steps):
            for call in range(calls_per_step):
                x = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                     for k, v in rank_inputs(rank, step, call).items()}
                lfp.observe("layer_00", x["p"], x["kept"], x["forced"])
                lfp.observe("layer_01", x["p"].flip(1), x["kept"].flip(1))
                film.observe("dino/layer_00", gamma=x["gamma"])
                film.observe("dino/layer_00", beta=x["beta"])
                moe.observe_logits(x["logits"])
                aggr.observe("dino", 256, 4, x["batch"], x["tokens"])
            before = counter["n"]
            lfp.log_step(step)  # after the step's calls, as the seed guide does
            for obs in (film, moe, aggr):
                obs.log_step(step)
            per_step.append(counter["n"] - before)
        before = counter["n"]
        for obs in (lfp, film, moe, aggr):
            obs.finalize()
        per_step.append(counter["n"] - before)
    finally:
        counter["restore"]()
    return {"per_step": per_step, "calls": counter["calls"]}


def observers_that_differ(rank, world_size, run_dir):
    """Rank 1 found one more layer than rank 0 (a model that differs): no hang, the union."""
    counter = count_collectives()
    try:
        session = MonitorSession(run_dir, "diff", participation="all")
        comps = ["layer_00"] + (["layer_01"] if rank == 1 else [])
        lfp = PruningObserver(session, comps, event_interval=1, detailed_interval=100)
        per_step = []
        for step in range(4):
            for c in comps:
                p = torch.full((2, 4), 0.25 * (rank + 1), dtype=torch.float64)
                lfp.observe(c, p, torch.tensor([[True, True, False, False]] * 2))
            before = counter["n"]
            lfp.log_step(step)
            per_step.append(counter["n"] - before)
        before = counter["n"]
        lfp.finalize()
        per_step.append(counter["n"] - before)
    finally:
        counter["restore"]()
    return {"per_step": per_step, "calls": counter["calls"]}
