"""Monitor in one process (no process group): records, timing, files, errors."""

import json

import numpy as np
import pytest
import torch
from reference import assert_matches, reference_stats
from tree import tree
from workers import read_jsonl

from monitor import Monitor


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "runs" / "exp"


def paths(run_dir, run_id="exp"):
    logs = tree(run_dir, run_id)
    return logs.path("stream"), logs.path("summary"), logs.path("meta")


def test_record_holds_every_value_since_the_previous_record_up_to_its_step(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=10)
    logged = {}
    for step in range(1, 26):
        with mon.step(step) as h:
            h.log(loss=torch.tensor(float(step)), lr=0.1, extra={"v": np.array([step, -step])})
        logged[step] = step
    mon.finalize()
    recs = read_jsonl(paths(run_dir)[0])
    assert [r["step"] for r in recs] == [10, 20, 25]
    assert_matches(recs[0]["metrics"]["loss"], reference_stats([list(range(1, 11))]))
    assert_matches(recs[1]["metrics"]["v"],
                   reference_stats([[s, -s] for s in range(11, 21)]))
    assert recs[2]["metrics"]["lr"] == {"mean": 0.1, "std": 0.0, "min": 0.1, "max": 0.1,
                                        "count": 5, "nonfinite": 0, "min_rank": 0,
                                        "max_rank": 0}


def test_the_due_record_is_on_disk_when_its_step_context_exits(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=5)
    for step in range(1, 6):
        with mon.step(step) as h:
            h.log(loss=1.0)
    assert [r["step"] for r in read_jsonl(paths(run_dir)[0])] == [5]
    summary = json.loads(paths(run_dir)[1].read_text())
    assert summary["status"] == "running" and summary["records_written"] == 1


def test_gradient_accumulation_repeats_a_step_without_losing_or_double_counting(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=4)
    for step in range(1, 10):
        for _ in range(3):
            mon.log_step(step)
            with mon.step(step) as h:
                h.log(loss=float(step))
    mon.finalize()
    recs = read_jsonl(paths(run_dir)[0])
    assert [(r["step"], r["metrics"]["loss"]["count"]) for r in recs] == [(4, 12), (8, 12),
                                                                         (9, 3)]
    assert recs[1]["metrics"]["loss"]["min"] == 5.0


def test_accumulated_micro_batches_of_a_due_step_stay_in_its_record(run_dir):
    """Once a run repeats step numbers, a due record waits for the first later step."""
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=5)
    for step in range(1, 11):
        for micro in range(2):
            with mon.step(step) as h:
                h.log(loss=float(step))
            if step == 5 and micro == 1:
                assert read_jsonl(paths(run_dir)[0]) == []
            if step == 6 and micro == 0:
                assert [r["step"] for r in read_jsonl(paths(run_dir)[0])] == [5]
    mon.finalize()
    recs = read_jsonl(paths(run_dir)[0])
    assert [(r["step"], r["metrics"]["loss"]["count"]) for r in recs] == [(5, 10), (10, 10)]


def test_a_first_due_step_waits_for_its_later_micro_batches(run_dir):
    """Step 0 is due before the run could show it accumulates: its record waits for the
    first call of step 1, so both micro-batches of step 0 are in it."""
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=5)
    for step in range(0, 6):
        for _ in range(2):
            with mon.step(step) as h:
                h.log(loss=1.0)
            if step == 0:
                assert read_jsonl(paths(run_dir)[0]) == []
    mon.finalize()
    recs = read_jsonl(paths(run_dir)[0])
    assert [(r["step"], r["metrics"]["loss"]["count"]) for r in recs] == [(0, 2), (5, 10)]


def test_once_a_step_ended_with_one_context_due_records_are_written_at_their_exit(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=2)
    with mon.step(0) as h:
        h.log(loss=0.0)
    assert read_jsonl(paths(run_dir)[0]) == []  # not known yet whether step 0 goes on
    with mon.step(1) as h:  # step 0 ended with one context: written now, and known
        h.log(loss=1.0)
    assert [r["step"] for r in read_jsonl(paths(run_dir)[0])] == [0]
    with mon.step(2) as h:
        h.log(loss=2.0)
    assert [r["step"] for r in read_jsonl(paths(run_dir)[0])] == [0, 2]
    mon.finalize()


