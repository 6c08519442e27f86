"""Issue 5, reliability: every fault injected for real, each with its promised outcome.

Crashes and kills run ``tests/fault_script.py`` in a subprocess; rank death and the full
disk under a process group run in gloo worlds (``harness.run_world``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import reliability_workers
import torch
from harness import run_world
from tree import lock_file, tree
from workers import read_records

from monitor import Monitor
from monitor.layout import TRAIN
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.pruning.adapters.cogvla_wiring import moe_router_of
from monitor.records import live_records
from monitor.session import MonitorSession
from monitor.sinks import RunDirLockedError
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fault_script.py"
PARTS = ("lfp", "film", "moe", "aggr")
WAIT_S = 90.0  # a bound on waiting for a subprocess: reaching it is a failure (a hang)


def script(run_dir, mode, run_id="run", **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), mode, run_id],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **popen)


def wait_ready(proc) -> list[str]:
    line = proc.stdout.readline().split()  # the script prints "ready" (or dies: nothing)
    assert line[:1] == ["ready"], proc.stderr.read()
    return line[1:]


def every_file_parses(run_dir: Path) -> dict[str, int]:
    """Each JSONL line and each JSON file under ``run_dir`` parses; returns lines per file."""
    lines = {}
    for path in run_dir.rglob("*.jsonl"):
        raw = path.read_bytes()
        assert raw == b"" or raw.endswith(b"\n"), f"{path} ends in a partial line"
        lines[str(path.relative_to(run_dir))] = len([json.loads(x) for x in raw.splitlines()])
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())
    return lines


def cogvla_cfg(**overrides):
    return CogVLAMonitoringConfig(**{"monitor_log_interval": 2, "pruning_event_log_interval": 2,
                                     "detailed_log_interval": 4, "film_sample_layers": [0, 9],
                                     **overrides})


@pytest.fixture(scope="module")
def model_cfg():
    return TinyCogVLAConfig(image_size=16)


def train(mon, model, model_cfg, steps, inject=None):
    gen = torch.Generator().manual_seed(0)
    for step in steps:
        if inject is not None:
            inject(step)
        with torch.no_grad():
            out = model(**synthetic_batch(model_cfg, batch_size=1, generator=gen))
        mon.log_step(step)
        with mon.step(step) as h:
            h.log(loss=out.loss, lr=1e-3)


# -- 1. a crash of the training script --------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["with_inside", "with_outside", "exit_inside", "exit_outside"])
def test_a_crash_keeps_every_flushed_record_and_writes_failed_with_the_error_type(
        tmp_path, mode):
    run_dir = tmp_path / "runs" / "run"
    proc = script(run_dir, mode)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 1 and "ZeroDivisionError" in err
    every_file_parses(run_dir)
    # interval 2, crash at step 5: records 0, 2, 4 were flushed; step 5's values were not
    assert [r["step"] for r in tree(run_dir, "run").metric_records()] == [0, 2, 4]
    meta = tree(run_dir, "run").meta()
    assert (meta["status"], meta["error"]) == ("failed", "ZeroDivisionError")
    assert meta["segments"][-1]["status"] == "failed"
    for part in (TRAIN, *PARTS):
        summary = tree(run_dir, "run").summary(part)
        assert (summary["status"], summary["error"]) == ("failed", "ZeroDivisionError"), part
    assert not lock_file(run_dir).exists()  # released by the exit handler too


def test_an_exit_without_finalize_and_without_error_is_marked_incomplete(tmp_path):
    run_dir = tmp_path / "run"
    proc = script(run_dir, "exit_clean")
    proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0
    meta = tree(run_dir, "run").meta()
    assert (meta["status"], meta["error"]) == ("incomplete", None)
    summary = tree(run_dir, "run").summary("lfp")
    assert summary["status"] == "incomplete" and summary["records_written"] > 0


def test_finalize_unregisters_the_exit_handler(tmp_path):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1)
    mon.finalize()
    mon.session.abandon()  # what atexit would call: a finished session writes nothing more
    meta = tree(tmp_path / "r", "r").meta()
    assert meta["status"] == "completed"


# -- 2 and 3. kill -9 of rank 0 mid-run, then resume -------------------------------------

def test_kill_9_mid_run_leaves_only_whole_lines_and_a_resume_continues_the_history(
        tmp_path, model_cfg):
    run_dir = tmp_path / "runs" / "run"
    proc = script(run_dir, "forever")
    try:
        wait_ready(proc)
        train_log = tree(run_dir, "run").path()
        deadline = time.monotonic() + WAIT_S
        while len(train_log.read_bytes().splitlines()) < 8:
            assert time.monotonic() < deadline and proc.poll() is None, "no records came"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=WAIT_S)
    lines = every_file_parses(run_dir)
    assert lines[tree(run_dir, "run").layout.stream(TRAIN)] >= 8
    dead = read_records(train_log)
    resume_at = dead[3]["step"]  # a checkpoint in the middle of what the dead run logged
    assert dead[-1]["step"] > resume_at
    meta = tree(run_dir, "run").meta()
    assert "status" not in meta  # a segment that died says so by having no end

    with pytest.warns(RuntimeWarning, match=r"took over the lock .* pid \d+"):
        mon = CogVLAMonitoring(run_dir=run_dir, run_id="run", cfg=cogvla_cfg(
            monitor_log_interval=1, pruning_event_log_interval=1))
    model = build_tiny_cogvla(model_cfg, seed=0)
    mon.attach(model)
    train(mon, model, model_cfg, range(resume_at, resume_at + 4))
    mon.finalize()

    assert mon.session.first_step == resume_at
    meta = tree(run_dir, "run").meta()
    assert meta["resumed"] is True and meta["status"] == "completed"
    assert [s.get("first_step") for s in meta["segments"]] == [0, resume_at]
    for part in (TRAIN, *PARTS):
        stream = tree(run_dir, "run").records(part)
        marker = [r for r in stream if "resume" in r]
        assert len(marker) == 1 and marker[0]["resume"]["supersedes_from_step"] == resume_at
        live = [r for r in live_records(stream) if "metrics" in r]
        steps = [r["step"] for r in live]
        assert steps == sorted(set(steps)), part  # no step twice
        assert steps[-1] == resume_at + 3
        written = len(live)
        if part != TRAIN:
            detailed = tree(run_dir, "run").detailed(part)
            written += len([r for r in live_records(detailed) if "metrics" in r])
        summary = tree(run_dir, "run").summary(part)
        assert summary["records_written"] == written, part  # each live record once


def test_resume_drops_the_dead_segments_overlap_from_the_summary(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(ZeroDivisionError):
        with Monitor(run_dir=run_dir, run_id="r", log_interval=2) as mon:
            for step in range(10):  # records 0..8; the run dies at step 9
                with mon.step(step) as h:
                    h.log(loss=100.0 + step)  # the dead segment's values: 100+
            raise ZeroDivisionError("division by zero (an injected crash)")
    mon = Monitor(run_dir=run_dir, run_id="r", log_interval=2)
    for step in range(6, 12):  # resumed from the checkpoint of step 6
        with mon.step(step) as h:
            h.log(loss=float(step))
    mon.finalize()
    stream = tree(run_dir, "r").records()
    assert [r["step"] for r in stream if "metrics" in r] == [0, 2, 4, 6, 8, 6, 8, 10, 11]
    assert stream[5]["resume"] == {"segment": 2, "supersedes_from_step": 6,
                                   "superseded_lines": 2}
    assert [r["step"] for r in live_records(stream)] == [0, 2, 4, 6, 8, 10, 11]
    summary = tree(run_dir, "r").summary()
    loss = summary["metrics"]["train"]["loss"]
    assert summary["records_written"] == 7 and loss["records"] == 7
    assert (loss["first"], loss["last"], loss["max"]) == (100.0, 11.0, 103.5)
    meta = tree(run_dir, "r").meta()
    assert [(s["first_step"], s["status"]) for s in meta["segments"]] == [
        (0, "failed"), (6, "completed")]


def test_first_step_is_the_schedulers_first_step(tmp_path):
    session = MonitorSession(tmp_path / "r", "r")
    assert session.first_step is None
    session.scheduler.advance(40)
    session.scheduler.advance(41)
    assert session.first_step == session.scheduler.first_step == 40
    session.close()
    mon = Monitor(run_dir=tmp_path / "m", run_id="m", log_interval=5, console=False)
    assert mon.session.first_step is None
    for step in range(7, 9):  # a resumed run starts at a later step
        with mon.step(step) as h:
            h.log(loss=1.0)
    assert mon.session.first_step == mon.session.scheduler.first_step == 7
    mon.finalize()


# -- 4. non-finite values ---------------------------------------------------------------

def poison(module, active):
    """What the monitor's hook on ``module`` sees gets a NaN while ``active()``; the model
    itself still gets the clean output (the stand-in, like CogVLA, raises on NaN tokens).

    Registers the poisoning hook now (before ``attach``); returns the restoring hook, to
    register after ``attach``.
    """
    stash = {}

    def before(mod, args, out):
        if active():
            stash["clean"], bad = out, out.clone()
            bad.view(-1)[0] = float("nan")
            return bad
        return None

    def after(mod, args, out):
        return stash.pop("clean", None)

    module.register_forward_hook(before)
    return after


def test_nonfinite_values_anywhere_are_counted_alerted_once_and_training_goes_on(
        tmp_path, model_cfg):
    model = build_tiny_cogvla(model_cfg, seed=0)
    scale = next(m for n, m in model.named_modules() if n.endswith("blocks.0.scale"))
    router = moe_router_of(model)
    now = {"step": 0}
    bad = lambda: now["step"] >= 2  # noqa: E731 - gamma and router logits from step 2 on
    restore = {m: poison(m, bad) for m in (scale, router)}
    mon = CogVLAMonitoring(run_dir=tmp_path / "r", run_id="r", cfg=cogvla_cfg())
    mon.attach(model)
    for module, hook in restore.items():
        module.register_forward_hook(hook)
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        now["step"] = step
        with torch.no_grad():
            out = model(**synthetic_batch(model_cfg, batch_size=1, generator=gen))
        mon.log_step(step)
        with mon.step(step) as h:  # the loss is NaN at steps 2 and 3
            h.log(loss=out.loss * float("nan") if step in (2, 3) else out.loss, lr=1e-3)
    mon.finalize()
    film = [r["metrics"] for r in tree(tmp_path / "r", "r").metric_records("film")]
    gamma = next(v for k, v in film[-1].items() if k.endswith("/gamma") and v["nonfinite"])
    assert gamma["count"] > 0 and gamma["mean"] is not None  # NaN kept out of the moments
    train_log = tree(tmp_path / "r", "r").records()
    # records 0, 2 (steps 1-2), 4 (3-4), 6 (5-6), 7 (finalize)
    assert [r["metrics"]["loss"]["nonfinite"] for r in train_log if "metrics" in r] == [
        0, 1, 1, 0, 0]
    for part in (TRAIN, "film", "moe"):
        alerts = [r["alert"] for r in tree(tmp_path / "r", "r").records(part)
                  if "alert" in r and r["alert"]["type"] == "nonfinite"]
        assert alerts, part
        keys = [(a.get("mode") or a.get("stream"), a["metric"]) for a in alerts]
        assert len(keys) == len(set(keys)), part  # the first time only
    alerts = [r for r in train_log if "alert" in r]
    assert len(alerts) == 1 and alerts[0]["step"] == 2 and alerts[0]["alert"] == {
        "type": "nonfinite", "mode": "train", "metric": "loss", "nonfinite": 1, "count": 1,
        "nonfinite_ranks": [0]}
    summary = tree(tmp_path / "r", "r").summary()
    assert summary["status"] == "completed" and summary["alerts"][0]["alert"]["metric"] == "loss"
    moe = tree(tmp_path / "r", "r").summary("moe")
    assert any(a["alert"]["type"] == "nonfinite" for a in moe["alerts"])


# -- 5. bad input -----------------------------------------------------------------------

@pytest.mark.parametrize("bad, error, match", [
    ({"monitor_log_interval": 0}, ValueError, "monitor_log_interval must be > 0, got 0"),
    ({"pruning_event_log_interval": -3}, ValueError, "pruning_event_log_interval must be > 0"),
    ({"detailed_log_interval": 2.5}, TypeError, "detailed_log_interval must be a Python int"),
    ({"detailed_log_interval": -5}, ValueError, "detailed_log_interval must be > 0"),
    ({"pruning_event_log_interval": 2.5}, TypeError, "pruning_event_log_interval must be"),
    ({"film_sample_layers": [0, 0]}, ValueError, "duplicates"),
    ({"film_sample_layers": "0,9"}, TypeError, "list of ints"),
    ({"film_sample_layers": [0.5]}, TypeError, "must hold ints"),
    ({"film_sample_layers": []}, ValueError, "at least one block"),
    ({"moe_collapse_threshold": "0.9"}, TypeError, "moe_collapse_threshold must be a number"),
    ({"enable_lfp_monitor": "yes"}, TypeError, "enable_lfp_monitor must be a bool"),
    ({"moe_collapse_threshold": 1.5}, ValueError, "moe_collapse_threshold must be in"),
])  # the facade's settings, each checked once where it is owned
def test_bad_config_is_refused_naming_the_field(bad, error, match):
    with pytest.raises(error, match=match):
        cogvla_cfg(**bad)


@pytest.mark.parametrize("build", [Monitor, CogVLAMonitoring])
@pytest.mark.parametrize("run_id, match", [
    ("a/b", "must not contain"), ("..", "must not contain"), ("../x", "must not contain"),
    ("x/../y", "must not contain"), ("a\\b", "must not contain"), ("a\0b", "must not contain"),
    ("", "run_id must be a non-empty string"),
])
def test_a_run_id_that_is_not_one_path_component_is_refused(tmp_path, build, run_id, match):
    with pytest.raises(ValueError, match=match):
        build(run_dir=tmp_path / "r", run_id=run_id)
    assert list(tmp_path.iterdir()) == []


def test_a_run_dir_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="run_dir must be a directory, but .* is a file"):
        Monitor(run_dir=tmp_path / "f", run_id="r")
    with pytest.raises(ValueError, match="cannot be created: .*/f' above it is a file"):
        Monitor(run_dir=tmp_path / "f" / "deeper" / "r", run_id="r")
    assert (tmp_path / "f").read_text() == "x"


def test_bad_log_values_and_attach_targets_name_what_is_wrong(tmp_path):
    mon = CogVLAMonitoring(run_dir=tmp_path / "runs" / "r", run_id="r", cfg=cogvla_cfg())
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got dict"):
        mon.attach({"model": 1})
    with mon.step(0) as h:
        for value, match in [("0.5", "'loss': expected a number"),
                             (1 + 2j, "'loss': complex"),
                             (torch.tensor([1j]), "'loss': complex tensors"),
                             ([1.0], "'loss': expected a number")]:
            with pytest.raises(TypeError, match=match):
                h.log(loss=value)
        h.log(loss=1.0)
    mon.finalize()


def test_nothing_is_ever_written_outside_run_dir(tmp_path, model_cfg):
    run_dir = tmp_path / "runs" / "r"
    model = build_tiny_cogvla(model_cfg, seed=0)
    with CogVLAMonitoring(run_dir=run_dir, run_id="r", cfg=cogvla_cfg()) as mon:
        mon.attach(model)
        train(mon, model, model_cfg, range(5))
    outside = [p for p in tmp_path.rglob("*") if run_dir not in (p, *p.parents)]
    assert outside == [tmp_path / "runs"]


# -- 6. the disk fails on rank 0 --------------------------------------------------------

@pytest.mark.distributed
def test_a_failing_disk_on_rank0_degrades_the_monitor_and_changes_no_collective(tmp_path):
    run_dir = tmp_path / "run"
    out = run_world(reliability_workers.disk_fails_on_rank0, 2, tmp_path, timeout=90,
                    run_dir=str(run_dir), steps=8, fail_from=3, fail_until=6)
    assert out[0]["deltas"] == out[1]["deltas"]  # the same collectives, step by step
    assert out[0]["degraded"] and not out[1]["degraded"]
    assert len(out[0]["warnings"]) == 1 and "No space left on device" in out[0]["warnings"][0]
    assert "[ENOSPC]" not in out[0]["warnings"][0] and "ENOSPC" in out[0]["warnings"][0]
    assert out[1]["warnings"] == []
    every_file_parses(run_dir)
    # the records written during steps 3-5 were lost with the disk (with an interval of 1,
    # each is written at the next step's first call: those of steps 2-4); the records
    # resume once it comes back
    assert [r["step"] for r in tree(run_dir, "disk").metric_records()] == [
        0, 1, 5, 6, 7]
    meta = tree(run_dir, "disk").meta()
    assert meta["degraded"] is True and meta["write_errors"] == 3
    assert "disk.jsonl: [ENOSPC] No space left on device" in meta["first_write_error"]
    summary = tree(run_dir, "disk").summary()
    assert summary["status"] == "completed" and summary["degraded"] is True
    assert summary["records_written"] == 5  # the records that reached the disk, not 8


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc (read-only)")
def test_a_run_dir_that_cannot_be_created_degrades_and_training_goes_on():
    with pytest.warns(RuntimeWarning, match=r"cannot write /proc/.*ENOENT.* degraded") as caught:
        mon = Monitor(run_dir="/proc/no-such-monitor-run/run", run_id="r", log_interval=1)
        for step in range(3):
            with mon.step(step) as h:
                h.log(loss=1.0)
        mon.finalize()
    assert len(caught) == 1 and mon.session.degraded


def test_a_line_cut_short_by_a_full_disk_is_removed_before_the_next_record(
        tmp_path, monkeypatch):
    from monitor import sinks

    real = sinks._append

    def half_then_full(path, data):
        real(path, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1)
    with mon.step(0) as h:
        h.log(loss=0.0)
    monkeypatch.setattr(sinks, "_append", half_then_full)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        with mon.step(1) as h:
            h.log(loss=1.0)
    monkeypatch.setattr(sinks, "_append", real)
    with mon.step(2) as h:
        h.log(loss=2.0)
    mon.finalize()
    # record 0 is written at step 1's first call, cut short there and removed before
    # record 1 (written at step 2's)
    assert [r["step"] for r in tree(tmp_path / "r", "r").records()] == [1, 2]


@pytest.mark.distributed
def test_a_failing_disk_on_rank0_under_the_cogvla_facade_changes_no_collective(tmp_path):
    run_dir = tmp_path / "run"
    out = run_world(reliability_workers.facade_disk_fails_on_rank0, 2, tmp_path, timeout=120,
                    run_dir=str(run_dir), steps=6, fail_from=2, fail_until=4)
    assert out[0]["deltas"] == out[1]["deltas"] and sum(out[0]["deltas"]) > 0
    assert out[0]["degraded"] and len(out[0]["warnings"]) == 1 and out[1]["warnings"] == []
    every_file_parses(run_dir)
    for part in (TRAIN, *PARTS):
        steps = [r["step"] for r in tree(run_dir, "disk").metric_records(part)]
        assert steps == [0, 3, 4, 5], part  # records 1, 2 were written at steps 2, 3
        summary = tree(run_dir, "disk").summary(part)
        assert summary["degraded"] is True and summary["status"] == "completed", part


def read_only_folder(rank, world_size, steps, read_only_from, writable_from):
    """A whole run in a folder that turns read-only mid-run (as an unprivileged user)."""
    import pwd
    import shutil
    import tempfile

    def chmod_tree(root, dirs, files):
        for path in [root, *root.rglob("*")]:
            os.chmod(path, dirs if path.is_dir() else files)

    warm = Monitor(run_dir=tempfile.mkdtemp(), run_id="warm", log_interval=1)
    with warm.step(0) as h:  # load whatever loads lazily while still root
        h.log(loss=1.0)
    warm.finalize()
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    as_root = os.geteuid() == 0
    if as_root:  # root ignores permissions: act as nobody (the effective uid only)
        os.chown(base, pwd.getpwnam("nobody").pw_uid, -1)
        os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        run_dir = base / "run"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mon = Monitor(run_dir=run_dir, run_id="ro", log_interval=1)
            for step in range(steps):
                if step == read_only_from:
                    chmod_tree(run_dir, 0o555, 0o444)
                if step == writable_from:
                    chmod_tree(run_dir, 0o755, 0o644)
                with mon.step(step) as h:
                    h.log(loss=float(step))
            mon.finalize()
        lines = every_file_parses(run_dir)
        steps_written = [r["step"] for r in tree(run_dir, "ro").metric_records()]
        meta = tree(run_dir, "ro").meta()
    finally:
        if as_root:
            os.seteuid(0)
        shutil.rmtree(base)
    return {"warnings": [str(w.message) for w in caught], "steps": steps_written,
            "meta": meta, "lines": lines}


def test_a_folder_that_turns_read_only_mid_run_loses_only_what_came_meanwhile(tmp_path):
    out, = run_world(read_only_folder, 1, tmp_path, init=False, steps=9, read_only_from=3,
                     writable_from=6)
    assert len(out["warnings"]) == 1 and "Permission denied" in out["warnings"][0]
    assert out["steps"] == [0, 1, 5, 6, 7, 8]  # each written at the next step's first call
    assert out["meta"]["degraded"] is True and out["meta"]["status"] == "completed"
    assert out["meta"]["write_errors"] == 3 and "EACCES" in out["meta"]["first_write_error"]


# -- 7. a rank dies ---------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("how, message", [("exit", "Connection"),
                                          ("stuck", "Timed out")])
def test_when_a_rank_dies_the_survivors_flush_fails_with_the_groups_error(
        tmp_path, how, message):
    # group timeout 5 s; a survivor still blocked at the 60 s deadline fails the test
    out = run_world(reliability_workers.rank_dies, 2, tmp_path, timeout=60, group_timeout=5,
                    may_die=(1,), run_dir=str(tmp_path / "run"), how=how)
    seen = out[0]
    assert seen["is_runtime_error"] and message in seen["message"], seen
    assert (seen["meta_status"], seen["meta_error"]) == ("failed", seen["type"])


# -- 8. concurrency ---------------------------------------------------------------------

def test_a_second_process_on_the_same_run_dir_gets_a_clear_error(tmp_path):
    run_dir = tmp_path / "runs" / "run"
    holder = script(run_dir, "hold")
    try:
        wait_ready(holder)
        with pytest.raises(RunDirLockedError, match=rf"in use by another process \(pid "
                                                    rf"{holder.pid} on .*run_id 'run'\)"):
            Monitor(run_dir=run_dir, run_id="other")
    finally:
        holder.kill()
        holder.communicate(timeout=WAIT_S)
    assert not tree(run_dir, "other").path().exists()


def test_a_forked_child_of_a_killed_writer_does_not_keep_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = script(run_dir, "hold_fork")
    child = int(wait_ready(holder)[0])
    try:
        os.kill(holder.pid, signal.SIGKILL)  # the child (a DataLoader worker, say) lives on
        holder.wait(timeout=WAIT_S)
        with pytest.warns(RuntimeWarning, match=f"took over the lock .* pid {holder.pid}"):
            mon = Monitor(run_dir=run_dir, run_id="run")
        mon.finalize()
    finally:
        os.kill(child, signal.SIGKILL)
        holder.communicate(timeout=WAIT_S)  # the child held the pipes: read them to the end


def test_sessions_of_one_process_share_the_lock_and_the_last_one_releases_it(tmp_path):
    train = Monitor(run_dir=tmp_path / "r", run_id="train")
    evals = Monitor(run_dir=tmp_path / "r", run_id="eval", participation="local")
    train.finalize()
    assert lock_file(tmp_path / "r").exists()
    evals.finalize()
    assert not lock_file(tmp_path / "r").exists()


@pytest.mark.slow
def test_two_runs_in_one_runs_folder_never_touch_each_others_files(tmp_path):
    runs = tmp_path / "runs"
    procs = [script(runs / name, "exit_clean", run_id=name) for name in ("a", "b")]
    for proc in procs:
        proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0
    for name in ("a", "b"):
        files = [p.name for p in (runs / name).rglob("*") if p.is_file()]
        assert files and all(f.startswith(name) for f in files), files
        every_file_parses(runs / name)
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b"]
