"""The generic observers in one process (no process group) against float64 numpy references.

Every statistic is recomputed here with numpy from the same random inputs that were fed to
the observer, then compared with what the observer wrote to its JSONL files and returns from
``get_summary()``. Records are labelled by step: with steps 0, 1, 2, ... and interval 2 the
labels are 0, 2, 4, ... (plus the last step at finalize), and a record labelled ``s`` holds
exactly the values fed after the previous record's step and up to ``s``.
"""

import json
import math
from collections import defaultdict
from itertools import pairwise

import numpy as np
import pytest
import torch
from reference import assert_matches, bucket_of, reference_stats
from workers import read_jsonl

from monitor.pruning import (
    AggregationObserver,
    FiLMObserver,
    MoERouterObserver,
    PruningObserver,
)
from monitor.session import MonitorSession

PRUNING_METRICS = ("tokens_before", "tokens_after", "keep_ratio", "margin", "p_keep",
                   "p_keep_entropy", "forced_p_keep")
FILM_METRICS = ("gamma", "beta", "gamma_norm", "beta_norm", "modulation_strength")
FILM_OVERALL = ("gamma_norm", "beta_norm", "modulation_strength")
AGGR_METRICS = ("tokens_in", "tokens_out", "compression_ratio")
VALUE_KEYS = {"mean", "std", "min", "max", "count", "nonfinite", "min_rank", "max_rank"}

# steps 0..5: compact records every 2 steps, detailed every 4, the rest at finalize
STEPS = range(6)
EVENT_LABELS = [0, 2, 4, 5]
DETAILED_LABELS = [0, 4, 5]


def new_session(tmp_path, name="run"):
    return MonitorSession(tmp_path / name, "r")


def plain_records(path):
    return [r for r in read_jsonl(path) if "alert" not in r]


def value_keys(value):
    return VALUE_KEYS | ({"nonfinite_ranks"} if value["nonfinite"] else set())


def empty():
    return {"mean": None, "std": None, "min": None, "max": None, "count": 0, "nonfinite": 0,
            "min_rank": None, "max_rank": None}


def bf16_round(x: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """A bfloat16 tensor of ``x`` and the float64 values it really holds."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t, t.to(torch.float64).numpy()


def check_record(metrics: dict, expected: dict[str, list]) -> None:
    """``metrics`` holds exactly the keys of ``expected``, each matching numpy."""
    assert set(metrics) == set(expected)
    for key, arrays in expected.items():
        assert set(metrics[key]) == value_keys(metrics[key]), key
        assert_matches(metrics[key], reference_stats(arrays))


def with_overall(per_key: dict[str, list], components, metrics) -> dict[str, list]:
    """Add ``overall/{m}``: every component's samples of ``m`` pooled."""
    out = dict(per_key)
    for m in metrics:
        pooled = [a for c in components for a in per_key.get(f"{c}/{m}", [])]
        if pooled:
            out[f"overall/{m}"] = pooled
    return out


def hist_reference(values, edges) -> dict:
    """Histogram over ``[e_i, e_{i+1})`` bins, counted one bin at a time."""
    x = np.concatenate([np.ravel(np.asarray(v, dtype=np.float64)) for v in values])
    finite = x[np.isfinite(x)]
    counts = [int(((finite >= lo) & (finite < hi)).sum()) for lo, hi in pairwise(edges)]
    return {"edges": [float(e) for e in edges], "counts": counts,
            "below": int((finite < edges[0]).sum()), "above": int((finite >= edges[-1]).sum()),
            "nonfinite": int(x.size - finite.size)}


# -- numpy references of each statistic --------------------------------------------------


def binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * np.log2(p), 0.0)
        b = np.where(p < 1, (1 - p) * np.log2(1 - p), 0.0)
    h = -(a + b)
    h[~np.isfinite(p)] = np.nan
    return h


