"""PruningObserver (LFP token routing), in one process (no process group), against
float64 numpy references.

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
    DETAILED_LABELS,
    EVENT_LABELS,
    PRUNING_METRICS,
    STEPS,
    bf16_round,
    binary_entropy_bits,
    check_record,
    empty,
    hist_reference,
    jaccard,
    margins,
    new_session,
    plain_records,
    pruning_expected,
    pruning_inputs,
    with_overall,
)
from reference import assert_matches, bucket_of, reference_stats
from workers import read_jsonl

from monitor.pruning import (
    PruningObserver,
)

# -- PruningObserver ----------------------------------------------------------------------


def test_pruning_compact_records_hold_exactly_the_values_fed_since_the_previous_record(
        tmp_path):
    rng = np.random.default_rng(11)
    comps = ["layer_02", "layer_08"]
    obs = PruningObserver(new_session(tmp_path), comps, event_interval=2, detailed_interval=4)
    want = defaultdict(lambda: defaultdict(list))
    for step in STEPS:
        label = bucket_of(step, EVENT_LABELS)
        for c in comps:
            p, kept, forced = pruning_inputs(rng, 3 + step % 3, 9, 2)
            obs.observe(c, torch.from_numpy(p), torch.from_numpy(kept), torch.from_numpy(forced))
            for key, values in pruning_expected(c, p, kept, forced).items():
                want[label][key].append(values)
        obs.log_step(step)
    obs.finalize()
    recs = plain_records(obs.jsonl_path)
    assert [r["step"] for r in recs] == EVENT_LABELS
    for rec in recs:
        check_record(rec["metrics"], with_overall(want[rec["step"]], comps, PRUNING_METRICS))


def test_pruning_bfloat16_keep_probabilities_are_summarised_as_the_values_they_hold(tmp_path):
    rng = np.random.default_rng(12)
    obs = PruningObserver(new_session(tmp_path), ["l0"], event_interval=1)
    p, kept, forced = pruning_inputs(rng, 5, 16, 3)
    p_t, p64 = bf16_round(p)
    f_t, f64 = bf16_round(forced)
    obs.observe("l0", p_t, torch.from_numpy(kept), f_t)
    obs.log_step(0)
    obs.finalize()
    (rec,) = plain_records(obs.jsonl_path)
    check_record(rec["metrics"], with_overall(
        {k: [v] for k, v in pruning_expected("l0", p64, kept, f64).items()},
        ["l0"], PRUNING_METRICS))
    # the rounding is visible: float32 values would not give these moments
    assert rec["metrics"]["l0/p_keep"]["mean"] != pytest.approx(p.astype(np.float64).mean(),
                                                                rel=1e-9, abs=0)


def test_pruning_margin_counts_only_samples_with_kept_and_dropped_tokens(tmp_path):
    obs = PruningObserver(new_session(tmp_path), ["l0"], event_interval=1)
    p = np.array([[0.9, 0.8, 0.1, 0.2],    # all kept: no margin
                  [0.3, 0.4, 0.6, 0.7],    # none kept: no margin
                  [0.9, 0.6, 0.5, 0.1],    # kept {0.9, 0.6}, dropped {0.5, 0.1}: 0.1
                  [0.2, 0.7, 0.75, 0.4]])  # kept {0.2, 0.75}, dropped {0.7, 0.4}: -0.5
    kept = np.array([[True] * 4, [False] * 4, [True, True, False, False],
                     [True, False, True, False]])
    obs.observe("l0", torch.from_numpy(p), torch.from_numpy(kept))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    assert_matches(m["l0/margin"], reference_stats([[0.6 - 0.5, 0.2 - 0.7]]))
    assert m["l0/margin"]["count"] == 2 and m["l0/margin"]["nonfinite"] == 0
    assert_matches(m["l0/tokens_after"], reference_stats([[4, 0, 2, 2]]))
    assert_matches(m["l0/keep_ratio"], reference_stats([[1.0, 0.0, 0.5, 0.5]]))
    assert_matches(m["l0/tokens_before"], reference_stats([[4, 4, 4, 4]]))
    assert "l0/forced_p_keep" not in m  # nothing force-kept was fed


def test_pruning_a_batch_of_only_all_kept_or_none_kept_samples_has_an_empty_margin(tmp_path):
    obs = PruningObserver(new_session(tmp_path), ["l0"], event_interval=1)
    p = torch.tensor([[0.5, 0.25], [0.75, 0.125]], dtype=torch.float32)
    obs.observe("l0", p, torch.tensor([[True, True], [False, False]]))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    assert "l0/margin" not in m and "overall/margin" not in m
    assert obs.get_summary()["by_component"]["l0"]["margin"] == empty()


def test_pruning_p_keep_entropy_is_binary_entropy_in_bits_with_zero_at_certainty(tmp_path):
    obs = PruningObserver(new_session(tmp_path), ["l0"], event_interval=1)
    p = np.array([[0.0, 1.0, 0.5, 0.25], [0.125, 0.875, 1.0, 0.0]])
    obs.observe("l0", torch.from_numpy(p), torch.from_numpy(p > 0.4))
    obs.log_step(0)
    obs.finalize()
    got = plain_records(obs.jsonl_path)[0]["metrics"]["l0/p_keep_entropy"]
    def h(q):
        return -(q * math.log2(q) + (1 - q) * math.log2(1 - q))

    by_hand = [0.0, 0.0, 1.0, h(0.25), h(0.125), h(0.875), 0.0, 0.0]
    assert_matches(got, reference_stats([by_hand]))
    assert_matches(got, reference_stats([binary_entropy_bits(p)]))
    assert got["min"] == 0.0 and got["max"] == 1.0


def test_pruning_forced_p_keep_leaves_out_entries_marked_invalid(tmp_path):
    rng = np.random.default_rng(13)
    obs = PruningObserver(new_session(tmp_path), ["l0"], event_interval=1)
    forced = rng.random((4, 6)).astype(np.float32)
    valid = rng.random((4, 6)) < 0.6
    valid[0, 0], valid[0, 1], valid[1, 0] = False, False, True
    forced[0, 0] = np.nan  # padding: invalid, so neither a sample nor a non-finite one
    forced[0, 1] = 50.0    # invalid outlier: must not reach max
    forced[1, 0] = np.inf  # a valid non-finite value
    p, kept, _ = pruning_inputs(rng, 4, 5, 1)
    obs.observe("l0", torch.from_numpy(p), torch.from_numpy(kept), torch.from_numpy(forced),
                torch.from_numpy(valid))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    want = reference_stats([forced.astype(np.float64)[valid]])
    assert want["nonfinite"] == 1 and want["count"] == int(valid.sum()) - 1
    assert_matches(m["l0/forced_p_keep"], want)
    assert_matches(m["overall/forced_p_keep"], want)


def test_pruning_nonfinite_keep_probabilities_are_counted_and_kept_out_of_the_moments(
        tmp_path):
    rng = np.random.default_rng(14)
    obs = PruningObserver(new_session(tmp_path), ["l0"], event_interval=1,
                          detailed_interval=1)
    p = rng.random((4, 6))
    p[3, 2], p[3, 4], p[2, 1] = np.nan, np.inf, -np.inf
    kept = np.zeros((4, 6), dtype=bool)
    kept[:, :3] = True
    obs.observe("l0", torch.from_numpy(p), torch.from_numpy(kept))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    assert_matches(m["l0/p_keep"], reference_stats([p]))
    assert m["l0/p_keep"]["nonfinite"] == 3 and m["l0/p_keep"]["count"] == 21
    assert_matches(m["l0/p_keep_entropy"], reference_stats([binary_entropy_bits(p)]))
    assert m["l0/p_keep_entropy"]["nonfinite"] == 3
    # samples 2 and 3 hold a non-finite probability among the candidates their cut compares
    assert_matches(m["l0/margin"], reference_stats([margins(p, kept)]))
    assert m["l0/margin"]["count"] + m["l0/margin"]["nonfinite"] == 4
    assert_matches(m["l0/tokens_after"], reference_stats([[3, 3, 3, 3]]))
    hist = read_jsonl(obs.detailed_path)[0]["histograms"]["l0/p_keep"]
    assert hist == hist_reference([p], [i / 20 for i in range(21)])
    assert hist["nonfinite"] == 3


def test_pruning_p_keep_histogram_counts_half_open_bins_with_below_above_and_nonfinite(
        tmp_path):
    rng = np.random.default_rng(15)
    edges = [0.1, 0.25, 0.5, 0.75, 0.9]
    obs = PruningObserver(new_session(tmp_path), ["a", "b"], event_interval=2,
                          detailed_interval=4, hist_edges=edges)
    exact = np.array([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, np.nan, 0.0999, 0.8999])
    want = defaultdict(lambda: defaultdict(list))
    for step in STEPS:
        label = bucket_of(step, DETAILED_LABELS)
        for c in ("a", "b"):
            p = rng.random((2, 10))
            if step in (0, 3) and c == "a":
                p[1] = exact  # values on edges go to the bin they open; 0.9 and up: above
            obs.observe(c, torch.from_numpy(p), torch.from_numpy(p > 0.5))
            want[label][c].append(p)
        obs.log_step(step)
    obs.finalize()
    recs = read_jsonl(obs.detailed_path)
    assert [r["step"] for r in recs] == DETAILED_LABELS
    for rec in recs:
        for c in ("a", "b"):
            assert rec["histograms"][f"{c}/p_keep"] == hist_reference(want[rec["step"]][c],
                                                                      edges)
    first = recs[0]["histograms"]["a/p_keep"]
    assert first["nonfinite"] == 1 and first["above"] >= 2 and first["below"] >= 2


def test_pruning_overlap_prev_is_the_jaccard_with_the_previous_component_of_the_same_forward(
        tmp_path):
    rng = np.random.default_rng(16)
    comps = ["l0", "l1", "l2"]
    obs = PruningObserver(new_session(tmp_path), comps, event_interval=2, detailed_interval=4)
    want = defaultdict(lambda: defaultdict(list))
    for step in STEPS:
        label = bucket_of(step, DETAILED_LABELS)
        # step 2's forward skips l1: l2 has no previous component in that forward;
        # step 3's ends at l1 and step 4's starts at l1: a new forward, no overlap for l1
        order = {2: ["l0", "l2"], 3: ["l0", "l1"], 4: ["l1", "l2"]}.get(step, comps)
        prev = None
        for c in order:
            p = rng.random((4, 8)).astype(np.float32)
            kept = rng.random((4, 8)) < 0.5
            kept[:, 0] = True  # never two empty sets (Jaccard undefined)
            obs.observe(c, torch.from_numpy(p), torch.from_numpy(kept))
            if prev is not None and comps.index(c) == comps.index(prev[0]) + 1:
                want[label][f"{c}/overlap_prev"].append(jaccard(kept, prev[1]))
            prev = (c, kept)
        obs.log_step(step)
    obs.finalize()
    recs = read_jsonl(obs.detailed_path)
    assert [r["step"] for r in recs] == DETAILED_LABELS
    for rec in recs:
        assert "l0/overlap_prev" not in rec["metrics"]
        check_record(rec["metrics"], want[rec["step"]])
        assert set(rec["histograms"]) == {f"{c}/p_keep" for c in comps}
    assert recs[1]["metrics"]["l1/overlap_prev"]["count"] == 2 * 4  # steps 1, 3; not 4
    assert recs[1]["metrics"]["l2/overlap_prev"]["count"] == 2 * 4  # steps 1, 4; not 2


def test_pruning_overlap_prev_is_one_for_identical_kept_sets_and_zero_for_disjoint_ones(
        tmp_path):
    obs = PruningObserver(new_session(tmp_path), ["l0", "l1"], event_interval=1,
                          detailed_interval=1)
    a = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]], dtype=bool)
    b = np.array([[1, 1, 0, 0], [0, 1, 0, 1], [0, 1, 1, 1]], dtype=bool)
    p = torch.full((3, 4), 0.5)
    obs.observe("l0", p, torch.from_numpy(a))
    obs.observe("l1", p, torch.from_numpy(b))
    obs.log_step(0)
    obs.finalize()
    got = read_jsonl(obs.detailed_path)[0]["metrics"]["l1/overlap_prev"]
    assert_matches(got, reference_stats([[1.0, 0.0, 2 / 4]]))


def test_pruning_summary_before_any_record_has_only_empty_value_objects(tmp_path):
    obs = PruningObserver(new_session(tmp_path), ["l0", "l1"], event_interval=2)
    s = obs.get_summary()
    assert s["step"] is None and set(s) == {"step", "overall", "by_component"}
    assert set(s["by_component"]) == {"l0", "l1"}
    for block in [s["overall"], *s["by_component"].values()]:
        assert block["count"] == 0
        assert set(block) == set(PRUNING_METRICS) | {"prune_ratio", "count"}
        for name in (*PRUNING_METRICS, "prune_ratio"):
            assert block[name] == empty(), name
    obs.finalize()


def test_pruning_summary_is_the_last_compact_record_with_prune_ratio_the_keep_ratio_object(
        tmp_path):
    rng = np.random.default_rng(17)
    comps = ["l0", "l1"]
    obs = PruningObserver(new_session(tmp_path), comps, event_interval=2, detailed_interval=4)
    want = defaultdict(lambda: defaultdict(list))
    for step in range(4):
        for c in comps:
            p, kept, forced = pruning_inputs(rng, 3, 6, 2)
            obs.observe(c, torch.from_numpy(p), torch.from_numpy(kept), torch.from_numpy(forced))
            for key, values in pruning_expected(c, p, kept, forced).items():
                want[bucket_of(step, [0, 2, 3])][key].append(values)
        obs.log_step(step)
    assert obs.get_summary()["step"] == 2  # record 2 (steps 1, 2) was written by log_step(3)
    obs.log_step(4)  # makes 4 due: its record (step 3's values) is written at finalize
    s = obs.get_summary()
    assert s["step"] == 2
    expected = with_overall(want[2], comps, PRUNING_METRICS)
    for prefix, block in [("overall", s["overall"])] + [(c, s["by_component"][c])
                                                        for c in comps]:
        for name in PRUNING_METRICS:
            assert_matches(block[name], reference_stats(expected[f"{prefix}/{name}"]))
        assert block["prune_ratio"] is block["keep_ratio"]
        assert block["count"] == block["keep_ratio"]["count"] == (12 if prefix == "overall" else 6)
    assert s["overall"]["keep_ratio"]["count"] == 2 * 3 * 2  # 2 steps x 2 layers x 3 samples
    obs.finalize()
    assert obs.get_summary()["step"] == 4
    summary = json.loads(obs.summary_path.read_text())
    assert summary["last"]["step"] == 4
    assert summary["last"]["overall"]["keep_ratio"] == obs.get_summary()["overall"]["keep_ratio"]
