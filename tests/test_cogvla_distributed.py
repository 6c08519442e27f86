"""CogVLA monitoring in real gloo worlds: the public script's calls, and observer reductions."""

from __future__ import annotations

import numpy as np
import pytest
from cogvla_workers import observers_that_differ, observers_world, public_script, rank_inputs
from harness import run_world
from reference import assert_matches, reference_stats
from tree import tree

pytestmark = pytest.mark.distributed

PARTS = ("lfp", "film", "moe", "aggr")


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_public_script_with_the_monitor_on_rank0_only_finishes_and_writes_every_stream(
        tmp_path, accumulation):
    run_dir = tmp_path / "cogvla"
    out = run_world(public_script, 2, tmp_path, timeout=150, run_dir=str(run_dir), steps=5,
                    grad_accumulation_steps=accumulation, monitor_ranks=(0,))
    assert out[1]["paths"] is None
    paths = out[0]["paths"]
    assert set(paths) == {"train", *PARTS}
    meta = tree(run_dir, "cogvla").meta()
    assert meta["participation"]["decision"] == "rank0_only"
    assert meta["parts"]["film"]["skipped"] == ["dino/layer_26"]
    train = tree(run_dir, "cogvla").records()
    assert [r["step"] for r in train] == [0, 2, 4]
    # rank 0 alone: one loss per train context, `accumulation` contexts per logged step
    # (every other step): each record holds exactly its step's, the first included
    counts = [r["metrics"]["loss"]["count"] for r in train]
    assert counts == [accumulation] * 3
    for part in PARTS:
        events = tree(run_dir, "cogvla").records(part)
        assert [r["step"] for r in events] == [0, 2, 4], part
        assert tree(run_dir, "cogvla").detailed(part), part
        summary = tree(run_dir, "cogvla").summary(part)
        assert summary["status"] == "completed"
    exported = out[0]["exported"]
    assert len(exported) == 3 * accumulation
    last = exported[-1]
    for key in ("monitor/lfp/pruned_percent", "monitor/film/modulation_strength",
                "monitor/moe/dino_weight", "monitor/aggr/compression_ratio"):
        assert isinstance(last[key], float), key
    assert 0.0 < last["monitor/lfp/pruned_percent"] < 1.0


@pytest.mark.slow
def test_public_script_with_the_monitor_on_every_rank_reduces_both_ranks(tmp_path):
    run_dir = tmp_path / "cogvla"
    out = run_world(public_script, 2, tmp_path, timeout=150, run_dir=str(run_dir), steps=3,
                    grad_accumulation_steps=1, monitor_ranks=(0, 1))
    assert out[0]["paths"]["lfp"].endswith(tree(run_dir, "cogvla").layout.summary("lfp"))
    assert not (tmp_path / "rank1").exists()
    meta = tree(run_dir, "cogvla").meta()
    assert meta["participation"]["decision"] == "all_ranks"
    train = tree(run_dir, "cogvla").records()
    assert [r["metrics"]["loss"]["count"] for r in train] == [2, 2]  # steps 0 and 2
    moe = tree(run_dir, "cogvla").records("moe")
    # 2 ranks x 2 images x batch 2 per forward; the record at step 0 holds one forward
    assert moe[0]["metrics"]["dino_weight"]["count"] == 8
    # Steps 0 and 2 are due for the train monitor and all four observers' compact
    # streams (step 0 for the detailed ones too): one fused reduction each. Step 0's is
    # made at step 1's first call (step 0 could have had more micro-batches); step 2's at
    # its train context's exit, the run having shown it does not accumulate; finalize
    # reduces what step 2's context left in one more.
    for rank_out in out:
        assert rank_out["collectives"] == [0, 3, 2, 2]  # 2 once the capacity is known