def margins(p: np.ndarray, kept: np.ndarray) -> np.ndarray:
    out = []
    for row, k in zip(p, kept):
        if k.any() and (~k).any():
            out.append(np.min(row[k]) - np.max(row[~k]))
    return np.array(out, dtype=np.float64)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = []
    for x, y in zip(a, b):
        inter = sum(1 for i in range(len(x)) if x[i] and y[i])
        union = sum(1 for i in range(len(x)) if x[i] or y[i])
        out.append(inter / union)
    return np.array(out, dtype=np.float64)


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def mean_offdiag_cosine(tokens: np.ndarray) -> np.ndarray:
    out = []
    for sample in tokens.astype(np.float64):
        k, norms = sample.shape[0], np.linalg.norm(sample, axis=1)
        cos = [float(sample[i] @ sample[j]) / (norms[i] * norms[j])
               for i in range(k) for j in range(k) if i != j]
        out.append(sum(cos) / len(cos))
    return np.array(out, dtype=np.float64)


def pruning_inputs(rng, batch, num, forced):
    """float32 keep probabilities with one all-kept, one none-kept and one mixed sample."""
    p = rng.random((batch, num)).astype(np.float32)
    kept = rng.random((batch, num)) < 0.5
    kept[0], kept[1] = True, False
    kept[2, 0], kept[2, 1] = True, False
    f = rng.random((batch, forced)).astype(np.float32)
    return p, kept, f


def pruning_expected(c, p, kept, forced):
    p64 = np.asarray(p, dtype=np.float64)
    n_kept = kept.sum(axis=1).astype(np.float64)
    return {f"{c}/tokens_before": np.full(p.shape[0], float(p.shape[1])),
            f"{c}/tokens_after": n_kept,
            f"{c}/keep_ratio": n_kept / p.shape[1],
            f"{c}/margin": margins(p64, kept),
            f"{c}/p_keep": p64,
            f"{c}/p_keep_entropy": binary_entropy_bits(p64),
            f"{c}/forced_p_keep": np.asarray(forced, dtype=np.float64)}


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


# -- FiLMObserver -------------------------------------------------------------------------


def film_expected(c, gamma=None, beta=None):
    out = {}
    for kind, v in (("gamma", gamma), ("beta", beta)):
        if v is not None:
            v = np.asarray(v, dtype=np.float64).reshape(-1, v.shape[-1])
            out[f"{c}/{kind}"] = v
            out[f"{c}/{kind}_norm"] = np.sqrt((v ** 2).sum(axis=1))
    return out


def strength(gamma, beta):
    g = np.asarray(gamma, dtype=np.float64).reshape(-1, gamma.shape[-1])
    b = np.asarray(beta, dtype=np.float64).reshape(-1, beta.shape[-1])
    return np.sqrt((g ** 2).mean(axis=1) + (b ** 2).mean(axis=1))


def test_film_compact_records_hold_element_norm_and_strength_statistics_of_each_interval(
        tmp_path):
    rng = np.random.default_rng(21)
    comps = ["dino/layer_00", "siglip/layer_09"]
    obs = FiLMObserver(new_session(tmp_path), comps, event_interval=2, detailed_interval=4)
    want = defaultdict(lambda: defaultdict(list))
    for step in STEPS:
        label = bucket_of(step, EVENT_LABELS)
        for i, c in enumerate(comps):
            width = 8 + 4 * i
            gamma = rng.normal(0.0, 0.3, (3, width)).astype(np.float32)
            beta = rng.normal(0.1, 0.2, (3, width)).astype(np.float32)
            if step % 2:  # beta's hook fires first on odd steps
                obs.observe(c, beta=torch.from_numpy(beta))
                obs.observe(c, gamma=torch.from_numpy(gamma))
            else:
                obs.observe(c, gamma=torch.from_numpy(gamma))
                obs.observe(c, beta=torch.from_numpy(beta))
            for key, v in film_expected(c, gamma, beta).items():
                want[label][key].append(v)
            want[label][f"{c}/modulation_strength"].append(strength(gamma, beta))
        obs.log_step(step)
    obs.finalize()
    recs = plain_records(obs.jsonl_path)
    assert [r["step"] for r in recs] == EVENT_LABELS
    for rec in recs:
        check_record(rec["metrics"], with_overall(want[rec["step"]], comps, FILM_OVERALL))
    assert "overall/gamma" not in recs[0]["metrics"]


