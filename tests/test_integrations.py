"""Integrations: session listeners, TensorBoard, W&B (offline), the console line."""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
import warnings

import pytest
import torch
from tree import tensorboard_dir, tree
from wandb_helpers import wandb_history, wandb_offline

from monitor import Monitor, MonitorSession
from monitor.integrations import names
from monitor.integrations.tensorboard import histogram_fields
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch


class Recorder:
    def __init__(self):
        self.seen, self.closed = [], 0

    def publish(self, part, kind, record):
        self.seen.append((part, kind, record))

    def close(self):
        self.closed += 1


class Broken(Recorder):
    def publish(self, part, kind, record):
        raise OSError("disk full")


def train_steps(mon, steps, value=lambda s: float(s)):
    for step in steps:
        with mon.step(step) as h:
            h.log(loss=torch.tensor(value(step)), lr=1e-3)


def run_cogvla(tmp_path, steps=4, **cfg):
    model_cfg = TinyCogVLAConfig(image_size=16)
    model = build_tiny_cogvla(model_cfg, seed=0)
    mon = CogVLAMonitoring(run_dir=tmp_path / "r", run_id="r", cfg=CogVLAMonitoringConfig(
        monitor_log_interval=2, pruning_event_log_interval=2, detailed_log_interval=2,
        film_sample_layers=[0, 9], console=False, **cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon.attach(model)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        out = model(**synthetic_batch(model_cfg, batch_size=2, generator=gen))
        out.loss.backward()
        mon.log_step(step)
        with mon.step(step) as h:
            h.log(loss=out.loss.detach(), lr=1e-3 * (1 - step / steps))
    mon.finalize()
    return tmp_path / "r"


# -- the publication point --------------------------------------------------------------

def test_listeners_see_every_record_rank0_writes_and_are_closed_once(tmp_path):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=2, console=False)
    rec = Recorder()
    mon.session.add_listener(rec)
    train_steps(mon, range(5))
    with mon.step(4, mode="eval") as h:
        h.log(loss=0.5)
    mon.finalize()
    mon.finalize()
    written = tree(tmp_path / "r", "r").records()
    assert [r for _, _, r in rec.seen] == written
    assert [(p, k) for p, k, _ in rec.seen] == [("train", "train")] * 3 + [("train", "eval")]
    assert rec.closed == 1


def test_a_listener_that_raises_is_warned_once_and_dropped_training_goes_on(tmp_path):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1, console=False)
    broken, good = Broken(), Recorder()
    mon.session.add_listener(broken)
    mon.session.add_listener(good)
    with pytest.warns(RuntimeWarning, match="Broken.publish failed .*disk full.*turned off"):
        train_steps(mon, range(3))
    mon.finalize()
    assert mon.session.listeners == []
    assert len(good.seen) == 3 and good.closed == 1
    assert len(tree(tmp_path / "r", "r").records()) == 3


def test_add_listener_refuses_an_object_without_publish_and_close(tmp_path):
    session = MonitorSession(tmp_path / "r", "r")
    with pytest.raises(TypeError, match="publish.*close"):
        session.add_listener(lambda *a: None)


def test_monitor_on_a_shared_session_refuses_integration_arguments(tmp_path):
    session = MonitorSession(tmp_path / "r", "r")
    with pytest.raises(ValueError, match="add_integrations"):
        Monitor(session=session, tensorboard=True)


def test_observer_records_and_alerts_reach_listeners_with_their_part(tmp_path, monkeypatch):
    rec = Recorder()
    real_init = MonitorSession.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.add_listener(rec)

    monkeypatch.setattr(MonitorSession, "__init__", init)
    run_cogvla(tmp_path, steps=3)
    kinds = {(p, k) for p, k, _ in rec.seen}
    for part in ("lfp", "film", "moe", "aggr"):
        assert (part, "events") in kinds
        assert [r for p, k, r in rec.seen if p == part and k == "events"] == [
            r for r in tree(tmp_path / "r", "r").records(part) if "alert" not in r]
    assert ("lfp", "detailed") in kinds and ("train", "train") in kinds


