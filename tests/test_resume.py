"""Issue 12: a resumed run whose folder was damaged (meta gone, garbage or of the wrong
shape; malformed lines in a stream) still resumes, never crashes training, and reads back
with every step once."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from tree import tree

import monitor
from monitor import Monitor
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch


def first_run(run_dir):
    """Records 0..9 (interval 1), then a clean end."""
    with Monitor(run_dir=run_dir, run_id="r", log_interval=1, console=False) as mon:
        for step in range(10):
            with mon.step(step) as h:
                h.log(loss=100.0 + step)


def resume(run_dir, steps=None):
    """The run again from the checkpoint of step 5."""
    steps = range(5, 15) if steps is None else steps
    mon = Monitor(run_dir=run_dir, run_id="r", log_interval=1, console=False)
    for step in steps:
        with mon.step(step) as h:
            h.log(loss=float(step))
    mon.finalize()
    return mon


def meta_of(run_dir) -> dict:
    return tree(run_dir, "r").meta()


def assert_one_history(run_dir, segment: int):
    stream = tree(run_dir, "r").records()
    markers = [r["resume"] for r in stream if "resume" in r]
    assert markers == [{"segment": segment, "supersedes_from_step": 5, "superseded_lines": 5}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = monitor.read_run(run_dir)
    steps = [r["step"] for r in run["train"].records]
    assert steps == list(range(15))  # every step once: 0..4 of the first run, then 5..14
    assert [r["metrics"]["loss"]["mean"] for r in run["train"].records][4:6] == [104.0, 5.0]
    summary = run["train"].summary
    assert summary["status"] == "completed" and summary["records_written"] == 15
    meta = meta_of(run_dir)
    assert meta["resumed"] is True and meta["status"] == "completed"
    assert len(meta["segments"]) == segment and meta["segments"][-1]["first_step"] == 5


@pytest.mark.parametrize("damage, problem", [
    (None, "missing"),
    (b"\x00\xffnot json at all", r"unreadable \(not a JSON object\)"),
    (b"[1, 2]", r"unreadable \(not a JSON object\)"),
    (b'"a string"', r"unreadable \(not a JSON object\)"),
    (b'{"segments": 5}', r"of the wrong shape \('segments' is a int\)"),
    (b'{"segments": "ab"}', r"of the wrong shape \('segments' is a str\)"),
])
def test_a_folder_with_records_is_a_resume_whatever_meta_says(tmp_path, damage, problem):
    run_dir = tmp_path / "r"
    first_run(run_dir)
    meta_path = tree(run_dir, "r").path("meta")
    if damage is None:
        meta_path.unlink()
    else:
        meta_path.write_bytes(damage)
    with pytest.warns(RuntimeWarning, match=rf"{re.escape(meta_path.name)}: meta is {problem}; "
                                            "the folder already holds this run's records"
                      ) as caught:
        resume(run_dir)
    assert len([w for w in caught if "meta is" in str(w.message)]) == 1
    assert_one_history(run_dir, segment=2)  # the unknown earlier ones, then this one
    assert meta_of(run_dir)["segments"][0] == {"start_time": None, "pid": None,
                                               "first_step": None, "status": "unknown",
                                               "rebuilt": True}


def test_readable_earlier_segments_are_kept_when_one_entry_is_damaged(tmp_path):
    run_dir = tmp_path / "r"
    first_run(run_dir)
    meta_path = tree(run_dir, "r").path("meta")
    meta = json.loads(meta_path.read_text())
    meta["segments"] = [7, *meta["segments"]]
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(RuntimeWarning, match="an entry of 'segments' is not an object"):
        resume(run_dir)
    assert_one_history(run_dir, segment=2)
    assert meta_of(run_dir)["segments"][0]["status"] == "completed"  # the first run's


def test_an_unreadable_meta_without_records_is_replaced_and_the_run_starts_anew(tmp_path):
    run_dir = tmp_path / "r"
    tree(run_dir, "r").folder().mkdir(parents=True)
    tree(run_dir, "r").path("meta").write_text("{")
    tree(run_dir, "r").path().write_text("")
    with pytest.warns(RuntimeWarning, match="meta is unreadable .*; it is replaced"):
        mon = resume(run_dir, range(3))
    assert not mon.session.resumed and meta_of(run_dir)["resumed"] is False
    assert [r["step"] for r in tree(run_dir, "r").records()] == [0, 1, 2]


BAD_LINES = [
    b'{"foo": 1}',  # valid JSON of the wrong shape
    b'{"step": "3", "mode": "train", "metrics": {}}',  # a step that is a string
    b"[1, 2, 3]",  # an array
    b"\xff\xfe\x00\x01 binary",  # not UTF-8
    b'{"step": 3, "mode": "train", "metrics": {"loss": {}}}',  # a value object with nothing
    b'{"step": 3, "mode": "train", "metrics": {"loss": {"mean": NaN, "std": 0, "min": 0, '
    b'"max": 0, "count": 1, "nonfinite": 0}}}',  # NaN, which the writer never writes
    b'{"step": 3, "mode": "train", "metrics": {"loss": {"mean": "x", "std": 0, "min": 0, '
    b'"max": 0, "count": 1, "nonfinite": 0}}}',  # a mean that is a string
]


@pytest.mark.parametrize("bad", BAD_LINES, ids=range(len(BAD_LINES)))
def test_a_malformed_line_never_crashes_the_resumed_training_nor_hides_good_records(
        tmp_path, bad):
    run_dir = tmp_path / "r"
    first_run(run_dir)
    stream = tree(run_dir, "r").path()
    lines = stream.read_bytes().splitlines(keepends=True)
    stream.write_bytes(b"".join(lines[:4]) + bad + b"\n" + b"".join(lines[4:]))  # line 5
    with pytest.warns(RuntimeWarning, match=r"r.jsonl:5: .*; skipped that line"):
        resume(run_dir)  # reads the stream at its first flush: warned, not raised
    assert_read_run_warns_once_and_shows_every_step(run_dir)


def assert_read_run_warns_once_and_shows_every_step(run_dir):
    with pytest.warns(RuntimeWarning, match=r"r.jsonl:5: .*; skipped that line") as caught:
        run = monitor.read_run(run_dir)
    assert len(caught) == 1
    assert [r["step"] for r in run["train"].records] == list(range(15))
    assert run["train"].summary["records_written"] == 15
    assert run.meta["status"] == "completed"


def test_a_malformed_line_in_an_observer_stream_never_crashes_the_resumed_facade(tmp_path):
    model_cfg = TinyCogVLAConfig(image_size=16)
    model = build_tiny_cogvla(model_cfg, seed=0)
    cfg = CogVLAMonitoringConfig(monitor_log_interval=1, pruning_event_log_interval=1,
                                 detailed_log_interval=2, film_sample_layers=[0],
                                 console=False)
    run_dir = tmp_path / "r"

    def train(steps):
        mon = CogVLAMonitoring(run_dir=run_dir, run_id="r", cfg=cfg)
        mon.attach(model)
        gen = torch.Generator().manual_seed(0)
        for step in steps:
            mon.log_step(step)
            with torch.no_grad():
                model(**synthetic_batch(model_cfg, batch_size=1, generator=gen))
            with mon.step(step) as h:
                h.log(loss=1.0)
        mon.finalize()

    train(range(4))
    names = (tree(run_dir, "r").layout.stream("lfp"), tree(run_dir, "r").layout.detailed("moe"))
    for name in names:
        path = run_dir / name
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(lines[0] + b'{"step": 1, "metrics": [1]}\n' + b"".join(lines[1:]))
    with pytest.warns(RuntimeWarning, match="(" + "|".join(map(re.escape, names)) + "):2: "
                                            "'metrics' is not an object") as caught:
        train(range(2, 6))
    assert len([w for w in caught if "skipped that line" in str(w.message)]) == 2
    with pytest.warns(RuntimeWarning, match="skipped that line"):
        run = monitor.read_run(run_dir)
    for part in ("train", "lfp", "film", "moe", "aggr"):
        assert [r["step"] for r in run[part].records] == list(range(6)), part
        assert run[part].summary["status"] == "completed", part
