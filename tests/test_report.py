"""Reading a run back (``monitor.read_run``) and ``python -m monitor report/compare``."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
import torch
from test_integrations import run_cogvla
from tree import tree

import monitor
from monitor import Monitor, report
from monitor.__main__ import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A CogVLA stand-in run with every part on and one MoE collapse alert."""
    return run_cogvla(tmp_path_factory.mktemp("demo"), steps=6, moe_collapse_threshold=0.5,
                      moe_collapse_patience=1)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_read_run_returns_each_parts_records_as_plain_dicts(demo_run):
    run = monitor.read_run(demo_run)
    assert run.run_id == "r" and run.parts == ["train", "lfp", "film", "moe", "aggr"]
    assert run["train"].records == tree(demo_run, "r").records()
    events = tree(demo_run, "r").records("moe")
    assert run["moe"].records == [r for r in events if "metrics" in r]
    assert run["moe"].alerts == [r for r in events if "alert" in r] and run["moe"].alerts
    assert run["lfp"].detailed == tree(demo_run, "r").detailed("lfp")
    assert run["lfp"].summary["status"] == "completed"
    assert run.meta["participation"]["decision"] == "single_process"
    steps, losses = run["train"].metric("loss")
    assert steps == [0, 2, 4, 5]
    assert losses == [r["metrics"]["loss"]["mean"] for r in run["train"].records]
    assert "lfp" in run and "nope" not in run
    with pytest.raises(KeyError, match="no 'nope' logs"):
        run["nope"]


def test_read_run_as_pandas_has_flat_columns(demo_run):
    pd = pytest.importorskip("pandas")
    run = monitor.read_run(demo_run)
    df = run["train"].to_pandas()
    assert isinstance(df, pd.DataFrame)
    assert {"step", "mode", "time", "world_size", "loss.mean", "loss.std", "loss.min",
            "loss.max", "loss.count", "loss.nonfinite", "lr.mean"} <= set(df.columns)
    assert df["loss.mean"].tolist() == run["train"].metric("loss")[1]
    lfp = run.to_pandas()["lfp"]
    assert "overall/p_keep.mean" in lfp.columns and len(lfp) == len(run["lfp"].records)
    assert any(c.startswith("alert.") for c in run["moe"].to_pandas("alerts").columns)
    assert "histograms" not in run["moe"].to_pandas("detailed").columns


def test_to_pandas_without_pandas_names_the_extra(demo_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ImportError, match=r'pip install "monitor\[pandas\]"'):
        monitor.read_run(demo_run)["train"].to_pandas()


def test_read_run_skips_a_last_line_cut_short_and_warns_of_a_corrupt_middle_line(tmp_path):
    mon = Monitor(run_dir=tmp_path / "r", run_id="r", log_interval=1, console=False)
    for step in range(3):
        with mon.step(step) as h:
            h.log(loss=torch.tensor(1.0))
    mon.log_step(3)  # writes the record of step 2
    path = tree(tmp_path / "r", "r").path()
    with open(path, "a") as f:
        f.write('{"step": 3, "mode": "tr')  # killed mid-write
    run = monitor.read_run(tmp_path / "r")
    assert [r["step"] for r in run["train"].records] == [0, 1, 2]
    lines = path.read_text().split("\n")
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines))
    with pytest.warns(RuntimeWarning, match=r"r.jsonl:2: not a JSON line"):
        run = monitor.read_run(tmp_path / "r")
    assert [r["step"] for r in run["train"].records] == [0, 2]  # the good records stay


def test_read_run_without_a_run_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        monitor.read_run(tmp_path / "missing")


def test_report_prints_a_table_per_part_and_writes_the_pngs(demo_run, capsys):
    pytest.importorskip("matplotlib")
    assert main(["report", str(demo_run)]) == 0
    out = capsys.readouterr().out
    for part in ("train", "lfp", "film", "moe", "aggr"):
        assert f"== {part}: " in out
    assert "== lfp: 4 records, steps 0..5" in out and "status completed" in out
    assert "participation single_process (global statistics)" in out
    assert "overall/p_keep" in out and "per-component metrics not shown" in out
    assert "alert at step" in out
    loss = monitor.read_run(demo_run)["train"].metric("loss")[1]
    row = next(line for line in out.splitlines() if line.strip().startswith("train/loss"))
    assert row.split()[1:4] == [f"{loss[-1]:.4g}", f"{min(loss):.4g}", f"{max(loss):.4g}"]
    for name in ("train", "lfp", "film", "moe"):
        png = demo_run / "report" / f"{name}.png"
        assert png_size(png)[0] > 600 and png.stat().st_size > 20_000, name


