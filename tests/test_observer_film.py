"""FiLMObserver, in one process (no process group), against float64 numpy references.

Every statistic is recomputed with numpy from the same random inputs fed to the observer and
compared with what the observer wrote to its JSONL files and returns from ``get_summary()``
(see ``observer_helpers`` for the labels and references).
"""

from collections import defaultdict

import numpy as np
import torch
from observer_helpers import (
    DETAILED_LABELS,
    EVENT_LABELS,
    FILM_OVERALL,
    STEPS,
    bf16_round,
    check_record,
    empty,
    hist_reference,
    new_session,
    plain_records,
    with_overall,
)
from reference import assert_matches, bucket_of, reference_stats
from workers import read_jsonl

from monitor.pruning import (
    FiLMObserver,
)

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
