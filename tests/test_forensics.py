"""Which rank: ``min_rank``, ``max_rank`` and ``nonfinite_ranks`` on every reduced value."""

from __future__ import annotations

import logging
import math
import random

import forensics_workers as fw
import pytest
import torch
from harness import run_world
from tree import tree

import monitor
from monitor import Monitor, stats
from monitor.records import nonfinite_text, ranks_text
from monitor.report import part_table

RANK_FIELDS = ("min_rank", "max_rank", "nonfinite_ranks")


def rank_fields(value: dict) -> dict:
    return {k: value[k] for k in RANK_FIELDS if k in value}


# -- the encoding, exact for any world size (no world needed) ----------------------------------

@pytest.mark.parametrize("world", [1, 2, 17, 18, 100])
def test_rank_flags_summed_in_any_order_name_the_lowest_holders_exactly(world):
    gen = torch.Generator().manual_seed(world)
    k = 64
    samples, rows = [], []
    for rank in range(world):
        x = torch.randint(-3, 4, (k, 4), generator=gen).to(stats.DTYPE)  # many ties
        x[torch.rand(k, 4, generator=gen) < 0.05] = math.nan
        x[rank % k, :] = math.inf  # a row with only non-finite values on this rank
        x[(rank + 1) % k, 0] = -0.0 if rank % 2 else 0.0
        samples.append(x)
        rows.append(stats.rows_of_samples(x))
    lo = torch.stack([r[:, stats.MIN] for r in rows]).amin(0)
    hi = torch.stack([r[:, stats.MAX] for r in rows]).amax(0)
    flags = [stats.rank_flags(r, lo, hi, rank, world) for rank, r in enumerate(rows)]
    assert flags[0].shape == (k, stats.rank_columns(world))
    order = list(range(world))
    random.Random(world).shuffle(order)  # a collective may add in any order
    total = torch.zeros_like(flags[0])
    for rank in order:
        total = total + flags[rank]
    lows = stats.lowest_ranks(total, stats.HOLDS_MIN).tolist()
    highs = stats.lowest_ranks(total, stats.HOLDS_MAX).tolist()
    for i in range(k):
        want = fw.expected_ranks([x[i].tolist() for x in samples])
        assert lows[i] == (-1 if want["min_rank"] is None else want["min_rank"])
        assert highs[i] == (-1 if want["max_rank"] is None else want["max_rank"])
        assert stats.flagged_ranks(total[i].tolist(), stats.SAW_NONFINITE) == \
            want.get("nonfinite_ranks", [])


def test_combining_components_keeps_the_ranks_that_hold_the_combined_extremes():
    # component a: max 3 on rank 2; component b: max 3 on rank 1, min -1 on rank 2, NaN on 0
    world = 3
    a = [stats.rows_of_samples(torch.tensor([[v]], dtype=stats.DTYPE)) for v in (0.0, 1.0, 3.0)]
    b = [stats.rows_of_samples(torch.tensor([[v]], dtype=stats.DTYPE))
         for v in (math.nan, 3.0, -1.0)]
    reduced = []
    for comp in (a, b):
        lo = torch.stack([r[:, stats.MIN] for r in comp]).amin(0)
        hi = torch.stack([r[:, stats.MAX] for r in comp]).amax(0)
        total = stats.empty_rows(1)
        for r in comp:
            total = stats.combine(total, r)
        flags = sum(stats.rank_flags(r, lo, hi, i, world) for i, r in enumerate(comp))
        reduced.append(torch.cat([total, flags], dim=1))
    both = stats.combine_all(torch.cat(reduced))
    value = monitor.records.metrics_of(["overall/x"], both)["overall/x"]
    assert (value["min"], value["max"], value["count"], value["nonfinite"]) == (-1.0, 3.0, 5, 1)
    assert rank_fields(value) == {"min_rank": 2, "max_rank": 1, "nonfinite_ranks": [0]}
    plain = stats.combine_all(torch.cat(reduced)[:, : stats.NUM_COLS])
    assert plain.shape == (1, stats.NUM_COLS)


