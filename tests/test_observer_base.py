"""What every observer shares (records, summary, finalize, hooks, batching), in one
process (no process group), against float64 numpy references.

Every statistic is recomputed with numpy from the same random inputs fed to the observer and
compared with what the observer wrote to its JSONL files and returns from ``get_summary()``
(see ``observer_helpers`` for the labels and references).
"""

import json

import numpy as np
import pytest
import torch
from observer_helpers import (
    DETAILED_LABELS,
    EVENT_LABELS,
    STEPS,
    jaccard,
    new_session,
    plain_records,
    pruning_inputs,
    value_keys,
)
from tree import tree
from workers import read_jsonl

from monitor.pruning import (
    AggregationObserver,
    FiLMObserver,
    MoERouterObserver,
    PruningObserver,
)
from monitor.session import MonitorSession

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
    assert obs.jsonl_path == tree(tmp_path / "run", "r").path("stream", part)
    assert obs.detailed_path == tree(tmp_path / "run", "r").path("detailed", part)
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
    assert path == str(tree(tmp_path / "run", "r").path("summary", part))
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