def test_film_modulation_strength_pairs_gamma_and_beta_arriving_in_either_order(tmp_path):
    rng = np.random.default_rng(22)
    obs = FiLMObserver(new_session(tmp_path), ["c"], event_interval=1)
    pairs = [(rng.normal(size=(2, 5)), rng.normal(size=(2, 5))) for _ in range(3)]
    (g0, b0), (g1, b1), (g2, b2) = pairs
    obs.observe("c", gamma=torch.from_numpy(g0))
    obs.observe("c", beta=torch.from_numpy(b0))
    obs.observe("c", beta=torch.from_numpy(b1))
    obs.observe("c", gamma=torch.from_numpy(g1))
    obs.observe("c", gamma=torch.from_numpy(g2), beta=torch.from_numpy(b2))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    want = [strength(g, b) for g, b in pairs]
    assert_matches(m["c/modulation_strength"], reference_stats(want))
    assert_matches(m["overall/modulation_strength"], reference_stats(want))
    assert m["c/modulation_strength"]["count"] == 6


def test_film_gamma_alone_gives_no_modulation_strength(tmp_path):
    obs = FiLMObserver(new_session(tmp_path), ["c"], event_interval=1)
    g = np.random.default_rng(23).normal(size=(3, 4))
    obs.observe("c", gamma=torch.from_numpy(g))
    obs.observe("c", gamma=torch.from_numpy(g))
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    assert "c/modulation_strength" not in m and "c/beta" not in m
    assert_matches(m["c/gamma_norm"], reference_stats([np.linalg.norm(g, axis=1)] * 2))
    s = obs.get_summary()
    assert s["modulation_strength"] == empty() and s["by_component"]["c"]["beta"] == empty()


def test_film_bfloat16_inputs_with_leading_dims_and_nonfinite_values(tmp_path):
    rng = np.random.default_rng(24)
    obs = FiLMObserver(new_session(tmp_path), ["c"], event_interval=1, detailed_interval=1)
    gamma = rng.normal(0, 0.5, (2, 3, 6)).astype(np.float32)
    beta = rng.normal(0, 0.5, (2, 3, 6)).astype(np.float32)
    gamma[1, 2, 4] = np.nan
    beta[0, 0, 0] = np.inf
    g_t, g64 = bf16_round(gamma)
    b_t, b64 = bf16_round(beta)
    obs.observe("c", gamma=g_t, beta=b_t)
    obs.log_step(0)
    obs.finalize()
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    expected = film_expected("c", g64, b64)
    expected["c/modulation_strength"] = strength(g64, b64)
    check_record(m, with_overall({k: [v] for k, v in expected.items()}, ["c"], FILM_OVERALL))
    assert m["c/gamma"]["nonfinite"] == 1 and m["c/gamma"]["count"] == 35
    assert m["c/gamma_norm"]["nonfinite"] == 1 and m["c/gamma_norm"]["count"] == 5
    assert m["c/modulation_strength"]["nonfinite"] == 2


def test_film_overall_norms_combine_every_components_samples(tmp_path):
    rng = np.random.default_rng(25)
    comps = ["a", "b", "c"]
    obs = FiLMObserver(new_session(tmp_path), comps, event_interval=1)
    fed = defaultdict(list)
    for i, c in enumerate(comps):
        gamma = rng.normal(i, 1.0, (2 + i, 4))  # different scales and batch sizes
        beta = rng.normal(-i, 0.5, (2 + i, 4))
        obs.observe(c, gamma=torch.from_numpy(gamma), beta=torch.from_numpy(beta))
        fed["gamma_norm"].append(np.linalg.norm(gamma, axis=1))
        fed["beta_norm"].append(np.linalg.norm(beta, axis=1))
        fed["modulation_strength"].append(strength(gamma, beta))
    obs.log_step(0)
    obs.finalize()
    s = obs.get_summary()
    for name in FILM_OVERALL:
        assert_matches(s[name], reference_stats(fed[name]))
        assert s[name]["count"] == 2 + 3 + 4
    assert set(s) == {"step", *FILM_OVERALL, "by_component"}
    assert set(s["by_component"]) == set(comps)
    assert_matches(s["by_component"]["b"]["gamma_norm"], reference_stats([fed["gamma_norm"][1]]))


