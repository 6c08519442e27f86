"""Every forward is counted under its own step, in the seed's and the public script's order.

``log_step(s)`` comes after the forward (and backward) it labels; under gradient
accumulation it repeats ``s`` once per micro-batch. The record labelled ``s`` must hold
exactly the micro-batches of the steps since the previous record, the first included.
"""

from __future__ import annotations

import pytest
import torch
from tree import tree

from monitor import MonitorSession
from monitor.pruning import MoERouterObserver, PruningObserver
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

BATCH, STEPS = 1, 4
MODEL_CFG = TinyCogVLAConfig(image_size=16)


@pytest.fixture(scope="module")
def model():
    return build_tiny_cogvla(MODEL_CFG, seed=0)


def expected_labels(interval: int) -> list[int]:
    due = [s for s in range(STEPS) if s % interval == 0]
    return due + ([STEPS - 1] if due[-1] != STEPS - 1 else [])  # finalize writes the rest


def steps_per_record(labels: list[int]) -> list[int]:
    return [b - a for a, b in zip([-1] + labels, labels)]


def fork_loop(model, tmp_path, accumulation: int, interval: int, wandb_log_freq: int = 1):
    """vla-scripts/finetune.py's calls in its order: forward, backward, the train context
    on every micro-batch of a logged step, then log_step on each observer, then the
    get_summary() export. Returns what get_summary() said after each micro-batch."""
    mon = CogVLAMonitoring(run_dir=tmp_path / "r", run_id="r", cfg=CogVLAMonitoringConfig(
        monitor_log_interval=interval, detailed_log_interval=interval,
        pruning_event_log_interval=interval, film_sample_layers=[0, 9, 18, 26],
        console=False))
    mon.attach(model)
    observers = [mon.lfp_observer, mon.film_observer, mon.moe_observer, mon.aggr_observer]
    gen = torch.Generator().manual_seed(0)
    seen = []
    for batch_idx in range(STEPS * accumulation):
        out = model(**synthetic_batch(MODEL_CFG, batch_size=BATCH, generator=gen))
        (out.loss / accumulation).backward()
        log_step = batch_idx // accumulation
        if log_step % wandb_log_freq == 0:
            with mon.train_monitor.step(log_step, mode="train") as h:
                h.log(loss=out.loss.detach(), lr=1e-3)
        for observer in observers:
            observer.log_step(log_step)
        seen.append((log_step, mon.moe_observer.last_step))
    model.zero_grad(set_to_none=True)
    mon.finalize()
    return tmp_path / "r", seen


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("interval", [1, 2])
def test_each_record_holds_exactly_the_micro_batches_of_its_steps_in_the_forks_order(
        model, tmp_path, accumulation, interval):
    run, seen = fork_loop(model, tmp_path, accumulation, interval)
    labels = expected_labels(interval)
    forwards = [n * accumulation for n in steps_per_record(labels)]
    images = MODEL_CFG.num_images_in_input
    moe = [r for r in tree(run, "r").records("moe") if "metrics" in r]
    assert [r["step"] for r in moe] == labels
    # one (dino, siglip) weight pair per sample per image per forward
    assert [r["metrics"]["dino_weight"]["count"] for r in moe] == [
        f * BATCH * images for f in forwards]
    lfp = tree(run, "r").records("lfp")
    assert [r["step"] for r in lfp] == labels
    # one router call per LFP layer per forward, one tokens_before value per sample
    assert [r["metrics"]["layer_08/tokens_before"]["count"] for r in lfp] == [
        f * BATCH for f in forwards]
    assert [r["metrics"]["overall/tokens_before"]["count"] for r in lfp] == [
        f * BATCH * 24 for f in forwards]
    film = tree(run, "r").records("film")
    assert [r["metrics"]["siglip/layer_26/gamma_norm"]["count"] for r in film] == [
        f * BATCH * images for f in forwards]
    aggr = tree(run, "r").records("aggr")
    assert [r["metrics"]["dino/compression_ratio"]["count"] for r in aggr] == [
        f * BATCH * images for f in forwards]
    detailed = tree(run, "r").detailed("lfp")
    assert [r["step"] for r in detailed] == labels
    hist = [r["histograms"]["layer_08/p_keep"] for r in detailed]
    visual = 2 * MODEL_CFG.num_vision_aggr
    assert [sum(h["counts"]) + h["below"] + h["above"] + h["nonfinite"] for h in hist] == [
        f * BATCH * visual for f in forwards]
    train = tree(run, "r").records()
    assert [r["step"] for r in train] == labels
    assert [r["metrics"]["loss"]["count"] for r in train] == forwards
    # get_summary() after log_step(s) reflects the last record written: that of the due
    # step before s (written by the first call of s), or s's own once the run has shown
    # it does not accumulate (written at the exit of s's train context); never s's while
    # micro-batches of s may go on
    for step, last in seen:
        earlier = [lab for lab in labels if lab < step]
        allowed = ({earlier[-1]} if earlier else {None}) | (
            {step} if accumulation == 1 and step > 0 else set())
        assert last in allowed, (step, last)