def test_flat_names_end_in_a_field_and_the_compact_export_sums_nonfinite_counts():
    rec = {"step": 3, "metrics": {"loss": {"mean": 1.0, "std": 0.1, "min": 0.9, "max": 1.2,
                                           "count": 4, "nonfinite": 1},
                                  "lr": {"mean": None, "std": None, "min": None, "max": None,
                                         "count": 0, "nonfinite": 2}}}
    assert dict(names.scalars("train", "eval", rec)) == {
        "monitor/eval/loss/mean": 1.0, "monitor/eval/loss/std": 0.1,
        "monitor/eval/loss/min": 0.9, "monitor/eval/loss/max": 1.2,
        "monitor/eval/~record/nonfinite": 3}
    assert dict(names.scalars("train", "eval", rec, export_all=True)) == {
        "monitor/eval/loss/mean": 1.0, "monitor/eval/loss/std": 0.1,
        "monitor/eval/loss/min": 0.9, "monitor/eval/loss/max": 1.2,
        "monitor/eval/loss/nonfinite": 1, "monitor/eval/lr/nonfinite": 2}
    hist = {"edges": [0.0, 0.5, 1.0], "counts": [1, 2], "below": 0, "above": 3, "nonfinite": 0}
    rec = {"step": 3, "metrics": {"overall/p_keep": {"mean": 0.5}},
           "histograms": {"layer_08/p_keep": hist, "layer_09/p_keep": hist,
                          "other": {**hist, "edges": None}}}
    assert dict(names.scalars("lfp", "detailed", rec)) == {"monitor/lfp/overall/p_keep/mean": 0.5}
    assert [(n, h["counts"], h["above"]) for n, h in names.histograms("lfp", "detailed", rec)] \
        == [("monitor/lfp/~layers/p_keep/hist", [2, 4], 6)]  # summed over the layers
    assert [n for n, _ in names.histograms("lfp", "detailed", rec, export_all=True)] == [
        "monitor/lfp/layer_08/p_keep/hist", "monitor/lfp/layer_09/p_keep/hist"]
    fields = histogram_fields(hist)
    assert fields["bucket_limits"] == [0.0, 0.5, 1.0, 1.5]
    assert fields["bucket_counts"] == [0, 1, 2, 3] and fields["num"] == 6


VALUE = {"mean": 1.0, "std": 0.5, "min": 0.0, "max": 2.0, "count": 4, "nonfinite": 1}


@pytest.mark.parametrize("export_all", [False, True])
def test_no_two_values_share_a_name_whatever_the_metric_names(export_all):
    """``loss/min`` the metric and ``loss``'s min, ``~`` in a name, names that look like a
    combination or a per-layer key: every value gets its own name."""
    keys = ["loss", "loss/min", "loss/min/mean", "loss/mean", "a~b", "a%7Eb", "~layers/x",
            "~record", "layer_01/x", "layer_02/x", "overall/x", "p/layer_01/q", "step",
            "x/hist", "x/mean_hist"]
    rec = {"step": 0, "metrics": {k: dict(VALUE) for k in keys},
           "histograms": {k: {"edges": [0.0, 1.0], "counts": [1], "below": 0, "above": 0,
                              "nonfinite": 0} for k in keys}}
    for part, kind in (("train", "train"), ("lfp", "events")):
        out = [n for n, _ in names.scalars(part, kind, rec, export_all)]
        out += [n for n, _ in names.histograms(part, kind, rec, export_all)]
        out += [n for n, _ in names.layer_profiles(part, kind, rec, export_all)]
        out.append(names.step_key(part, kind))
        assert len(out) == len(set(out)), sorted(n for n in out if out.count(n) > 1)
        assert all(n.rsplit("/", 1)[1] in (*names.FIELDS, names.STEP) for n in out)
    assert "monitor/train/loss/min/mean" in dict(names.scalars("train", "train", rec))
    assert "monitor/train/loss/min" in dict(names.scalars("train", "train", rec))
    assert "monitor/train/a%7Eb/mean" in dict(names.scalars("train", "train", rec))


@pytest.mark.parametrize("part", ["eval", "train/x", "~x", ""])
def test_an_observer_part_that_would_share_names_is_refused(part):
    with pytest.raises(ValueError, match="observer's part"):
        names.prefix(part, "events")


