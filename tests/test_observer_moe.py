"""MoERouterObserver, in one process (no process group), against float64 numpy references.

Every statistic is recomputed with numpy from the same random inputs fed to the observer and
compared with what the observer wrote to its JSONL files and returns from ``get_summary()``
(see ``observer_helpers`` for the labels and references).
"""

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from observer_helpers import (
    EVENT_LABELS,
    STEPS,
    bf16_round,
    check_record,
    hist_reference,
    new_session,
    plain_records,
    softmax64,
)
from reference import assert_matches, bucket_of, reference_stats
from workers import read_jsonl

from monitor.pruning import (
    MoERouterObserver,
)

# -- MoERouterObserver --------------------------------------------------------------------


def moe_expected(experts, w):
    out = {}
    for e, name in enumerate(experts):
        out[f"{name}_weight"] = w[:, e]
    first_max = np.array([next(i for i in range(w.shape[1]) if row[i] == row.max())
                          for row in w])
    for e, name in enumerate(experts):
        out[f"{name}_dominant"] = (first_max == e).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["entropy"] = -np.where(w > 0, w * np.log(w), 0.0).sum(axis=1)
    return out


def test_moe_weights_dominant_share_and_entropy_match_a_float64_softmax_of_the_logits(
        tmp_path):
    rng = np.random.default_rng(31)
    experts = ["dino", "siglip", "clip"]
    obs = MoERouterObserver(new_session(tmp_path), experts, event_interval=2,
                            detailed_interval=4)
    want = defaultdict(lambda: defaultdict(list))
    for step in STEPS:
        logits = rng.normal(0.0, 2.0, (5, 3)).astype(np.float32)
        if step % 2:
            t, logits64 = bf16_round(logits)
        else:
            t, logits64 = torch.from_numpy(logits), logits.astype(np.float64)
        obs.observe_logits(t)
        for key, v in moe_expected(experts, softmax64(logits64)).items():
            want[bucket_of(step, EVENT_LABELS)][key].append(v)
        obs.log_step(step)
    obs.finalize()
    recs = plain_records(obs.jsonl_path)
    assert [r["step"] for r in recs] == EVENT_LABELS
    for rec in recs:
        check_record(rec["metrics"], want[rec["step"]])
        assert 0.0 <= rec["metrics"]["entropy"]["max"] <= math.log(3)
    s = obs.get_summary()
    assert s["step"] == 5 and s["alerts"] == []
    assert_matches(s["clip_dominant"], reference_stats(want[5]["clip_dominant"]))


def test_moe_logits_with_leading_dims_are_routed_per_row(tmp_path):
    rng = np.random.default_rng(32)
    obs = MoERouterObserver(new_session(tmp_path), ["a", "b"], event_interval=1)
    logits = rng.normal(size=(2, 3, 2))
    obs.observe_logits(torch.from_numpy(logits))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    check_record(m, {k: [v] for k, v in moe_expected(["a", "b"],
                                                     softmax64(logits.reshape(6, 2))).items()})


def test_repeated_steps_of_gradient_accumulation_feed_the_record_of_that_step(tmp_path):
    rng = np.random.default_rng(34)
    obs = MoERouterObserver(new_session(tmp_path), ["a", "b"], event_interval=2)
    labels = [0, 2, 4, 5]
    want = defaultdict(list)
    for step in STEPS:
        for _ in range(3):  # three micro-batches per optimizer step
            w = rng.dirichlet([1.0, 1.0], size=2)
            obs.observe_weights(torch.from_numpy(w))
            want[bucket_of(step, labels)].append(w[:, 0])
            obs.log_step(step)
        if step == 2:
            assert plain_records(obs.jsonl_path)[-1]["step"] == 0  # 2 waits for step 3
    obs.finalize()
    recs = plain_records(obs.jsonl_path)
    assert [r["step"] for r in recs] == labels
    for rec in recs:
        assert_matches(rec["metrics"]["a_weight"], reference_stats(want[rec["step"]]))
    assert [r["metrics"]["a_weight"]["count"] for r in recs] == [6, 12, 12, 6]


def test_moe_a_row_of_nan_weights_counts_as_no_experts_dominance(tmp_path):
    obs = MoERouterObserver(new_session(tmp_path), ["dino", "siglip"], event_interval=1)
    obs.observe_logits(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    assert m["dino_weight"]["count"] == 1 and m["dino_weight"]["nonfinite"] == 1
    assert (m["dino_dominant"]["count"], m["dino_dominant"]["mean"]) == (1, 0.0)
    assert (m["siglip_dominant"]["count"], m["siglip_dominant"]["mean"]) == (1, 1.0)


def test_moe_dominant_ties_go_to_the_first_expert(tmp_path):
    obs = MoERouterObserver(new_session(tmp_path), ["a", "b", "c"], event_interval=1)
    w = np.array([[0.4, 0.4, 0.2], [0.25, 0.375, 0.375], [1 / 3, 1 / 3, 1 / 3],
                  [0.0, 0.5, 0.5], [0.1, 0.2, 0.7]])
    obs.observe_weights(torch.from_numpy(w))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    assert_matches(m["a_dominant"], reference_stats([[1, 0, 1, 0, 0]]))
    assert_matches(m["b_dominant"], reference_stats([[0, 1, 0, 1, 0]]))
    assert_matches(m["c_dominant"], reference_stats([[0, 0, 0, 0, 1]]))
    assert_matches(m["entropy"], reference_stats([moe_expected(["a", "b", "c"], w)["entropy"]]))
    assert m["entropy"]["max"] == pytest.approx(math.log(3), rel=1e-12)


def test_moe_weight_histograms_count_each_experts_weights(tmp_path):
    rng = np.random.default_rng(33)
    edges = [0.0, 0.2, 0.5, 0.8, 1.0]
    obs = MoERouterObserver(new_session(tmp_path), ["a", "b"], event_interval=2,
                            detailed_interval=4, hist_edges=edges)
    want = defaultdict(list)
    labels = [0, 4, 6]  # step 5 is no label here: it belongs to the record at finalize
    for step in STEPS:
        logits = rng.normal(0, 3, (4, 2))
        obs.observe_logits(torch.from_numpy(logits))
        want[bucket_of(step, labels)].append(softmax64(logits))
        obs.log_step(step)
    obs.observe_weights(torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64))
    want[6].append(np.array([[0.5, 0.5], [1.0, 0.0]]))
    obs.log_step(6)
    obs.finalize()
    recs = read_jsonl(obs.detailed_path)
    assert [r["step"] for r in recs] == labels
    for rec in recs:
        assert set(rec["histograms"]) == {"a_weight", "b_weight"}
        for e, name in enumerate(["a", "b"]):
            assert rec["histograms"][f"{name}_weight"] == hist_reference(
                [w[:, e] for w in want[rec["step"]]], edges)
    assert recs[-1]["histograms"]["a_weight"]["above"] == 1  # 1.0 is at the last edge