def test_film_histograms_count_gamma_and_beta_elements_of_each_detailed_interval(tmp_path):
    rng = np.random.default_rng(26)
    edges = [-1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0]
    obs = FiLMObserver(new_session(tmp_path), ["c"], event_interval=2, detailed_interval=4,
                       hist_edges=edges)
    want = defaultdict(lambda: defaultdict(list))
    for step in STEPS:
        gamma = rng.normal(0, 0.6, (2, 7))
        beta = rng.normal(0, 0.6, (2, 7))
        if step == 1:
            gamma[0, :5] = [-1.0, -0.1, 0.0, 1.0, np.nan]  # on edges, above, non-finite
            beta[1, :3] = [-2.0, np.inf, 0.5]
        obs.observe("c", gamma=torch.from_numpy(gamma), beta=torch.from_numpy(beta))
        want[bucket_of(step, DETAILED_LABELS)]["gamma"].append(gamma)
        want[bucket_of(step, DETAILED_LABELS)]["beta"].append(beta)
        obs.log_step(step)
    obs.finalize()
    recs = read_jsonl(obs.detailed_path)
    assert [r["step"] for r in recs] == DETAILED_LABELS
    for rec in recs:
        assert rec["metrics"] == {}
        for kind in ("gamma", "beta"):
            assert rec["histograms"][f"c/{kind}"] == hist_reference(want[rec["step"]][kind],
                                                                   edges)
    assert recs[1]["histograms"]["c/gamma"]["nonfinite"] == 1
    assert recs[1]["histograms"]["c/beta"]["nonfinite"] == 1


def test_film_default_histogram_edges_are_the_multiples_of_a_twentieth(tmp_path):
    obs = FiLMObserver(new_session(tmp_path), ["c"], event_interval=1, detailed_interval=1)
    gamma = np.array([[0.1, 0.3, -0.2, -0.45]])
    obs.observe("c", gamma=torch.from_numpy(gamma))
    obs.log_step(0)
    obs.finalize()
    hist = read_jsonl(obs.detailed_path)[0]["histograms"]["c/gamma"]
    edges = [k / 20 for k in range(-20, 21)]
    assert hist == hist_reference([gamma], edges)


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


# -- AggregationObserver ------------------------------------------------------------------


def test_aggregation_counts_tokens_and_compression_once_per_sample_of_each_call(tmp_path):
    encs = ["dino", "siglip"]
    obs = AggregationObserver(new_session(tmp_path), encs, event_interval=2,
                              detailed_interval=4)
    want = defaultdict(lambda: defaultdict(list))
    plan = {"dino": (256, 64), "siglip": (729, 81)}
    for step in STEPS:
        label = bucket_of(step, EVENT_LABELS)
        for enc in encs:
            tin, tout = plan[enc]
            tout = tout if step != 3 or enc == "dino" else 0  # a call without output tokens
            batch = 2 + step
            obs.observe(enc, tin, tout, batch)
            want[label][f"{enc}/tokens_in"].append(np.full(batch, float(tin)))
            want[label][f"{enc}/tokens_out"].append(np.full(batch, float(tout)))
            ratio = tin / tout if tout else np.nan
            want[label][f"{enc}/compression_ratio"].append(np.full(batch, ratio))
        obs.log_step(step)
    obs.finalize()
    recs = plain_records(obs.jsonl_path)
    assert [r["step"] for r in recs] == EVENT_LABELS
    for rec in recs:
        check_record(rec["metrics"], with_overall(want[rec["step"]], encs, AGGR_METRICS))
    assert recs[2]["metrics"]["siglip/compression_ratio"]["nonfinite"] == 5  # step 3
    assert recs[2]["metrics"]["dino/compression_ratio"]["mean"] == 4.0
    s = obs.get_summary()
    assert s["step"] == 5 and set(s["by_encoder"]) == set(encs)
    assert_matches(s["compression_ratio"],
                   reference_stats([np.full(7, 4.0), np.full(7, 9.0)]))
    assert s["tokens_in"]["count"] == 14
    assert_matches(s["by_encoder"]["siglip"]["tokens_out"], reference_stats([np.full(7, 81.0)]))