def test_export_all_writes_every_value_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from monitor.integrations.tensorboard import TensorBoardListener

    session = MonitorSession(tmp_path / "r", "r")
    rec = {"step": 2, "time": 1.0, "metrics": {f"layer_{i:02d}/p_keep": dict(VALUE)
                                                for i in range(8, 32)}}
    rec["metrics"]["overall/p_keep"] = dict(VALUE)
    for export_all in (False, True):
        listener = TensorBoardListener(session, export_all=export_all)
        listener.log_dir = session.files.path(f"tb{int(export_all)}")
        listener.publish("lfp", "events", rec)
        listener.close()
    compact = event_accumulator(tmp_path / "r" / "tb0").Tags()
    everything = event_accumulator(tmp_path / "r" / "tb1").Tags()
    assert len(compact["scalars"]) == 5  # overall's 4 fields and the record's nonfinite
    assert compact["histograms"] == ["monitor/lfp/~layers/p_keep/mean_hist"]
    assert len(everything["scalars"]) == 25 * 5 and everything["histograms"] == []
    assert "monitor/lfp/layer_08/p_keep/nonfinite" in everything["scalars"]
    session.close()


# -- TensorBoard ------------------------------------------------------------------------

def event_accumulator(path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0,
                                                          "tensors": 0})
    ea.Reload()
    return ea


def test_tensorboard_events_carry_the_jsonl_values_under_monitor_names(tmp_path):
    pytest.importorskip("tensorboard")
    run = run_cogvla(tmp_path, steps=4, enable_tensorboard=True)
    ea = event_accumulator(tensorboard_dir(run))
    tags = ea.Tags()
    train = tree(run, "r").records()
    loss = [(e.step, e.value) for e in ea.Scalars("monitor/train/loss/mean")]
    assert loss == [(r["step"], pytest.approx(r["metrics"]["loss"]["mean"])) for r in train]
    top = [e.value for e in ea.Scalars("monitor/train/loss/max")]
    assert top == [pytest.approx(r["metrics"]["loss"]["max"]) for r in train]
    lfp = [r for r in tree(run, "r").records("lfp")]
    p_keep = ea.Scalars("monitor/lfp/overall/p_keep/mean")
    assert [e.step for e in p_keep] == [r["step"] for r in lfp]
    assert p_keep[-1].value == pytest.approx(lfp[-1]["metrics"]["overall/p_keep"]["mean"])
    for tag in ("monitor/lfp/overall/p_keep/min", "monitor/film/overall/gamma_norm/std",
                "monitor/moe/entropy/mean", "monitor/aggr/overall/compression_ratio/mean",
                "monitor/lfp/~layers/overlap_prev/mean",
                "monitor/film/dino/~layers/gamma_norm/max"):
        assert tag in tags["scalars"], tag
    assert not [t for t in tags["scalars"] if "layer_0" in t]  # no key per layer
    assert "monitor/lfp/~layers/p_keep/mean_hist" in tags["histograms"]
    layer_means = ea.Histograms("monitor/lfp/~layers/p_keep/mean_hist")[-1].histogram_value
    assert layer_means.num == 24  # one value per LFP layer
    assert layer_means.min == pytest.approx(
        min(v["mean"] for k, v in lfp[-1]["metrics"].items() if k.endswith("/p_keep")
            and k.startswith("layer_")))
    detailed = tree(run, "r").detailed("moe")[-1]
    hist = ea.Histograms("monitor/moe/dino_weight/hist")[-1]
    want = detailed["histograms"]["dino_weight"]
    assert hist.step == detailed["step"]
    assert hist.histogram_value.num == sum(want["counts"]) + want["below"] + want["above"]
    assert list(hist.histogram_value.bucket)[1:-1] == want["counts"]


