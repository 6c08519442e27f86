"""Issue 12: threads, file modes, exit status, a process group gone before ``finalize()``,
and bad input, each with its promised outcome (real threads, a real umask, real processes,
a real gloo world)."""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import threading

import pytest
import reliability_workers
import torch
from harness import run_world
from test_reliability import SCRIPT, WAIT_S, script
from tree import lock_file, tree

from monitor import Monitor
from monitor.layout import TRAIN, RunLayout
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.sinks import RunDirLockedError

assert SCRIPT.exists()


# -- threads ----------------------------------------------------------------------------

def test_four_threads_logging_into_one_step_context_count_every_value_once(tmp_path):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1, console=False)

    def log_many(handle, n):
        for i in range(n):
            handle.log(loss=1.0, extra={"t": torch.tensor(float(i % 2))})

    with mon.step(0) as h:
        threads = [threading.Thread(target=log_many, args=(h, 2000)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    mon.finalize()
    (rec,) = tree(tmp_path / "r", "r").records()
    assert rec["metrics"]["loss"]["count"] == 8000
    assert rec["metrics"]["t"]["count"] == 8000
    assert rec["metrics"]["t"]["mean"] == pytest.approx(0.5, abs=1e-12)


def test_threads_entering_step_contexts_of_one_step_count_every_value_once(tmp_path):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=10, console=False)

    def contexts(n):
        for _ in range(n):
            with mon.step(3) as h:
                h.log(loss=2.0)

    threads = [threading.Thread(target=contexts, args=(500,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mon.finalize()
    (rec,) = tree(tmp_path / "r", "r").records()
    assert rec["step"] == 3 and rec["metrics"]["loss"]["count"] == 2000


# -- file modes -------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_every_file_and_folder_the_monitor_creates_honours_the_umask(tmp_path, umask):
    from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

    model_cfg = TinyCogVLAConfig(image_size=16)
    model = build_tiny_cogvla(model_cfg, seed=0)
    run_dir = tmp_path / "runs" / "r"
    old = os.umask(umask)
    try:
        mon = CogVLAMonitoring(run_dir=run_dir, run_id="r", cfg=CogVLAMonitoringConfig(
            monitor_log_interval=1, pruning_event_log_interval=1, detailed_log_interval=1,
            film_sample_layers=[0], console=False))
        mon.attach(model)
        lock_mode = stat.S_IMODE(lock_file(run_dir).stat().st_mode)
        for step in range(2):
            mon.log_step(step)
            with torch.no_grad():
                model(**synthetic_batch(model_cfg, batch_size=1))
            with mon.step(step) as h:
                h.log(loss=1.0)
        mon.finalize()
    finally:
        os.umask(old)
    assert lock_mode == 0o666 & ~umask
    modes = {str(p.relative_to(run_dir)): stat.S_IMODE(p.stat().st_mode)
             for p in run_dir.rglob("*")}
    files = {p: m for p, m in modes.items() if not (run_dir / p).is_dir()}
    assert len(files) == 3 + 3 * 4  # meta, summary and JSONL; 3 files per observer
    assert set(files.values()) == {0o666 & ~umask}, files
    assert {m for p, m in modes.items() if p not in files} == {0o777 & ~umask}


# -- exit status ------------------------------------------------------------------------

@pytest.mark.parametrize("mode, code", [("sysexit_1", 1), ("with_sysexit_3", 3)])
def test_sys_exit_with_a_nonzero_code_is_a_failed_run_naming_the_code(tmp_path, mode, code):
    run_dir = tmp_path / "run"
    proc = script(run_dir, mode)  # without finalize() (the exit handler) / the with form
    proc.communicate(timeout=WAIT_S)
    assert proc.returncode == code
    meta = tree(run_dir, "run").meta()
    assert (meta["status"], meta["error"]) == ("failed", f"SystemExit({code})")
    for part in (TRAIN, "lfp"):
        summary = tree(run_dir, "run").summary(part)
        assert (summary["status"], summary["error"]) == ("failed", f"SystemExit({code})")


@pytest.mark.parametrize("code", [0, None])
def test_sys_exit_0_leaving_the_with_block_is_a_normal_exit(tmp_path, code):
    with pytest.raises(SystemExit):
        with Monitor(run_dir=tmp_path / "r", run_id="r", console=False) as mon:
            with mon.step(0) as h:
                h.log(loss=1.0)
            sys.exit(code)
    meta = tree(tmp_path / "r", "r").meta()
    assert (meta["status"], meta["error"]) == ("incomplete", None)  # as an exit without it


# -- finalize() after destroy_process_group() --------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("facade", [False, True])
def test_finalize_after_destroy_process_group_completes_with_rank_local_values(
        tmp_path, facade):
    run_dir = tmp_path / "run"
    out = run_world(reliability_workers.finalize_after_destroy, 2, tmp_path, timeout=90,
                    teardown=False, run_dir=str(run_dir), facade=facade)
    for caught in out:
        assert len(caught) == 1 and "finalize() before destroy_process_group()" in caught[0]
    records = tree(run_dir, "gone").records()
    assert [r["step"] for r in records] == [0, 2, 4, 5]
    assert [r["metrics"]["loss"]["count"] for r in records] == [2, 4, 4, 1]
    assert [r.get("rank_local") for r in records] == [None] * 3 + [
        {"rank": 0, "reason": "process group destroyed before finalize()"}]
    assert records[-1]["metrics"]["loss"]["max"] == 5.0  # rank 0's step 5 only
    meta = tree(run_dir, "gone").meta()
    summary = tree(run_dir, "gone").summary()
    assert meta["status"] == summary["status"] == "completed" and meta["error"] is None
    assert summary["records_written"] == 4


# -- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"log_interval": None}, TypeError, "log_interval must be a Python int, got NoneType"),
    ({"participation_timeout": math.inf}, ValueError,
     "participation_timeout must be a finite number of seconds > 0, got inf"),
    ({"participation_timeout": "5"}, TypeError,
     r"participation_timeout must be a number of seconds \(int or float\), got str '5'"),
    ({"tensorboard": "yes"}, TypeError, "tensorboard must be a bool, got 'yes'"),
    ({"wandb": "no"}, TypeError, "wandb must be a bool or None, got 'no'"),
    ({"console": 1}, TypeError, "console must be a bool, got 1"),
    ({"run_dir": ""}, ValueError, "run_dir must name a folder, got ''"),
    ({"run_id": "x" * 245}, ValueError, r"run_id must be at most \d+ bytes, .* got 245 bytes"),
    ({"config": [1, 2]}, TypeError, "config must be a mapping or None, got list"),
])
def test_bad_monitor_arguments_are_refused_naming_the_argument(tmp_path, kwargs, error,
                                                               match):
    args = {"run_dir": tmp_path / "r", "run_id": "r", **kwargs}
    with pytest.raises(error, match=match):
        Monitor(**args)
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


def test_session_config_that_is_not_a_mapping_is_refused(tmp_path):
    from monitor.session import MonitorSession

    with pytest.raises(TypeError, match="config must be a mapping or a dataclass, got list"):
        MonitorSession(tmp_path / "r", "r", config=[1, 2])
    assert list(tmp_path.iterdir()) == []


def test_the_longest_run_id_allowed_writes_every_file(tmp_path):
    suffix = RunLayout("x").longest_name() - 1  # what the longest name adds to the run id
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") - suffix
    run_id = "x" * limit
    with CogVLAMonitoring(run_dir=tmp_path / "r", run_id=run_id, cfg=CogVLAMonitoringConfig(
            console=False)) as mon:
        with mon.step(0) as h:
            h.log(loss=1.0)
    assert not mon.session.degraded
    assert tree(tmp_path / "r", run_id).path("summary").exists()
    assert tree(tmp_path / "r", run_id).path("detailed", "lfp").exists()
    with pytest.raises(ValueError, match=f"run_id must be at most {limit} bytes"):
        Monitor(run_dir=tmp_path / "s", run_id=run_id + "x")
    with pytest.raises(ValueError, match=f"run_id must be at most {limit} bytes"):
        Monitor(run_dir=tmp_path / "s", run_id="é" * (limit // 2 + 1))  # bytes, not chars


@pytest.mark.parametrize("value, error, match", [
    (10**400, ValueError, "'loss': expected a number that fits in a float64 .* got an int "
                          "of 401 digits"),
    (torch.tensor([1.0, 0.0]).to_sparse(), TypeError,
     r"'loss': expected a dense \(strided\) tensor, got layout torch.sparse_coo"),
    (torch.empty(3, device="meta"), TypeError, "'loss': a tensor on the meta device has no "
                                               "values"),
])
def test_bad_log_values_are_refused_naming_the_metric(tmp_path, value, error, match):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1, console=False)
    with mon.step(0) as h:
        with pytest.raises(error, match=match):
            h.log(loss=value)
        h.log(loss=float(10**300))  # a big int that fits is a number
    mon.finalize()
    (rec,) = tree(tmp_path / "r", "r").records()
    assert rec["metrics"]["loss"]["count"] == 1


# -- one live monitor per run folder -----------------------------------------------------

def test_a_second_live_monitor_on_one_run_folder_and_id_is_refused_naming_the_first(
        tmp_path):
    run_dir = tmp_path / "r"
    first = Monitor(run_dir=run_dir, run_id="r", log_interval=1, console=False)
    with first.step(0) as h:
        h.log(loss=1.0)
    here = rf"built at {__file__}:\d+"
    with pytest.raises(RunDirLockedError, match=rf"run_id 'r' is already written by a live "
                                                rf"monitor of this process \({here}\)"):
        Monitor(run_dir=run_dir, run_id="r")
    with pytest.raises(RunDirLockedError, match=here):
        CogVLAMonitoring(run_dir=tmp_path / "." / "r", run_id="r")  # the same folder
    other = Monitor(run_dir=run_dir, run_id="eval", participation="local")  # another id
    other.finalize()
    first.finalize()
    again = Monitor(run_dir=run_dir, run_id="r", console=False)  # after the end: a resume
    assert again.session.resumed
    again.finalize()
    assert [r["step"] for r in tree(run_dir, "r").records()] == [0]


def test_a_monitor_dropped_without_finalize_does_not_block_the_next(tmp_path):
    Monitor(run_dir=tmp_path / "r", run_id="r", console=False)  # dropped at once
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", console=False)
    mon.finalize()


# -- the disk: what the summary counts, a disk that stays full ---------------------------

def full_disk(monkeypatch, appends_fail: set[int]) -> None:
    """The disk fills up at the first record labelled with a step in ``appends_fail``
    and stays full: from then on no new file can be made (``_replace``'s temporary file
    fails with ENOSPC: it needs new blocks); the appends of those records fail and the
    others go through (the JSONL's last block still has room)."""
    import errno

    from monitor import sinks

    real_append, real_replace = sinks._append, sinks._replace
    full = {"since": False}

    def no_space():
        raise OSError(errno.ENOSPC, "No space left on device")

    def append(path, data):
        if json.loads(data)["step"] in appends_fail:
            full["since"] = True
            no_space()
        real_append(path, data)

    def replace(*args, **kwargs):
        if full["since"]:
            no_space()
        real_replace(*args, **kwargs)

    monkeypatch.setattr(sinks, "_replace", replace)
    monkeypatch.setattr(sinks, "_append", append)


def test_a_disk_that_stays_full_still_gets_degraded_and_the_final_status_into_meta(
        tmp_path, monkeypatch):
    run_dir = tmp_path / "r"
    meta_path = tree(run_dir, "r").path("meta")
    mon = Monitor(run_dir=run_dir, run_id="r", log_interval=1, console=False)
    seen = []  # after each step: (the steps on disk, what meta on disk says of degraded)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        full_disk(monkeypatch, appends_fail={2, 3, 4})
        for step in range(9):
            with mon.step(step) as h:
                h.log(loss=float(step))
            on_disk = [r["step"] for r in tree(run_dir, "r").records()]
            seen.append((on_disk, json.loads(meta_path.read_text())["degraded"]))
        mon.finalize()
    # meta says degraded from the first record that reached the disk after the failures
    # (record 5), although no new file could be made since the start
    assert [degraded for _, degraded in seen] == [5 in steps for steps, _ in seen]
    assert seen[-1][1] is True  # before finalize()
    records = tree(run_dir, "r").records()
    assert [r["step"] for r in records] == [0, 1, 5, 6, 7, 8]
    meta = json.loads(meta_path.read_text())
    assert (meta["status"], meta["degraded"]) == ("completed", True)
    assert meta["write_errors"] == 3  # the three appends (the meta rewrites went in place)
    summary = tree(run_dir, "r").summary()
    assert (summary["status"], summary["degraded"]) == ("completed", True)
    assert summary["records_written"] == 6  # what reached the disk, not the 9 built
    assert summary["metrics"]["train"]["loss"]["records"] == 6


def _mount_tmpfs(path, size: str) -> bool:
    import subprocess

    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_a_real_full_filesystem_keeps_every_line_whole_and_meta_gets_the_end(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("needs to mount a small tmpfs (root with CAP_SYS_ADMIN)")
    try:
        run_dir = disk / "r"
        mon = Monitor(run_dir=run_dir, run_id="r", log_interval=1, console=False)
        jsonl = tree(run_dir, "r").path()
        first = 0
        while not jsonl.read_bytes():  # until a record is on disk (its page is allocated)
            with mon.step(first) as h:
                h.log(loss=float(first), extra={f"m{i}": 1.0 for i in range(3)})
            first += 1
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last byte
            with pytest.raises(OSError, match="No space left"):
                while True:
                    f.write(b"\0" * 512)
        with pytest.warns(RuntimeWarning, match="No space left on device"):
            for step in range(first, 120):  # ~300-byte records: the JSONL's page fills up
                with mon.step(step) as h:
                    h.log(loss=float(step), extra={f"m{i}": 1.0 for i in range(3)})
            mon.finalize()
        lines = tree(run_dir, "r").path().read_bytes().splitlines(keepends=True)
        assert all(line.endswith(b"\n") for line in lines)
        records = [json.loads(line) for line in lines]
        steps = [r["step"] for r in records]
        assert steps == list(range(len(steps))) and 1 < len(steps) < 120
        meta = tree(run_dir, "r").meta()
        assert (meta["status"], meta["degraded"]) == ("completed", True)
        summary = tree(run_dir, "r").summary()
        assert summary["status"] == "completed" and summary["records_written"] == len(steps)
    finally:
        if "mon" in locals():
            mon.session.close()  # a failed assertion must not leave the lock's fd open
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