def test_a_sparse_train_context_does_not_move_forwards_between_records(model, tmp_path):
    """The script logs training metrics every other step (wandb_log_freq=2): the train
    context's own flush at its exit (no accumulation) writes the observers' record of
    that step with exactly its forward."""
    run, _ = fork_loop(model, tmp_path, accumulation=1, interval=1, wandb_log_freq=2)
    moe = tree(run, "r").records("moe")
    assert [(r["step"], r["metrics"]["dino_weight"]["count"]) for r in moe] == [
        (s, BATCH * MODEL_CFG.num_images_in_input) for s in range(STEPS)]
    train = tree(run, "r").records()
    assert [(r["step"], r["metrics"]["loss"]["count"]) for r in train] == [(0, 1), (2, 1)]


def feed(moe: MoERouterObserver, lfp: PruningObserver, value: float) -> None:
    """One 'forward': one MoE call and one (deferred) routing call, both marked by value."""
    moe.observe_logits(torch.tensor([[value, 0.0]]))
    p = torch.full((1, 4), value, dtype=torch.float64)
    lfp.observe("layer_00", p, torch.tensor([[True, True, False, False]]))


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_log_step_labels_the_values_since_the_previous_call(tmp_path, accumulation):
    """Observers fed directly (the routing observer defers its work until a drain)."""
    session = MonitorSession(tmp_path / "r", "r")
    moe = MoERouterObserver(session, ["dino", "siglip"], event_interval=3,
                            detailed_interval=100)
    lfp = PruningObserver(session, ["layer_00"], event_interval=3, detailed_interval=100)
    for step in range(8):
        for _ in range(accumulation):
            feed(moe, lfp, value=float(step) / 10)
            moe.log_step(step)
            lfp.log_step(step)
    moe.finalize()
    lfp.finalize()
    want = [(0, [0]), (3, [1, 2, 3]), (6, [4, 5, 6]), (7, [7])]
    for part in ("moe", "lfp"):
        key = "entropy" if part == "moe" else "layer_00/p_keep"
        recs = tree(tmp_path / "r", "r").records(part)
        assert [r["step"] for r in recs] == [s for s, _ in want], part
        for rec, (_, steps) in zip(recs, want):
            per = 1 if part == "moe" else 4
            m = rec["metrics"][key]
            assert m["count"] == per * accumulation * len(steps), (part, rec["step"])
            if part == "lfp":
                assert m["min"] == pytest.approx(min(steps) / 10)
                assert m["max"] == pytest.approx(max(steps) / 10)


def test_repeated_calls_at_a_due_step_fold_without_a_kernel_when_nothing_ran(tmp_path):
    """The fork calls log_step once per observer: the repeats find nothing to fold."""
    session = MonitorSession(tmp_path / "r", "r")
    moe = MoERouterObserver(session, ["dino", "siglip"], event_interval=1)
    moe.observe_logits(torch.zeros(2, 2))
    moe.log_step(0)
    assert moe.events.slots.is_split
    moe.observe_logits(torch.zeros(2, 2))
    moe.log_step(0)  # folds the second forward into step 0
    assert not moe.events.slots._next_dirty
    moe.log_step(0)  # nothing new: no fold
    moe.log_step(1)  # writes record 0
    moe.finalize()
    recs = tree(tmp_path / "r", "r").records("moe")
    assert [(r["step"], r["metrics"]["entropy"]["count"]) for r in recs] == [(0, 4)]
