"""What each rank of a groups test world runs (importable by spawned processes), and the
inputs it feeds (the parent regenerates them for its numpy references)."""

from __future__ import annotations

import numpy as np
import torch
from workers import count_collectives

from monitor import MonitorSession
from monitor.pruning import AggregationObserver, FiLMObserver, MoERouterObserver, PruningObserver

GROUPS = ["pick up the bowl", "open the drawer", "turn on the stove"]
STEPS = 5
BAD_STEP, BAD_RANK = 1, 1  # rank 1 labels one sample of step 1 with ids outside the groups


def labels(rank: int, step: int) -> list[int]:
    """Rank r's group ids at ``step``: uneven batches, group 2 never on rank 0."""
    batch = 3 + rank
    ids = [(rank + step + b) % (2 if rank == 0 else 3) for b in range(batch)]
    return ids


def inputs(rank: int, step: int) -> dict:
    """Deterministic observer inputs of one rank and step (batch ``len(labels)``)."""
    rng = np.random.default_rng(100 * rank + step)
    batch = len(labels(rank, step))
    p = rng.random((2, batch, 6))  # two LFP components, 6 candidate tokens
    if rank == 1 and step == 2:
        p[0, 1, 3] = np.nan
    kept = np.zeros_like(p, dtype=bool)
    for c in range(2):
        for b in range(batch):
            kept[c, b, np.argsort(-np.nan_to_num(p[c, b], nan=-1.0))[: 2 + (b + c) % 3]] = True
    return {"p": p, "kept": kept, "forced": rng.random((2, batch, 3)),
            "gamma": rng.normal(0, 0.2, (2, batch, 4)) + np.arange(batch)[None, :, None] * 0.1,
            "beta": rng.normal(0.1, 0.3, (2, batch, 4)),
            "logits": rng.normal(0, 1, (batch, 2)) + np.array(labels(rank, step))[:, None],
            "tokens": rng.normal(size=(batch, 3, 5))}


def _observers(session, group_names):
    kw = {"event_interval": 2, "detailed_interval": 2, "group_names": group_names}
    return [PruningObserver(session, ["layer_00", "layer_01"], margin_threshold=None, **kw),
            FiLMObserver(session, ["dino/layer_00", "siglip/layer_00"], **kw),
            MoERouterObserver(session, ["dino", "siglip"], **kw),
            AggregationObserver(session, ["dino"], **kw)]


def _feed(observers, rank: int, step: int) -> None:
    lfp, film, moe, aggr = observers
    x = {k: torch.as_tensor(v) for k, v in inputs(rank, step).items()}
    for c, name in enumerate(("layer_00", "layer_01")):
        lfp.observe(name, x["p"][c], x["kept"][c], x["forced"][c])
    for c, name in enumerate(("dino/layer_00", "siglip/layer_00")):
        film.observe(name, gamma=x["gamma"][c], beta=x["beta"][c])
    moe.observe_logits(x["logits"])
    aggr.observe("dino", 256, 64, x["logits"].shape[0], x["tokens"])


def groups_world(rank, world_size, run_dir):
    """The four generic observers with and without groups, on the same inputs (two
    sessions); returns collectives per step call of each and what set_groups raised."""
    counter = count_collectives()
    out = {"collectives": {}, "raised": []}
    try:
        for run_id, names in (("plain", None), ("grouped", GROUPS)):
            session = MonitorSession(run_dir, run_id, participation="all")
            observers = _observers(session, names)
            per_step = []
            for step in range(STEPS):
                ids = labels(rank, step)
                if names is not None:
                    given: object = ids if step % 2 == 0 else torch.tensor(ids)
                    if step == BAD_STEP and rank == BAD_RANK:
                        given = torch.tensor([7] + ids[1:])  # checked on its device
                    for obs in observers:
                        try:
                            obs.set_groups(given)
                        except ValueError as exc:  # step 1's bad ids: once, on every rank
                            out["raised"].append((step, obs.part, str(exc)))
                            obs.set_groups(given)
                _feed(observers, rank, step)
                before = counter["n"]
                for obs in observers:
                    obs.log_step(step)
                per_step.append(counter["n"] - before)
            before = counter["n"]
            for obs in observers:
                obs.finalize()
            per_step.append(counter["n"] - before)
            out["collectives"][run_id] = per_step
    finally:
        counter["restore"]()
    return out