def test_report_all_shows_every_component(demo_run, capsys):
    main(["report", str(demo_run), "--all", "--no-plots"])
    out = capsys.readouterr().out
    assert "layer_31/p_keep" in out and "not shown" not in out


def test_compare_overlays_two_runs(demo_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    other = run_cogvla(tmp_path, steps=4)
    assert main(["compare", str(demo_run), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert sorted(p.name for p in (tmp_path / "cmp").glob("*.png")) == [
        "compare_film.png", "compare_lfp.png", "compare_moe.png", "compare_train.png"]
    assert "plots:" in capsys.readouterr().out


def test_report_without_matplotlib_prints_the_tables_and_names_the_extra(demo_run, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(report, "pyplot", lambda: None)
    assert main(["report", str(demo_run), "--out", str(demo_run / "no-plots")]) == 0
    out = capsys.readouterr().out
    assert "== moe: " in out and 'pip install "monitor[report]"' in out
    assert not (demo_run / "no-plots").exists()


def test_report_on_a_missing_folder_exits_with_a_message(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_python_dash_m_monitor_runs(demo_run):
    out = subprocess.run([sys.executable, "-m", "monitor", "report", str(demo_run),
                          "--no-plots"], capture_output=True, text=True, check=True).stdout
    assert "== train: " in out


def test_read_run_drops_a_resumed_runs_superseded_records_and_markers(tmp_path):
    """Segment 1 died after writing steps 0..30; segment 2 resumed from step 20."""
    from monitor import Monitor, read_run

    run_dir = tmp_path / "run"
    mon = Monitor(run_dir=run_dir, run_id="r", log_interval=10, participation="local")
    for step in range(31):
        with mon.step(step) as h:
            h.log(loss=1.0)
    mon.session.close()  # the segment "dies": no end written (one live monitor per folder)
    mon = Monitor(run_dir=run_dir, run_id="r", log_interval=10, participation="local")
    for step in range(20, 41):
        with mon.step(step) as h:
            h.log(loss=2.0)
    mon.finalize()
    records = read_run(run_dir)["train"].records
    assert [r["step"] for r in records] == [0, 10, 20, 30, 40]
    assert [r["metrics"]["loss"]["mean"] for r in records] == [1.0, 1.0, 2.0, 2.0, 2.0]


class FigureKeeper:
    """pyplot, keeping every figure the plot functions make (they close them)."""

    def __init__(self, plt):
        self._plt, self.figures = plt, []

    def __getattr__(self, name):
        return getattr(self._plt, name)

    def subplots(self, *args, **kwargs):
        fig, axes = self._plt.subplots(*args, **kwargs)
        self.figures.append(fig)
        return fig, axes


def alert_lines(ax):
    return [line.get_label() for line in ax.get_lines()
            if line.get_linestyle() == "--" and line.get_color() == "tab:red"]


def test_an_alert_is_drawn_only_on_its_metrics_panel_and_named(demo_run, tmp_path):
    pytest.importorskip("matplotlib")
    from monitor import plots

    plt = FigureKeeper(report.pyplot())
    run = monitor.read_run(demo_run)
    alerts = run["moe"].alerts
    assert alerts and {a["alert"]["type"] for a in alerts} == {"expert_collapse"}
    plots.plot_moe(plt, run, tmp_path / "moe.png")
    plots.plot_train(plt, run, tmp_path / "train.png")
    (weights, entropy), (loss, lr) = (fig.axes for fig in plt.figures)
    drawn = alert_lines(weights)
    assert len(drawn) == len(alerts)  # one line per alert, the first of each metric named
    named = {f"alert: {a['alert']['expert']}_weight" for a in alerts}
    assert {d for d in drawn if not d.startswith("_")} == named
    assert named <= set(weights.get_legend_handles_labels()[1])
    assert alert_lines(entropy) == alert_lines(loss) == alert_lines(lr) == []
    # a non-finite loss: on the loss panel, not on the learning rate's
    mon = Monitor(run_dir=tmp_path / "nan", run_id="nan", log_interval=1, console=False)
    for step in range(3):
        with mon.step(step) as h:
            h.log(loss=float("nan") if step == 1 else 1.0, lr=1e-3)
    mon.finalize()
    plt.figures.clear()
    plots.plot_train(plt, monitor.read_run(tmp_path / "nan"), tmp_path / "nan.png")
    (loss, lr), = (fig.axes for fig in plt.figures)
    assert alert_lines(loss) == ["alert: loss"] and alert_lines(lr) == []