def test_aggregation_token_cosine_is_the_mean_off_diagonal_cosine_of_the_k_tokens(tmp_path):
    rng = np.random.default_rng(41)
    encs = ["dino", "siglip"]
    obs = AggregationObserver(new_session(tmp_path), encs, event_interval=2,
                              detailed_interval=4)
    want = defaultdict(lambda: defaultdict(list))
    for step in STEPS:
        label = bucket_of(step, DETAILED_LABELS)
        for i, enc in enumerate(encs):
            tokens = (rng.normal(size=(3, 4 + i, 6)) + rng.normal(size=(3, 1, 6))).astype(
                np.float32)
            if enc == "siglip":
                t, tokens64 = bf16_round(tokens)
            else:
                t, tokens64 = torch.from_numpy(tokens), tokens.astype(np.float64)
            obs.observe(enc, 100, tokens.shape[1], 3, tokens=t)
            want[label][f"{enc}/token_cosine"].append(mean_offdiag_cosine(tokens64))
        obs.log_step(step)
    obs.finalize()
    recs = read_jsonl(obs.detailed_path)
    assert [r["step"] for r in recs] == DETAILED_LABELS
    for rec in recs:
        check_record(rec["metrics"], with_overall(want[rec["step"]], encs, ["token_cosine"]))
        assert "histograms" not in rec


def test_aggregation_token_cosine_is_one_for_identical_tokens_and_zero_for_orthogonal_ones(
        tmp_path):
    obs = AggregationObserver(new_session(tmp_path), ["e"], event_interval=1,
                              detailed_interval=1)
    same = np.tile(np.array([1.0, 2.0, -1.0]), (1, 4, 1))       # 4 equal tokens
    ortho = np.eye(3)[None]                                       # 3 orthogonal tokens
    obs.observe("e", 10, 4, 1, tokens=torch.from_numpy(same))
    obs.observe("e", 10, 3, 1, tokens=torch.from_numpy(ortho))
    obs.observe("e", 10, 1, 2, tokens=torch.ones(2, 1, 3))      # K = 1: no pair, no sample
    obs.log_step(0)
    obs.finalize()
    got = read_jsonl(obs.detailed_path)[0]["metrics"]["e/token_cosine"]
    assert_matches(got, reference_stats([[1.0, 0.0]]))
    m = plain_records(obs.jsonl_path)[0]["metrics"]
    assert m["e/tokens_out"]["count"] == 4
    assert_matches(m["e/compression_ratio"], reference_stats([[2.5, 10 / 3, 10.0, 10.0]]))


# -- records, summary and finalize, for every observer ------------------------------------


def feed_pruning(obs, rng):
    p, kept, forced = pruning_inputs(rng, 3, 5, 2)
    obs.observe("c", torch.from_numpy(p), torch.from_numpy(kept), torch.from_numpy(forced))


def feed_film(obs, rng):
    obs.observe("c", gamma=torch.from_numpy(rng.normal(size=(2, 4))),
                beta=torch.from_numpy(rng.normal(size=(2, 4))))


def feed_moe(obs, rng):
    obs.observe_logits(torch.from_numpy(rng.normal(size=(3, 2))))


def feed_aggregation(obs, rng):
    obs.observe("c", 16, 4, 2, tokens=torch.from_numpy(rng.normal(size=(2, 4, 3))))


OBSERVERS = {
    "pruning": (lambda s: PruningObserver(s, ["c"], event_interval=2, detailed_interval=4),
                feed_pruning, "lfp"),
    "film": (lambda s: FiLMObserver(s, ["c"], event_interval=2, detailed_interval=4),
             feed_film, "film"),
    "moe": (lambda s: MoERouterObserver(s, ["a", "b"], event_interval=2, detailed_interval=4),
            feed_moe, "moe"),
    "aggregation": (lambda s: AggregationObserver(s, ["c"], event_interval=2,
                                                  detailed_interval=4),
                    feed_aggregation, "aggr"),
}