def test_a_step_reached_by_log_step_is_written_at_the_first_later_call(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=10)
    with mon.step(7) as h:
        h.log(loss=7.0)
    mon.log_step(10)
    mon.log_step(10)
    assert read_jsonl(paths(run_dir)[0]) == []
    mon.log_step(11)
    recs = read_jsonl(paths(run_dir)[0])
    assert [(r["step"], r["metrics"]["loss"]["mean"]) for r in recs] == [(10, 7.0)]


def test_eval_contexts_write_at_every_exit_and_keep_train_separate(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=100)
    with mon.step(1) as h:
        h.log(loss=5.0)
    for step in (2, 3):
        with mon.step(step, mode="eval") as h:
            h.log(loss=np.array([1.0, 3.0]))
    mon.finalize()
    recs = read_jsonl(paths(run_dir)[0])
    assert [(r["step"], r["mode"]) for r in recs] == [(2, "eval"), (3, "eval"), (3, "train")]
    assert recs[0]["metrics"]["loss"]["mean"] == 2.0
    assert recs[2]["metrics"]["loss"]["mean"] == 5.0


def test_nonfinite_values_are_counted_and_kept_out_of_the_moments(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=1)
    with mon.step(0) as h:
        h.log(loss=torch.tensor([1.0, float("nan"), 3.0, float("inf")]), gn=float("nan"))
    mon.finalize()
    m = read_jsonl(paths(run_dir)[0])[0]["metrics"]
    assert m["loss"] == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "count": 2,
                         "nonfinite": 2, "min_rank": 0, "max_rank": 0, "nonfinite_ranks": [0]}
    assert m["gn"] == {"mean": None, "std": None, "min": None, "max": None, "count": 0,
                       "nonfinite": 1, "min_rank": None, "max_rank": None,
                       "nonfinite_ranks": [0]}


def test_finalize_is_idempotent_and_returns_the_summary_path(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=10)
    with mon.step(3) as h:
        h.log(loss=2.0, extra=None)
    first = mon.finalize()
    assert first == str(paths(run_dir)[1]) == mon.finalize()
    assert len(read_jsonl(paths(run_dir)[0])) == 1
    summary = json.loads(paths(run_dir)[1].read_text())
    assert summary["status"] == "completed" and summary["last_step"] == 3
    assert summary["metrics"]["train"]["loss"]["last"] == 2.0


def test_summary_keeps_first_last_min_max_of_the_flushed_means(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=1)
    for step, loss in enumerate([3.0, 1.0, 4.0, 2.0]):
        with mon.step(step) as h:
            h.log(loss=loss)
    mon.finalize()
    entry = json.loads(paths(run_dir)[1].read_text())["metrics"]["train"]["loss"]
    assert (entry["first"], entry["last"], entry["min"], entry["max"]) == (3.0, 2.0, 1.0, 4.0)
    assert entry["records"] == 4


def test_meta_names_run_config_versions_world_and_participation(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", config_name="libero", log_interval=7)
    mon.finalize()
    meta = json.loads(paths(run_dir)[2].read_text())
    assert meta["run_id"] == "exp" and meta["config_name"] == "libero"
    assert meta["config"]["log_interval"] == 7
    assert set(meta["versions"]) == {"monitor", "torch", "python"}
    assert meta["world_size"] == 1 and meta["backend"] is None
    assert meta["participation"]["decision"] == "single_process"
    assert meta["schema_version"] == 1 and meta["resumed"] is False
    assert meta["status"] == "completed" and meta["host"] and meta["start_time"] > 0


def test_reopening_a_run_appends_and_says_so_in_meta(run_dir):
    for segment in range(2):
        mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=1)
        with mon.step(segment) as h:
            h.log(loss=float(segment))
        mon.finalize()
    lines = read_jsonl(paths(run_dir)[0])
    assert [r["step"] for r in lines if "metrics" in r] == [0, 1]
    assert lines[1]["resume"] == {"segment": 2, "supersedes_from_step": 1,
                                  "superseded_lines": 0}
    meta = json.loads(paths(run_dir)[2].read_text())
    assert meta["resumed"] is True and len(meta["segments"]) == 2