def test_tensorboard_on_resume_hides_the_dead_segments_overlap(tmp_path):
    pytest.importorskip("tensorboard")
    first = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=5, tensorboard=True,
                    console=False)
    train_steps(first, range(0, 21), value=lambda s: 1.0)
    first.finalize("failed")  # a crash: no flush at the end, the writer is closed
    second = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=5, tensorboard=True,
                     console=False)
    assert second.session.meta["resumed"] is True
    train_steps(second, range(10, 31), value=lambda s: 2.0)
    second.finalize()
    assert len(list(tensorboard_dir(tmp_path / "r").glob("events.out.tfevents.*"))) == 2
    loss = [(e.step, e.value) for e in
            event_accumulator(tensorboard_dir(tmp_path / "r")).Scalars("monitor/train/loss/mean")]
    assert loss == [(0, 1.0), (5, 1.0), (10, 2.0), (15, 2.0), (20, 2.0), (25, 2.0), (30, 2.0)]


def test_tensorboard_or_wandb_without_the_package_names_the_extra_and_writes_nothing(
        tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install "monitor\[tensorboard\]"'):
        CogVLAMonitoring(run_dir=tmp_path / "r", run_id="r",
                         cfg=CogVLAMonitoringConfig(enable_tensorboard=True))
    with pytest.raises(ImportError, match=r'monitor\[tensorboard\]'):
        Monitor(run_dir=tmp_path / "m", run_id="m", tensorboard=True)
    with pytest.raises(ImportError, match=r'pip install "monitor\[wandb\]"'):
        CogVLAMonitoring(run_dir=tmp_path / "w", run_id="w",
                         cfg=CogVLAMonitoringConfig(enable_wandb=True))
    assert not any((tmp_path / d).exists() for d in ("r", "m", "w"))


# -- W&B --------------------------------------------------------------------------------

class FakeRun:
    step = 0

    def __init__(self, fail=False):
        self.logged, self.fail, self.finished = [], fail, False

    def define_metric(self, *a, **k):
        pass

    def log(self, data, step=None):
        if self.fail:
            raise ConnectionError("wandb service gone")
        self.logged.append((step, data))
        if step is not None:
            self.step = step

    def finish(self):
        self.finished = True


def test_an_existing_wandb_run_gets_every_record_and_is_not_finished(tmp_path, monkeypatch):
    run = FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=run))
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=2, console=False)
    train_steps(mon, range(5))
    mon.finalize()
    assert [s for s, _ in run.logged] == [0, 2, 4]
    assert run.logged[1][1]["monitor/train/loss/mean"] == 1.5  # steps 1 and 2
    assert run.logged[1][1]["monitor/train/step"] == 2
    assert not run.finished


def test_a_failing_wandb_run_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=FakeRun(fail=True)))
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1, console=False)
    with pytest.warns(RuntimeWarning, match="WandbListener.publish failed"):
        train_steps(mon, range(3))
    mon.finalize()
    assert len(tree(tmp_path / "r", "r").records()) == 3


def test_wandb_offline_run_holds_the_monitor_names(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    wandb_offline(tmp_path, monkeypatch)
    run = run_cogvla(tmp_path, steps=4, enable_wandb=True)
    assert wandb.run is None  # the monitor started the run and finished it at finalize
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    train = tree(run, "r").records()
    key = "monitor/train/loss/mean"
    assert [r[key] for r in rows if key in r] == [
        pytest.approx(r["metrics"]["loss"]["mean"]) for r in train]
    assert [r["monitor/train/step"] for r in rows if key in r] == [0, 2, 3]
    last = rows[-1]
    lfp = tree(run, "r").records("lfp")[-1]
    assert last["monitor/lfp/overall/p_keep/mean"] == pytest.approx(
        lfp["metrics"]["overall/p_keep"]["mean"])
    assert "monitor/moe/entropy/std" in last and "monitor/film/overall/gamma_norm/mean" in last
    hist = tree(run, "r").detailed("moe")[-1]["histograms"]["dino_weight"]
    assert last["monitor/moe/dino_weight/hist/_type"] == "histogram"  # stored as nested keys
    assert last["monitor/moe/dino_weight/hist/values"] == hist["counts"]
    assert last["monitor/moe/dino_weight/hist/bins"] == pytest.approx(hist["edges"])


def test_wandb_offline_run_the_script_started_gets_the_records_and_stays_open(tmp_path,
                                                                              monkeypatch):
    wandb = pytest.importorskip("wandb")
    wandb_offline(tmp_path, monkeypatch)
    run = wandb.init(project="script", dir=str(tmp_path))
    try:
        run.log({"script/own": 1.0}, step=0)
        mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=2, console=False)
        train_steps(mon, range(5))
        mon.finalize()
        assert wandb.run is run  # the script's run: logged into, never finished
        run.log({"script/own": 2.0}, step=6)
    finally:
        run.finish()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    assert [(r["_step"], r.get("monitor/train/loss/mean")) for r in rows] == [
        (0, 0.0), (2, 1.5), (4, 3.5), (6, None)]
    assert rows[0]["script/own"] == 1.0


