"""The demo job end to end: under torchrun --nproc_per_node 2 (gloo, CPU) and as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from workers import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("lfp", "film", "moe", "aggr")


def run_demo(tmp_path, torchrun: bool, steps: int) -> Path:
    run_dir = tmp_path / "runs" / "demo"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"] if torchrun else [sys.executable]
    cmd = launcher + [str(ROOT / "scripts" / "demo_train.py"), "--run-dir", str(run_dir),
                      "--run-id", "demo", "--steps", str(steps), "--log-interval", "4",
                      "--event-interval", "2", "--detailed-interval", "4"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[rank 0] hooks per part: {'lfp': 24, 'film': 14, 'moe': 1, 'aggr': 4}" in done.stdout
    return run_dir


def check_tree(run_dir: Path, world_size: int, steps: int) -> None:
    expected = {"monitor_logs": ["demo.jsonl", "demo_meta.json", "demo_summary.json"]}
    expected.update({f"{p}_logs": ["demo.jsonl", "demo_detailed.jsonl", "demo_summary.json"]
                     for p in PARTS})
    assert {d.name: sorted(f.name for f in d.iterdir()) for d in run_dir.iterdir()} == expected
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
def test_demo_runs_as_a_single_process_too(tmp_path):
    run_dir = run_demo(tmp_path, torchrun=False, steps=6)
    check_tree(run_dir, world_size=1, steps=6)
