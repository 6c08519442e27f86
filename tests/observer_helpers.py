"""Shared pieces of the observer tests (tests/test_observer_*.py): sessions, record checks
and float64 numpy references of each statistic.

Records are labelled by step: with steps 0, 1, 2, ... and interval 2 the labels are 0, 2,
4, ... (plus the last step at finalize), and a record labelled ``s`` holds exactly the
values fed after the previous record's step and up to ``s``.
"""

from itertools import pairwise

import numpy as np
import torch
from reference import assert_matches, reference_stats
from workers import read_jsonl

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