# -- console ----------------------------------------------------------------------------

def test_console_logs_one_line_per_train_record_with_throughput(tmp_path, caplog):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=2)
    with caplog.at_level(logging.INFO, logger="monitor"):
        train_steps(mon, range(5))
        with mon.step(4, mode="eval") as h:
            h.log(loss=1.0)
        mon.finalize()
    lines = [r.getMessage() for r in caplog.records if r.name == "monitor"]
    assert lines[0] == "monitor: step 0 | loss 0 | lr 1.0e-03"
    assert len(lines) == 3
    assert lines[1].startswith("monitor: step 2 | loss 1.5 | lr 1.0e-03 | ")
    assert lines[1].endswith(" steps/s")


def test_console_is_silenced_by_the_logger_level_or_by_the_flag(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="monitor")
    mon = Monitor(run_dir=tmp_path / "a", run_id="a", log_interval=1)
    train_steps(mon, range(3))
    mon.finalize()
    caplog.set_level(logging.INFO, logger="monitor")
    mon = Monitor(run_dir=tmp_path / "b", run_id="b", log_interval=1, console=False)
    train_steps(mon, range(3))
    mon.finalize()
    assert [r for r in caplog.records if r.name == "monitor"] == []


def test_console_shows_samples_per_second_when_the_batch_size_is_known():
    from monitor.integrations.console import ConsoleListener

    listener = ConsoleListener(samples_per_step=16)
    logger = logging.getLogger("monitor")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda r: seen.append(r.getMessage())
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        listener.publish("train", "train", {"step": 100, "time": 10.0, "metrics": {}})
        listener.publish("train", "train", {"step": 200, "time": 60.0, "metrics": {}})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    assert seen == ["monitor: step 100", "monitor: step 200 | 2 steps/s | 32 samples/s"]
    with pytest.raises(ValueError, match="samples_per_step"):
        ConsoleListener(samples_per_step=0)


def test_config_validates_the_integration_fields():
    with pytest.raises(TypeError, match="enable_wandb must be a bool or None"):
        CogVLAMonitoringConfig(enable_wandb="yes")
    with pytest.raises(TypeError, match="console must be a bool"):
        CogVLAMonitoringConfig(console=1)
    with pytest.raises(ValueError, match="console_samples_per_step must be > 0"):
        CogVLAMonitoringConfig(console_samples_per_step=0)
    with pytest.raises(TypeError, match="wandb_project must be a str"):
        CogVLAMonitoringConfig(wandb_project=3)


def test_one_setting_exports_everything_to_every_integration(tmp_path):
    pytest.importorskip("tensorboard")
    with pytest.raises(TypeError, match="export_all must be a bool"):
        CogVLAMonitoringConfig(export_all=1)
    for export_all in (False, True):
        mon = CogVLAMonitoring(run_dir=tmp_path / str(export_all), run_id="r",
                               cfg=CogVLAMonitoringConfig(enable_tensorboard=True,
                                                          export_all=export_all))
        listeners = [x for x in mon.session.listeners if hasattr(x, "export_all")]
        assert {type(x).__name__ for x in listeners} == {"TensorBoardListener",
                                                         "WandbListener"}
        assert all(x.export_all is export_all for x in listeners)
        mon.finalize()
    mon = Monitor(run_dir=tmp_path / "m", run_id="m", export_all=True, console=False)
    assert [x.export_all for x in mon.session.listeners] == [True]  # W&B, when a run exists
    mon.finalize()
