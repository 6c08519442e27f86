"""The demo job end to end: under torchrun --nproc_per_node 2 (gloo, CPU) and as one process."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tree import tensorboard_dir, tree

from monitor.__main__ import main as report_main
from monitor.layout import LOCK_NAME, TENSORBOARD, TRAIN, RunLayout, folder_of

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("lfp", "film", "moe", "aggr")


def run_demo(tmp_path, torchrun: bool, steps: int, *extra: str, env_extra=None) -> Path:
    run_dir = tmp_path / "runs" / "demo"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"] if torchrun else [sys.executable]
    cmd = launcher + [str(ROOT / "scripts" / "demo_train.py"), "--run-dir", str(run_dir),
                      "--run-id", "demo", "--steps", str(steps), "--log-interval", "4",
                      "--event-interval", "2", "--detailed-interval", "4", "--image-size", "16",
                      "--tasks", "4", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=200)  # a TimeoutExpired, before pytest-timeout's 240 s
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[rank 0] hooks per part: {'lfp': 24, 'film': 14, 'moe': 1, 'aggr': 4}" in done.stdout
    assert "[rank 0] monitor: step 4 | loss " in done.stderr  # the console line, rank 0 only
    assert "[rank 1] monitor: step" not in done.stderr
    return run_dir


def check_tree(run_dir: Path, world_size: int, steps: int, extra=()) -> None:
    demo = tree(run_dir, "demo")
    expected = {folder_of(TRAIN): sorted(demo.path(k).name for k in ("stream", "meta", "summary"))}
    expected.update({folder_of(p): sorted(demo.path(k, p).name
                                          for k in ("stream", "detailed", "summary"))
                     for p in PARTS})
    has_tb = importlib.util.find_spec("tensorboard") is not None  # the demo's default
    found = {d.name: sorted(f.name for f in d.iterdir()) for d in run_dir.iterdir()
             if d.name not in (TENSORBOARD, *extra)}
    assert found == expected
    if has_tb:
        assert len(list(tensorboard_dir(run_dir).glob("events.out.tfevents.*"))) == 1
    train = demo.records()
    assert [r["step"] for r in train] == [0, 4, steps - 1]
    assert all(r["world_size"] == world_size for r in train)
    assert train[1]["metrics"]["loss"]["count"] == 4 * world_size  # steps 1..4, every rank
    meta = demo.meta()
    assert meta["participation"]["contributing_ranks"] == list(range(world_size))
    for part in PARTS:
        events = demo.records(part)
        assert [r["step"] for r in events] == [0, 2, 4, steps - 1], part
        summary = demo.summary(part)
        assert summary["status"] == "completed" and meta["parts"][part]["found"] is True
    moe = demo.records("moe")
    # steps 1-2: 2 forwards x 2 images x batch 2 on each rank
    assert moe[1]["metrics"]["dino_weight"]["count"] == 8 * world_size


def documented_tree(readme: Path) -> set[str]:
    """The file paths (``folder/name``, relative to ``runs/{run_id}/``) that the README's
    "The log tree" block lists, comments dropped."""
    text = readme.read_text().split("## The log tree", 1)[1].split("```", 2)[1]
    paths, folder = set(), None
    for line in text.splitlines()[1:]:
        entry = line.split("#", 1)[0].rstrip()
        if not entry.strip():
            continue
        depth = (len(entry) - len(entry.lstrip())) // 2
        if depth == 1:
            folder = entry.strip()
            paths.add(folder)
        elif depth == 2:
            paths.add(folder + entry.strip())
    return paths


def test_run_layout_spells_the_documented_log_tree():
    """The one test that spells the tree literally (every other asks ``RunLayout``, through
    tests/tree.py): its paths are the ones monitor/README.md and the README document."""
    layout = RunLayout("{run_id}")
    assert layout.stream(TRAIN) == "monitor_logs/{run_id}.jsonl"
    assert layout.summary(TRAIN) == "monitor_logs/{run_id}_summary.json"
    assert layout.meta == "monitor_logs/{run_id}_meta.json"
    for part in PARTS:
        assert layout.stream(part) == f"{part}_logs/{{run_id}}.jsonl"
        assert layout.detailed(part) == f"{part}_logs/{{run_id}}_detailed.jsonl"
        assert layout.summary(part) == f"{part}_logs/{{run_id}}_summary.json"
    assert (LOCK_NAME, TENSORBOARD) == (".monitor.lock", "tensorboard")
    written = {layout.stream(TRAIN), layout.summary(TRAIN), layout.meta} | {
        path for part in PARTS
        for path in (layout.stream(part), layout.detailed(part), layout.summary(part))}
    documented = documented_tree(ROOT / "monitor" / "README.md")
    folders = {f"{folder_of(part)}/" for part in (TRAIN, *PARTS)}
    assert {p for p in documented if p.split("/")[0] + "/" in folders} == written | folders
    assert {LOCK_NAME, f"{TENSORBOARD}/"} <= documented
    readme = (ROOT / "README.md").read_text()
    assert f"`runs/{{run_id}}/{layout.stream(TRAIN)}`" in readme
    assert "`{run_id}_summary.json` and `{run_id}_meta.json`" in readme


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_commands_take_the_demo_to_tensorboard_wandb_offline_and_the_report(tmp_path,
                                                                                 capsys):
    """The README's path: the demo under torchrun with W&B offline writes the full tree of
    all five parts, then TensorBoard's reader, the W&B offline run, and ``python -m monitor
    report``. (The demo without W&B: the single-process test below.)"""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    from test_integrations import event_accumulator
    from wandb_helpers import wandb_history

    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "WANDB_CONSOLE": "off", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache")}
    run_dir = run_demo(tmp_path, True, 6, "--wandb", env_extra=env)
    check_tree(run_dir, world_size=2, steps=6, extra=("wandb",))
    train = tree(run_dir, "demo").records()
    loss = [e.value for e in event_accumulator(tensorboard_dir(run_dir)).Scalars(
        "monitor/train/loss/mean")]
    assert loss == [pytest.approx(r["metrics"]["loss"]["mean"]) for r in train]
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    key = "monitor/train/loss/mean"
    assert [r[key] for r in rows if key in r] == [
        r["metrics"]["loss"]["mean"] for r in train]
    # the report in this process (the `python -m monitor` entry point itself: test_report.py)
    assert report_main(["report", str(run_dir)]) == 0
    assert "== lfp: 4 records, steps 0..5" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "report").glob("*.png")) == [
        "film.png", "groups.png", "lfp.png", "moe.png", "train.png"]  # the demo's tasks


@pytest.mark.slow
def test_demo_runs_as_a_single_process_too(tmp_path):
    run_dir = run_demo(tmp_path, torchrun=False, steps=6)
    check_tree(run_dir, world_size=1, steps=6)