def _reference(world_size, steps, calls, labels):
    """numpy statistics of what every rank fed, bucketed by record label."""
    buckets = {}
    for rank in range(world_size):
        for step in range(steps):
            label = next(lab for lab in labels if lab >= step)
            b = buckets.setdefault(label, {})
            for call in range(calls):
                x = rank_inputs(rank, step, call)
                p, kept = x["p"], x["kept"]
                b.setdefault("p", []).append(p)
                b.setdefault("keep_ratio", []).append(kept.sum(1) / p.shape[1])
                low = np.where(kept, p, np.inf).min(1)
                high = np.where(kept, -np.inf, p).max(1)
                b.setdefault("margin", []).append(low - high)  # NaN p: a NaN margin
                b.setdefault("forced", []).append(x["forced"])
                b.setdefault("gamma_norm", []).append(np.linalg.norm(x["gamma"], axis=1))
                strength = np.sqrt((x["gamma"] ** 2).mean(1) + (x["beta"] ** 2).mean(1))
                b.setdefault("strength", []).append(strength)
                w = np.exp(x["logits"]) / np.exp(x["logits"]).sum(1, keepdims=True)
                b.setdefault("dino", []).append(w[:, 0])
                b.setdefault("ratio", []).append(np.full(x["batch"], 64.0))
    return {label: {k: reference_stats(v) for k, v in b.items()} for label, b in buckets.items()}


@pytest.mark.parametrize("world_size", [2, 3])
def test_observer_streams_reduced_over_ranks_equal_numpy_over_every_ranks_inputs(
        tmp_path, world_size):
    steps, calls = 6, 2
    run_dir = tmp_path / "obs"
    out = run_world(observers_world, world_size, tmp_path, timeout=90, run_dir=str(run_dir),
                    steps=steps, calls_per_step=calls)
    labels = [0, 2, 4, 5]
    want = _reference(world_size, steps, calls, labels)
    lfp = tree(run_dir, "obs").metric_records("lfp")
    assert [r["step"] for r in lfp] == labels
    for rec in lfp:
        w, m = want[rec["step"]], rec["metrics"]
        assert rec["world_size"] == world_size
        assert_matches(m["layer_00/p_keep"], w["p"])
        assert_matches(m["layer_00/keep_ratio"], w["keep_ratio"])
        assert_matches(m["layer_00/forced_p_keep"], w["forced"])
        assert_matches(m["layer_00/margin"], w["margin"])
        # layer_01 saw the same tokens in another order: same statistics
        assert_matches(m["layer_01/p_keep"], w["p"])
        both = {"mean": w["p"]["mean"], "std": w["p"]["std"], "min": w["p"]["min"],
                "max": w["p"]["max"], "count": 2 * w["p"]["count"],
                "nonfinite": 2 * w["p"]["nonfinite"]}
        assert_matches(m["overall/p_keep"], both)
    film = tree(run_dir, "obs").metric_records("film")
    moe = tree(run_dir, "obs").metric_records("moe")
    aggr = tree(run_dir, "obs").metric_records("aggr")
    for f, mo, ag in zip(film, moe, aggr):
        w = want[f["step"]]
        assert_matches(f["metrics"]["dino/layer_00/gamma_norm"], w["gamma_norm"])
        assert_matches(f["metrics"]["dino/layer_00/modulation_strength"], w["strength"])
        assert_matches(mo["metrics"]["dino_weight"], w["dino"])
        assert_matches(ag["metrics"]["dino/compression_ratio"], w["ratio"])
    detailed = tree(run_dir, "obs").detailed("lfp")
    assert [r["step"] for r in detailed] == [0, 4, 5]
    total = sum(sum(r["histograms"]["layer_00/p_keep"]["counts"])
                + r["histograms"]["layer_00/p_keep"]["nonfinite"] for r in detailed)
    assert total == sum(want[lab]["p"]["count"] + want[lab]["p"]["nonfinite"] for lab in labels)
    for rank_out in out:
        # one fused reduction when anything is due, else none: 3 collectives at the first
        # flush, 2 after it
        assert rank_out["per_step"][:-1] == [0, 3, 0, 2, 0, 2]


def test_ranks_that_declared_different_components_reduce_the_union_without_a_hang(tmp_path):
    run_dir = tmp_path / "diff"
    out = run_world(observers_that_differ, 2, tmp_path, timeout=60, run_dir=str(run_dir))
    recs = tree(run_dir, "diff").records("lfp")
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    for rec in recs:
        m = rec["metrics"]
        assert m["layer_00/p_keep"]["count"] == 16 and m["layer_00/p_keep"]["mean"] == 0.375
        assert m["layer_01/p_keep"]["count"] == 8 and m["layer_01/p_keep"]["mean"] == 0.5
    for rank_out in out:
        assert rank_out["per_step"] == [0, 3, 3, 3, 3]  # the last: finalize
