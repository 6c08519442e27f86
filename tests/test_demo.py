"""The demo job end to end under torchrun --nproc_per_node 2 (gloo, CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from workers import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_under_torchrun_writes_one_reduced_log_tree(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", str(ROOT / "scripts" / "demo_train.py"),
           "--run-dir", str(run_dir), "--run-id", "demo", "--steps", "25",
           "--log-interval", "10", "--eval-every", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = run_dir / "monitor_logs"
    assert sorted(p.name for p in logs.iterdir()) == [
        "demo.jsonl", "demo_meta.json", "demo_summary.json"]
    recs = read_jsonl(logs / "demo.jsonl")
    assert [(r["step"], r["mode"]) for r in recs] == [
        (10, "train"), (10, "eval"), (20, "train"), (20, "eval"), (25, "train")]
    assert all(r["world_size"] == 2 for r in recs)
    # 2 ranks x 10 steps of one loss each; 2 ranks x 128 eval samples
    assert recs[0]["metrics"]["loss"]["count"] == 20
    assert recs[1]["metrics"]["loss"]["count"] == 256
    assert recs[4]["metrics"]["grad_norm"]["count"] == 10
    meta = json.loads((logs / "demo_meta.json").read_text())
    assert meta["participation"]["decision"] == "all_ranks"
    assert json.loads((logs / "demo_summary.json").read_text())["status"] == "completed"