def test_a_partial_last_line_is_dropped_when_the_run_is_reopened(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=1)
    with mon.step(0) as h:
        h.log(loss=1.0)
    mon.finalize()
    with open(paths(run_dir)[0], "a") as f:
        f.write('{"step": 1, "mo')  # a writer killed mid-line
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=1)
    with mon.step(2) as h:
        h.log(loss=2.0)
    mon.finalize()
    assert [r["step"] for r in read_jsonl(paths(run_dir)[0]) if "metrics" in r] == [0, 2]


def test_context_manager_form_marks_a_crash_as_failed(run_dir):
    with pytest.raises(ZeroDivisionError):
        with Monitor(run_dir=run_dir, run_id="exp", log_interval=1) as mon:
            with mon.step(0) as h:
                h.log(loss=1.0)
            raise ZeroDivisionError("division by zero (an injected crash)")
    summary = json.loads(paths(run_dir)[1].read_text())
    assert (summary["status"], summary["error"]) == ("failed", "ZeroDivisionError")
    assert json.loads(paths(run_dir)[2].read_text())["status"] == "failed"


def test_finalize_status_is_checked(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp")
    with pytest.raises(ValueError, match="status must be"):
        mon.finalize("done")
    mon.finalize()


def test_bad_log_calls_raise_clear_errors(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=10)
    with mon.step(0) as h:
        with pytest.raises(TypeError, match="'loss'.*complex"):
            h.log(loss=1 + 2j)
        with pytest.raises(TypeError, match="'tag'"):
            h.log(tag="hello")
        with pytest.raises(ValueError, match="both as keyword and in extra"):
            h.log(loss=1.0, extra={"loss": 2.0})
        with pytest.raises(TypeError, match="extra must be a mapping"):
            h.log(extra=[1.0])
    with pytest.raises(RuntimeError, match="after the context"):
        h.log(loss=1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        with mon.step(1, mode="training"):
            pass
    with pytest.raises(ValueError, match="log_interval must be > 0"):
        Monitor(run_dir=run_dir, run_id="x", log_interval=0)


def test_steps_going_backwards_warn_once(run_dir):
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=10)
    mon.log_step(5)
    with pytest.warns(RuntimeWarning, match="backwards"):
        mon.log_step(3)
    mon.log_step(2)  # no second warning (filterwarnings=error would raise)
    mon.finalize()


def test_no_host_sync_between_flushes(run_dir, monkeypatch):
    """Between flushes, log() never reads a tensor back to the host."""
    mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=50)
    with mon.step(0) as h:  # step 0 is due: flushed at the first call of step 1
        h.log(loss=torch.tensor(1.0))
    mon.log_step(1)
    calls = []
    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for step in range(1, 50):
        with mon.step(step) as h:
            h.log(loss=torch.randn(()), lr=1e-4, extra={"acts": torch.randn(8, 4),
                                                        "bf": torch.randn(3).bfloat16()})
    assert calls == []
    with mon.step(50) as h:
        h.log(loss=torch.tensor(0.0))
    assert calls  # the flush is where the host reads results
    monkeypatch.undo()
    mon.finalize()


def test_one_process_without_a_group_issues_no_collective(run_dir):
    from workers import count_collectives

    counter = count_collectives()
    try:
        mon = Monitor(run_dir=run_dir, run_id="exp", log_interval=2)
        for step in range(5):
            with mon.step(step) as h:
                h.log(loss=float(step))
        mon.finalize()
    finally:
        counter["restore"]()
    assert counter["calls"] == []
    assert len(read_jsonl(paths(run_dir)[0])) == 3


def test_participation_arguments_are_checked(run_dir, monkeypatch):
    with pytest.raises(ValueError, match="participation must be one of"):
        Monitor(run_dir=run_dir, run_id="exp", participation="some")
    with pytest.raises(ValueError,
                       match="participation_timeout must be a finite number of seconds > 0"):
        Monitor(run_dir=run_dir, run_id="exp", participation_timeout=0)
    monkeypatch.setenv("MONITOR_PARTICIPATION_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MONITOR_PARTICIPATION_TIMEOUT"):
        Monitor(run_dir=run_dir, run_id="exp")