def test_rank_lists_read_short():
    assert ranks_text([5, 0, 1, 2, 9, 10]) == "0-2,5,9-10"
    metrics = {"loss": {"nonfinite": 2, "nonfinite_ranks": [1, 3]},
               "lr": {"nonfinite": 0}, "gn": {"nonfinite": 1, "nonfinite_ranks": [0]}}
    assert nonfinite_text(metrics) == "nonfinite: loss (ranks 1,3), gn (rank 0)"
    assert nonfinite_text({"lr": {"nonfinite": 0}}) is None


# -- one process ------------------------------------------------------------------------------

def test_one_process_names_rank_0_everywhere(tmp_path, caplog):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1)
    with caplog.at_level(logging.INFO, logger="monitor"):
        for step in range(3):
            with mon.step(step) as h:
                h.log(loss=torch.tensor([1.0, math.nan if step == 1 else 2.0]),
                      gn=math.inf if step == 2 else 0.5)
        mon.finalize()
    lines = tree(tmp_path / "r", "r").records()
    recs = [r for r in lines if "metrics" in r]
    assert rank_fields(recs[0]["metrics"]["loss"]) == {"min_rank": 0, "max_rank": 0}
    assert rank_fields(recs[1]["metrics"]["loss"]) == {
        "min_rank": 0, "max_rank": 0, "nonfinite_ranks": [0]}
    assert rank_fields(recs[2]["metrics"]["gn"]) == {  # no finite value: no min, no max
        "min_rank": None, "max_rank": None, "nonfinite_ranks": [0]}
    alerts = [r["alert"] for r in lines if "alert" in r]
    assert [(a["metric"], a["nonfinite_ranks"]) for a in alerts] == [("loss", [0]), ("gn", [0])]
    summary = tree(tmp_path / "r", "r").summary()
    table = summary["metrics"]["train"]
    assert table["loss"]["nonfinite_ranks"] == [0] and table["gn"]["nonfinite_ranks"] == [0]
    console = [r.getMessage() for r in caplog.records if r.getMessage().startswith("monitor: ")]
    assert "nonfinite: loss (rank 0)" in console[1] and "nonfinite" not in console[0]


def test_without_forensics_the_records_are_todays(tmp_path):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1, console=False)
    mon.session.reducer().forensics = False
    with mon.step(0) as h:
        h.log(loss=torch.tensor([1.0, math.nan]))
    mon.finalize()
    rec = tree(tmp_path / "r", "r").records()[0]
    assert set(rec["metrics"]["loss"]) == {"mean", "std", "min", "max", "count", "nonfinite"}


# -- gloo worlds ------------------------------------------------------------------------------