def test_moe_collapse_alert_fires_once_after_patience_records_and_rearms_below_threshold(
        tmp_path):
    obs = MoERouterObserver(new_session(tmp_path), ["dino", "siglip"], collapse_threshold=0.9,
                            collapse_patience=2, event_interval=2, detailed_interval=100)
    # dino's mean weight per compact record (labels 0, 2, 4, ...); 0.9 itself is not above
    per_record = [0.95, 0.5, 0.95, 0.95, 0.95, 0.95, 0.9, 0.95, 0.97, 0.96, 0.05, 0.02, 0.5]
    labels = [0] + [2 * i for i in range(1, len(per_record))]
    steps = list(range(labels[-1] + 1))
    for step in steps:
        w = per_record[labels.index(bucket_of(step, labels))]
        obs.observe_weights(torch.tensor([[w, 1 - w]] * 3, dtype=torch.float64))
        obs.log_step(step)
    obs.finalize()
    lines = read_jsonl(obs.jsonl_path)
    # runs above 0.9: records 2-5 (alert at the 2nd: label 6), 7-9 (alert at label 16);
    # siglip is above at records 10-11 (alert at label 22)
    alerts = [(r["step"], r["alert"]["expert"]) for r in lines if "alert" in r]
    assert alerts == [(6, "dino"), (16, "dino"), (22, "siglip")]
    # each alert follows the compact record that raised it
    for i, line in enumerate(lines):
        if "alert" in line:
            assert lines[i - 1]["step"] == line["step"] and "metrics" in lines[i - 1]
            assert set(line) == {"step", "time", "world_size", "alert"}
            assert line["world_size"] == 1 and line["time"] > 0
    first = next(r for r in lines if "alert" in r)["alert"]
    assert first == {"type": "expert_collapse", "expert": "dino",
                     "mean_weight": pytest.approx(0.95, rel=1e-12), "threshold": 0.9,
                     "consecutive_records": 2}
    assert [r["step"] for r in lines if "alert" not in r] == labels
    summary = json.loads(obs.summary_path.read_text())
    assert [a["alert"] for a in summary["alerts"]] == [r["alert"] for r in lines if "alert" in r]
    assert obs.get_summary()["alerts"] == [r["alert"] for r in lines if "alert" in r]
    assert summary["last"]["alerts"] == obs.get_summary()["alerts"]


def test_moe_collapse_alert_needs_patience_records_in_a_row(tmp_path):
    obs = MoERouterObserver(new_session(tmp_path), ["a", "b"], collapse_threshold=0.8,
                            collapse_patience=3, event_interval=1)
    for step, w in enumerate([0.9, 0.9, 0.1, 0.9, 0.9, 0.5, 0.85, 0.85]):
        obs.log_step(step)
        obs.observe_weights(torch.tensor([[w, 1 - w]], dtype=torch.float64))
    obs.finalize()
    assert obs.alerts == [] and obs.get_summary()["alerts"] == []
    assert not any("alert" in r for r in read_jsonl(obs.jsonl_path))


@pytest.mark.parametrize("kwargs", [
    {"collapse_threshold": 0.0}, {"collapse_threshold": 1.0}, {"collapse_threshold": -0.5},
    {"collapse_threshold": 1.5}, {"collapse_threshold": float("nan")},
    {"collapse_patience": 0}, {"collapse_patience": -2}, {"collapse_patience": True},
    {"collapse_patience": 2.0}, {"collapse_patience": "3"},
    {"experts": ["dino"]}, {"experts": []}, {"experts": ["a", "b", "a"]},
])
def test_moe_bad_constructor_arguments_raise_value_error(tmp_path, kwargs):
    with pytest.raises(ValueError):
        MoERouterObserver(new_session(tmp_path), **kwargs)


def test_moe_weights_of_the_wrong_number_of_experts_raise_value_error(tmp_path):
    obs = MoERouterObserver(new_session(tmp_path), ["a", "b"], event_interval=1)
    obs.log_step(0)
    with pytest.raises(ValueError, match="expected 2 experts"):
        obs.observe_weights(torch.full((4, 3), 1 / 3))
    obs.finalize()
    assert read_jsonl(obs.jsonl_path) == []


def test_moe_a_rejected_construction_leaves_the_session_free_for_a_valid_one(tmp_path):
    session = new_session(tmp_path)
    with pytest.raises(ValueError):
        MoERouterObserver(session, collapse_threshold=2.0)
    obs = MoERouterObserver(session)
    obs.finalize()
