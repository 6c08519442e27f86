"""The demo job end to end: under torchrun --nproc_per_node 2 (gloo, CPU) and as one process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from workers import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("lfp", "film", "moe", "aggr")


def run_demo(tmp_path, torchrun: bool, steps: int, *extra: str, env_extra=None) -> Path:
    run_dir = tmp_path / "runs" / "demo"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"] if torchrun else [sys.executable]
    cmd = launcher + [str(ROOT / "scripts" / "demo_train.py"), "--run-dir", str(run_dir),
                      "--run-id", "demo", "--steps", str(steps), "--log-interval", "4",
                      "--event-interval", "2", "--detailed-interval", "4", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[rank 0] hooks per part: {'lfp': 24, 'film': 14, 'moe': 1, 'aggr': 4}" in done.stdout
    assert "[rank 0] monitor: step 4 | loss " in done.stderr  # the console line, rank 0 only
    assert "[rank 1] monitor: step" not in done.stderr
    return run_dir


def check_tree(run_dir: Path, world_size: int, steps: int, extra=()) -> None:
    expected = {"monitor_logs": ["demo.jsonl", "demo_meta.json", "demo_summary.json"]}
    expected.update({f"{p}_logs": ["demo.jsonl", "demo_detailed.jsonl", "demo_summary.json"]
                     for p in PARTS})
    has_tb = importlib.util.find_spec("tensorboard") is not None  # the demo's default
    tree = {d.name: sorted(f.name for f in d.iterdir()) for d in run_dir.iterdir()
            if d.name not in ("tensorboard", *extra)}
    assert tree == expected
    if has_tb:
        assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    train = read_jsonl(run_dir / "monitor_logs" / "demo.jsonl")
    assert [r["step"] for r in train] == [0, 4, steps - 1]
    assert all(r["world_size"] == world_size for r in train)
    assert train[1]["metrics"]["loss"]["count"] == 4 * world_size  # steps 1..4, every rank
    meta = json.loads((run_dir / "monitor_logs" / "demo_meta.json").read_text())
    assert meta["participation"]["contributing_ranks"] == list(range(world_size))
    for part in PARTS:
        events = read_jsonl(run_dir / f"{part}_logs" / "demo.jsonl")
        assert [r["step"] for r in events] == [0, 2, 4, steps - 1], part
        summary = json.loads((run_dir / f"{part}_logs" / "demo_summary.json").read_text())
        assert summary["status"] == "completed" and meta["parts"][part]["found"] is True
    moe = read_jsonl(run_dir / "moe_logs" / "demo.jsonl")
    # steps 1-2: 2 forwards x 2 images x batch 2 on each rank
    assert moe[1]["metrics"]["dino_weight"]["count"] == 8 * world_size


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_under_torchrun_writes_the_full_tree_of_all_five_parts(tmp_path):
    run_dir = run_demo(tmp_path, torchrun=True, steps=6)
    check_tree(run_dir, world_size=2, steps=6)


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_commands_take_the_demo_to_tensorboard_wandb_offline_and_the_report(tmp_path):
    """The README's path: the demo with W&B offline, then TensorBoard's reader, the W&B
    offline run, and ``python -m monitor report``."""
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
    train = read_jsonl(run_dir / "monitor_logs" / "demo.jsonl")
    loss = [e.value for e in event_accumulator(run_dir / "tensorboard").Scalars(
        "monitor/train/loss/mean")]
    assert loss == [pytest.approx(r["metrics"]["loss"]["mean"]) for r in train]
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(run_file)
    key = "monitor/train/loss/mean"
    assert [r[key] for r in rows if key in r] == [
        r["metrics"]["loss"]["mean"] for r in train]
    done = subprocess.run([sys.executable, "-m", "monitor", "report", str(run_dir)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert "== lfp: 4 records, steps 0..5" in done.stdout
    assert sorted(p.name for p in (run_dir / "report").glob("*.png")) == [
        "film.png", "groups.png", "lfp.png", "moe.png", "train.png"]  # the demo's 40 tasks


@pytest.mark.slow
def test_demo_runs_as_a_single_process_too(tmp_path):
    run_dir = run_demo(tmp_path, torchrun=False, steps=6)
    check_tree(run_dir, world_size=1, steps=6)