@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_every_record_carries_step_time_world_size_and_full_value_objects(tmp_path, kind):
    make, feed, part = OBSERVERS[kind]
    rng = np.random.default_rng(51)
    obs = make(new_session(tmp_path))
    assert obs.jsonl_path == tmp_path / "run" / f"{part}_logs" / "r.jsonl"
    assert obs.detailed_path == tmp_path / "run" / f"{part}_logs" / "r_detailed.jsonl"
    for step in STEPS:
        feed(obs, rng)
        obs.log_step(step)
    obs.finalize()
    for path, labels in ((obs.jsonl_path, EVENT_LABELS), (obs.detailed_path, DETAILED_LABELS)):
        recs = read_jsonl(path)
        assert [r["step"] for r in recs] == labels
        for rec in recs:
            assert {"step", "time", "world_size", "metrics"} <= set(rec)
            assert set(rec) <= {"step", "time", "world_size", "metrics", "histograms"}
            assert rec["world_size"] == 1 and isinstance(rec["time"], float)
            for name, value in rec["metrics"].items():
                assert set(value) == value_keys(value), name
                assert value["count"] > 0 and value["min"] <= value["mean"] <= value["max"]
                assert value["std"] >= 0


@pytest.mark.parametrize("kind", list(OBSERVERS))
def test_finalize_writes_a_completed_summary_once_and_a_second_call_writes_nothing(
        tmp_path, kind):
    make, feed, part = OBSERVERS[kind]
    rng = np.random.default_rng(52)
    obs = make(new_session(tmp_path))
    assert not obs.summary_path.exists()
    for step in range(3):
        feed(obs, rng)
        obs.log_step(step)
    path = obs.finalize()
    assert path == str(tmp_path / "run" / f"{part}_logs" / "r_summary.json")
    summary = json.loads(obs.summary_path.read_text())
    assert summary["status"] == "completed" and summary["part"] == part
    assert summary["run_id"] == "r" and summary["last_step"] == 2
    assert summary["records_written"] == 2 + 2  # events 0, 2; detailed 0, 2
    assert summary["last"] == obs.get_summary()
    assert summary["alerts"] == [] and summary["hook_errors"] == 0
    files = {p: p.read_bytes() for p in (obs.jsonl_path, obs.detailed_path, obs.summary_path)}
    obs.log_step(3)
    feed(obs, rng)  # fed after finalize: never written
    obs.log_step(10)
    assert obs.finalize() == path
    assert {p: p.read_bytes() for p in files} == files


def test_summary_file_keeps_first_last_min_max_of_the_record_means(tmp_path):
    obs = AggregationObserver(new_session(tmp_path), ["e"], event_interval=1)
    for step, tokens_in in enumerate([64, 16, 128, 32]):
        obs.observe("e", tokens_in, 16, 2)
        obs.log_step(step)
    obs.finalize()
    entry = json.loads(obs.summary_path.read_text())["metrics"]["events"]["e/compression_ratio"]
    assert (entry["first"], entry["last"], entry["min"], entry["max"]) == (4.0, 2.0, 1.0, 8.0)
    assert (entry["first_step"], entry["last_step"], entry["records"]) == (0, 3, 4)


def test_two_observers_of_one_session_write_their_own_files_at_the_same_steps(tmp_path):
    rng = np.random.default_rng(53)
    session = new_session(tmp_path)
    lfp = PruningObserver(session, ["c"], event_interval=2, detailed_interval=4)
    moe = MoERouterObserver(session, ["a", "b"], event_interval=3, detailed_interval=4)
    for step in STEPS:
        feed_pruning(lfp, rng)
        feed_moe(moe, rng)
        lfp.log_step(step)  # one session: either observer's log_step advances both
    lfp.finalize()
    moe.finalize()
    assert [r["step"] for r in read_jsonl(lfp.jsonl_path)] == EVENT_LABELS
    assert [r["step"] for r in read_jsonl(moe.jsonl_path)] == [0, 3, 5]
    assert all(k.startswith(("c/", "overall/")) for r in read_jsonl(lfp.jsonl_path)
               for k in r["metrics"])
    assert all(k.startswith(("a_", "b_", "entropy")) for r in read_jsonl(moe.jsonl_path)
               for k in r["metrics"])
    assert read_jsonl(moe.jsonl_path)[1]["metrics"]["entropy"]["count"] == 3 * 3


