"""AggregationObserver, in one process (no process group), against float64 numpy references.

Every statistic is recomputed with numpy from the same random inputs fed to the observer and
compared with what the observer wrote to its JSONL files and returns from ``get_summary()``
(see ``observer_helpers`` for the labels and references).
"""

from collections import defaultdict

import numpy as np
import torch
from observer_helpers import (
    AGGR_METRICS,
    DETAILED_LABELS,
    EVENT_LABELS,
    STEPS,
    bf16_round,
    check_record,
    mean_offdiag_cosine,
    new_session,
    plain_records,
    with_overall,
)
from reference import assert_matches, bucket_of, reference_stats
from workers import read_jsonl

from monitor.pruning import (
    AggregationObserver,
)

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
