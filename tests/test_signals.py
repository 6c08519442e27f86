"""Issue 12, signals: SIGTERM and SIGINT sent for real to training processes.

Each test runs ``tests/signal_script.py`` in subprocesses (or under ``torchrun``), sends the
signal, and checks the exit status and what rank 0 left on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tree import lock_file, tree

from monitor import Monitor
from monitor.layout import TRAIN

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "signal_script.py"
WAIT_S = 90.0  # a bound on waiting for a subprocess: reaching it is a failure (a hang)
PARTS = ("lfp", "film", "moe", "aggr")


def start(*args, env_extra=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline().strip()  # the script prints the word (or dies: nothing)
    assert line == word, proc.stderr.read()


def end_of(run_dir: Path, part: str = TRAIN) -> tuple[dict, dict, list[dict]]:
    meta = tree(run_dir, "run").meta()
    summary = tree(run_dir, "run").summary(part)
    return meta, summary, tree(run_dir, "run").records(part)


def assert_terminated(run_dir: Path, name: str, parts=(TRAIN,)) -> dict:
    meta, _, _ = end_of(run_dir)
    assert (meta["status"], meta["error"]) == ("terminated", name)
    assert meta["segments"][-1]["status"] == "terminated"
    assert meta["end_time"] == meta["segments"][-1]["end_time"]
    assert meta["signals"] == ["SIGTERM", "SIGINT"]
    for part in parts:
        _, summary, records = end_of(run_dir, part)
        assert (summary["status"], summary["error"]) == ("terminated", name), part
        if part != TRAIN:
            records += tree(run_dir, "run").detailed(part)
        assert summary["records_written"] == len([r for r in records if "metrics" in r]), part
    assert not lock_file(run_dir).exists()  # released
    return meta


@pytest.mark.parametrize("how", ["monitor", "facade"])
def test_sigterm_mid_run_writes_terminated_and_the_pending_values_then_dies_of_it(
        tmp_path, how):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "lone", *(["facade"] if how == "facade" else []))
    wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=WAIT_S)
    assert proc.returncode == -signal.SIGTERM  # died by the signal, as without the monitor
    assert_terminated(run_dir, "SIGTERM", (TRAIN, *PARTS) if how == "facade" else
                      (TRAIN,))
    records = [r for r in tree(run_dir, "run").records()]
    # interval 1000: the record of step 0, then every value logged since, as one record
    assert [r["step"] for r in records][:1] == [0] and len(records) == 2
    last = records[-1]
    assert "rank_local" not in last  # one process: its values are the run's
    # loss=1.0 once per step 1..last step (the signal lands between two steps' calls)
    assert last["metrics"]["loss"]["count"] in (last["step"] - 1, last["step"])
    assert last["metrics"]["loss"]["mean"] == 1.0


def test_sigint_ends_the_run_then_raises_keyboard_interrupt_as_python_would(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "lone")
    wait_for(proc, "ready")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=WAIT_S)
    assert "KeyboardInterrupt" in err
    assert proc.returncode == -signal.SIGINT  # Python's own exit for an uncaught Ctrl-C
    assert_terminated(run_dir, "SIGINT")


def test_a_handler_installed_before_the_monitor_still_runs_and_decides(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "lone", "ignore_term")
    wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=WAIT_S)
    # the script's handler ran (chained) and let the process go on: it exits 0 itself
    assert proc.returncode == 0 and out.split() == ["handler"], err
    meta, summary, records = end_of(run_dir)
    assert (meta["status"], meta["error"]) == ("terminated", "SIGTERM")
    assert "step() after the run was ended by SIGTERM: ignored" in err  # warned
    assert summary["records_written"] == len(records) == 2


def test_sigterm_while_rank0_waits_inside_a_gloo_collective(tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "store"
    ranks = [start(run_dir, "gloo", rank, store) for rank in (0, 1)]
    try:
        wait_for(ranks[1], "stuck")
        wait_for(ranks[0], "blocked")
        time.sleep(1.0)  # rank 0 is now inside the header all_reduce of step 10's flush
        ranks[0].send_signal(signal.SIGTERM)
        out, err = ranks[0].communicate(timeout=WAIT_S)  # the group's timeout is 120 s
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate(timeout=WAIT_S)
    assert ranks[0].returncode == -signal.SIGTERM, err
    assert "not reached" not in out
    assert_terminated(run_dir, "SIGTERM")
    records = tree(run_dir, "run").records()
    assert [r["step"] for r in records] == [0, 5, 10]
    assert [r.get("rank_local") for r in records] == [None, None,
                                                       {"rank": 0, "reason": "SIGTERM"}]
    # the rows the blocked flush held: rank 0's steps 6..10 (loss = step)
    assert records[2]["metrics"]["loss"] == {"mean": 8.0, "std": 2.0 ** 0.5, "min": 6.0,
                                             "max": 10.0, "count": 5, "nonfinite": 0}


@pytest.mark.slow
@pytest.mark.distributed
def test_under_torchrun_rank1_fails_and_rank0_writes_its_end_at_the_sigterm(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(SCRIPT), str(run_dir), "torchrun"],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=WAIT_S)
    assert done.returncode != 0
    assert "exitcode  : -15" in done.stderr and "(SIGTERM)" in done.stderr  # rank 0
    assert "rank 1 fails" in done.stderr
    assert_terminated(run_dir, "SIGTERM")
    records = tree(run_dir, "run").records()
    first, last = records[0], records[-1]
    assert first["step"] == 0 and "rank_local" not in first
    assert first["metrics"]["rank"]["count"] == 2  # both ranks' values, reduced
    # every value rank 0 logged since (steps 1..last), its own, marked so
    assert last["rank_local"] == {"rank": 0, "reason": "SIGTERM"} and len(records) == 2
    assert last["metrics"]["rank"]["max"] == 0.0
    assert last["metrics"]["loss"]["count"] in (last["step"] - 1, last["step"])


def test_a_forked_child_that_exits_never_writes_the_parents_status(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "fork_exit")
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0 and "child exited" in out, err
    meta, summary, records = end_of(run_dir)
    assert meta["status"] == summary["status"] == "completed"
    assert [s["status"] for s in meta["segments"]] == ["completed"]
    assert [r["step"] for r in records] == [0, 1]


def test_turned_off_the_monitor_leaves_signals_alone(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "lone", "no_signals")
    wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=WAIT_S)
    assert proc.returncode == -signal.SIGTERM
    meta, _, _ = end_of(run_dir)
    assert meta["signals"] == [] and "status" not in meta  # as before: a dead segment
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", handle_signals=False)
    assert mon.session.meta["signals"] == []
    mon.finalize()
    with pytest.raises(TypeError, match="handle_signals must be a bool, got 'no'"):
        Monitor(run_dir=tmp_path / "r", run_id="r", handle_signals="no")



@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_that_stops_the_main_thread_inside_the_monitor_ends_the_run_after_it(
        tmp_path, name):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "inside", name)
    out, err = proc.communicate(timeout=WAIT_S)
    # inside the monitor's lock (as in the middle of a record's write) the signal came,
    # and nothing was ended under that section: the end came right after it
    assert out.split() == ["inside:", "open", "1", "left"], err
    assert proc.returncode == -getattr(signal, name)
    assert_terminated(run_dir, name)
    records = tree(run_dir, "run").records()
    assert [(r["step"], r["metrics"]["loss"]["count"]) for r in records] == [(0, 1), (1, 1)]