def test_a_forward_recomputed_by_activation_checkpointing_is_not_counted_twice(tmp_path):
    from torch.utils.checkpoint import checkpoint

    session = MonitorSession(tmp_path / "run", "r")
    moe = MoERouterObserver(session, ["a", "b"], event_interval=1)
    router = torch.nn.Linear(3, 2)
    moe.hook(router, lambda m, a, k, out: moe.observe_logits(out), name="router")
    x = torch.randn(4, 3, requires_grad=True)
    for use_reentrant in (True, False):
        checkpoint(router, x, use_reentrant=use_reentrant).sum().backward()
    moe.log_step(0)
    moe.finalize()
    rec = read_jsonl(moe.jsonl_path)[0]
    assert rec["metrics"]["a_weight"]["count"] == 8  # two forwards of 4 samples


# -- batched statistics (issue 4): same answers as one call at a time ----------------------

@pytest.mark.parametrize("edges", [
    [k / 20 for k in range(-20, 21)],  # evenly spaced: the arithmetic path
    [k / 7 for k in range(8)],
    [-3.0, -0.5, 0.0, 0.1, 2.0],  # uneven: bucketize
])
def test_bins_put_every_value_where_bucketize_does_edges_included(edges):
    from monitor import stats

    e = torch.tensor(edges, dtype=torch.float64)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.concatenate([
        rng.uniform(edges[0] - 1, edges[-1] + 1, 5000), edges,
        np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf),
        [np.nan, np.inf, -np.inf, 1e308, -1e308]]))
    bins = stats.Bins(edges)
    expected = torch.where(torch.isfinite(x), torch.bucketize(x, e, right=True), len(edges) + 1)
    assert bins.uniform == (len(edges) != 5)
    assert torch.equal(bins.index(x), expected)
    rows = stats.rows_of_bins_many(torch.stack([x, x.flip(0)]), bins)
    counts = torch.bincount(expected, minlength=len(edges) + 2).to(torch.float64)
    assert torch.equal(rows[:, stats.COUNT], torch.cat([counts, counts]))


def test_a_tensor_changed_in_place_after_its_hook_is_dropped_with_one_warning(tmp_path):
    obs = FiLMObserver(new_session(tmp_path), ["c"], event_interval=1)
    gamma = torch.ones(2, 4)
    obs.observe("c", gamma=gamma)
    gamma.add_(1.0)  # the model changed it before the statistics were computed
    with pytest.warns(RuntimeWarning, match="modified in place"):
        obs.log_step(0)  # the step call computes the deferred statistics
    obs.finalize()
    assert obs.last_metrics.get("c/gamma", {"count": 0})["count"] == 0
    assert json.loads(obs.summary_path.read_text())["hook_errors"] == 1


def test_pruning_calls_of_one_pass_batched_equal_the_calls_made_one_by_one(tmp_path):
    rng = np.random.default_rng(3)
    comps = [f"layer_{i:02d}" for i in range(4)]
    inputs = [pruning_inputs(rng, 3, 10, 2) for _ in comps]
    results = []
    for name, one_by_one in (("batched", False), ("single", True)):
        obs = PruningObserver(new_session(tmp_path, name), comps, event_interval=1,
                              detailed_interval=1)
        for c, (p, kept, forced) in zip(comps, inputs):
            obs.observe(c, torch.from_numpy(p), torch.from_numpy(kept), torch.from_numpy(forced))
            if one_by_one:
                obs.drain()  # statistics of this call alone (overlap then needs the pass)
        obs.log_step(0)
        obs.finalize()
        results.append([plain_records(obs.jsonl_path), plain_records(obs.detailed_path)])
    (batched, batched_detailed), (single, single_detailed) = results
    assert batched[0]["metrics"] == single[0]["metrics"]
    assert batched_detailed[0]["histograms"] == single_detailed[0]["histograms"]
    overlap = {k: v for k, v in batched_detailed[0]["metrics"].items() if "overlap" in k}
    both = inputs[3][1].any(axis=1) | inputs[2][1].any(axis=1)  # union > 0
    expected = jaccard(inputs[3][1][both], inputs[2][1][both])
    assert overlap["layer_03/overlap_prev"]["count"] == len(expected)
    assert overlap["layer_03/overlap_prev"]["mean"] == pytest.approx(expected.mean())