def check_planted(run_dir, world, steps=4):
    """Every value of the training and probe streams against the numpy reference."""
    logs = tree(run_dir, "f")
    lines = logs.records()
    recs = [r for r in lines if "metrics" in r]
    assert [r["step"] for r in recs] == list(range(steps))
    for rec in recs:
        want = fw.pooled([fw.train_values(r, world, rec["step"]) for r in range(world)])
        assert set(rec["metrics"]) == set(want)
        for name, per_rank in want.items():
            assert rank_fields(rec["metrics"][name]) == fw.expected_ranks(per_rank), \
                (rec["step"], name)
    by_step = {r["step"]: r["metrics"] for r in recs}
    last = world - 1
    # the chosen cases, spelled out
    assert rank_fields(by_step[0]["tie_all"]) == {"min_rank": 0, "max_rank": 0}
    assert rank_fields(by_step[0]["tie_hi"]) == {"min_rank": 0, "max_rank": 1}
    assert rank_fields(by_step[1]["signed_zero"]) == {"min_rank": 0, "max_rank": 0}
    assert rank_fields(by_step[1]["max_last"]) == {"min_rank": 0, "max_rank": last}
    assert rank_fields(by_step[1]["min_mid"]) == {"min_rank": 1,
                                                  "max_rank": last if world > 2 else 0}
    assert rank_fields(by_step[0]["u"]) == {"min_rank": 1, "max_rank": 1}  # union path
    assert rank_fields(by_step[3]["u"]) == {"min_rank": 1, "max_rank": 1}  # adopted, fast
    assert rank_fields(by_step[1]["loss"]) == {  # world 2: rank 1 has the NaN, no Inf
        "min_rank": last if world > 2 else 0, "max_rank": 1,
        "nonfinite_ranks": sorted({1, last})}
    assert rank_fields(by_step[2]["loss"]) == {
        "min_rank": 1, "max_rank": last, "nonfinite_ranks": [0]}
    assert rank_fields(by_step[2]["sparse"]) == {"min_rank": last, "max_rank": last}
    assert rank_fields(by_step[3]["only_nan"]) == {
        "min_rank": None, "max_rank": None, "nonfinite_ranks": [1]}
    alerts = [r["alert"] for r in lines if "alert" in r]
    assert [(a["metric"], a["nonfinite_ranks"]) for a in alerts] == [
        ("loss", sorted({1, last})), ("only_nan", [1])]
    summary = logs.summary()["metrics"]["train"]
    assert summary["loss"]["nonfinite_ranks"] == sorted({0, 1, last})
    assert summary["only_nan"]["nonfinite_ranks"] == [1]
    assert summary["rand"]["nonfinite_ranks"] == []
    # the observer's compact and detailed streams
    plines = logs.records("probe")
    events = [r for r in plines if "metrics" in r]
    assert [r["step"] for r in events] == list(range(steps))
    for rec in events:
        per_rank = [fw.probe_values(r, world, rec["step"])["events"] for r in range(world)]
        want = fw.pooled(per_rank)
        want["overall/x"] = [v["a/x"] + v["b/x"] for v in per_rank]
        assert set(rec["metrics"]) == set(want)
        for name, values in want.items():
            assert rank_fields(rec["metrics"][name]) == fw.expected_ranks(values), name
    assert rank_fields(events[1]["metrics"]["overall/x"]) == {
        "min_rank": 1 if world > 2 else 0, "max_rank": 0, "nonfinite_ranks": [last]}
    assert [(r["alert"]["metric"], r["alert"]["nonfinite_ranks"]) for r in plines
            if "alert" in r and r["alert"]["type"] == "nonfinite"][:2] == [
        ("b/x", [last]), ("overall/x", [last])]
    detailed = [r for r in logs.detailed("probe") if "metrics" in r]
    groups = {0: [0], 2: [1, 2], 3: [3]}  # detailed every 2 steps, the rest at finalize
    assert [r["step"] for r in detailed] == list(groups)
    for rec in detailed:
        per_rank = [[x for s in groups[rec["step"]]
                     for x in fw.probe_values(r, world, s)["detailed"]["a/d"]]
                    for r in range(world)]
        assert rank_fields(rec["metrics"]["a/d"]) == fw.expected_ranks(per_rank)
    assert detailed[1]["metrics"]["a/d"]["nonfinite_ranks"] == [0]
    return recs


@pytest.mark.distributed
def test_three_ranks_name_the_holders_in_training_and_observer_streams(tmp_path):
    run_dir = tmp_path / "run"
    out = run_world(fw.planted, 3, tmp_path, run_dir=str(run_dir))
    # step 0 brings "u" on rank 1 alone: the union path (header, 2 gathers); then the fused
    # MAX buffer and the SUM, whose rank columns cost no collective. Counted per step
    # context: the first due record waits until the run has shown it does not accumulate,
    # so step 0's record is reduced in step 1's context (monitor/README.md, "Train records")
    assert out == [[0, 3, 2, 2]] * 3
    check_planted(run_dir, 3)
    # read back, report, as a user finds them
    run = monitor.read_run(run_dir)
    df = run["train"].to_pandas()
    assert {"loss.min_rank", "loss.max_rank", "loss.nonfinite_ranks"} <= set(df.columns)
    assert df["loss.nonfinite_ranks"].tolist()[1] == [1, 2]
    assert df["loss.nonfinite_ranks"].tolist()[0] is None
    assert df["max_last.max_rank"].tolist() == [2, 2, 2, 2]
    table = part_table(run, "train")
    assert "nonfinite on" in table.splitlines()[1]
    loss_line = next(line for line in table.splitlines() if "train/loss " in line)
    assert loss_line.rstrip().endswith("0-2")
    assert next(line for line in table.splitlines()
                if "train/rand " in line).rstrip().endswith("-")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One world of 2 for the tests below (a world costs seconds to start): the planted
    values, K = 5 and 5,000 metrics with and without a NaN, then participation='local'."""
    tmp_path = tmp_path_factory.mktemp("two")
    out = run_world(fw.two_ranks, 2, tmp_path, run_dir=str(tmp_path / "run"), ks=[5, 5000])
    return tmp_path / "run", out


@pytest.mark.distributed
def test_two_ranks_name_the_holders_in_training_and_observer_streams(two_ranks):
    run_dir, out = two_ranks
    # "u" on rank 1 alone makes step 0 a union here too; in a world of 2 rank 1 is also
    # the last rank, which moves some holders (the reference decides them all)
    assert [o["planted"] for o in out] == [[0, 3, 2, 2]] * 2  # per context, as above
    check_planted(run_dir, 2)


@pytest.mark.distributed
def test_collectives_per_flush_with_and_without_nonfinite_values(two_ranks):
    run_dir, out = two_ranks
    for per_rank in out:
        # the same names on both ranks: the first flush sends the header alone, then 2;
        # steps 0-1 are clean, 2-3 have a NaN on rank 1; each record is reduced in the next
        # step's context (the first one waits, see above) and finalize reduces step 3's
        assert per_rank["collectives"] == {5: [0, 3, 2, 2, 2], 5000: [0, 3, 2, 2, 2]}
    for k in (5, 5000):
        recs = tree(run_dir, f"k{k}").records()
        recs = [r for r in recs if "metrics" in r]
        assert len(recs) == 4
        for step, rec in enumerate(recs):
            m = rec["metrics"]
            assert all(v["min_rank"] == 0 and v["max_rank"] == 1 for n, v in m.items()
                       if n != "m00000")
            assert all("nonfinite_ranks" not in v for n, v in m.items() if n != "m00000")
            if step >= 2:  # rank 1's only value is NaN: rank 0 holds both extremes
                assert rank_fields(m["m00000"]) == {
                    "min_rank": 0, "max_rank": 0, "nonfinite_ranks": [1]}
            else:
                assert rank_fields(m["m00000"]) == {"min_rank": 0, "max_rank": 1}


@pytest.mark.distributed
def test_rank0_only_names_rank_0(two_ranks):
    run_dir, _ = two_ranks
    logs = tree(run_dir, "loc")
    rec = logs.records()[0]
    assert rec["metrics"]["loss"]["count"] == 1  # rank 0's values only
    assert rank_fields(rec["metrics"]["loss"]) == {
        "min_rank": 0, "max_rank": 0, "nonfinite_ranks": [0]}
    meta = logs.meta()
    assert meta["participation"]["statistics"] == "local"


@pytest.mark.distributed
@pytest.mark.slow
def test_five_ranks(tmp_path):
    run_dir = tmp_path / "run"
    out = run_world(fw.planted, 5, tmp_path, run_dir=str(run_dir), timeout=180.0)
    assert out == [[0, 3, 2, 2]] * 5  # per context, as in the world of 3
    check_planted(run_dir, 5)
