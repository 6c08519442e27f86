"""Print a short report of what a run's log tree says (used by demo.sh).

Usage: python scripts/show_run.py RUN_DIR RUN_ID
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# part -> (folder, metrics shown from the last compact record)
PARTS = {
    "lfp": ("lfp_logs", ("overall/keep_ratio", "overall/p_keep", "overall/margin",
                         "overall/forced_p_keep")),
    "film": ("film_logs", ("overall/gamma_norm", "overall/beta_norm",
                           "overall/modulation_strength")),
    "moe": ("moe_logs", ("dino_weight", "siglip_weight", "entropy")),
    "aggr": ("aggr_logs", ("overall/compression_ratio", "overall/tokens_in",
                           "overall/tokens_out")),
}


def fmt(v: dict) -> str:
    if v["mean"] is None:
        return f"n={v['count']} nonfinite={v['nonfinite']}"
    return f"{v['mean']:.4g} ± {v['std']:.2g} [{v['min']:.3g}, {v['max']:.3g}] n={v['count']}"


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def show_train(run: Path, run_id: str) -> None:
    logs = run / "monitor_logs"
    meta = json.loads((logs / f"{run_id}_meta.json").read_text())
    part = meta["participation"]
    print(f"world_size={meta['world_size']} backend={meta['backend']} "
          f"participation={part['decision']} ({part['statistics']} statistics)")
    records = [r for r in lines_of(logs / f"{run_id}.jsonl") if "metrics" in r]  # no alerts
    print(f"train: {len(records)} records in monitor_logs/{run_id}.jsonl")
    for rec in records[:1] + records[-1:]:
        shown = "  ".join(f"{k}: {fmt(v)}" for k, v in rec["metrics"].items())
        print(f"  step {rec['step']:>4}  {shown}")
    for name, info in meta.get("parts", {}).items():
        extra = ""
        if info.get("skipped"):
            extra = f"; skipped {info['skipped']}"
        if info.get("sampled_dead_blocks"):
            extra += f"; sampled blocks that get no gradient {info['sampled_dead_blocks']}"
        print(f"  meta.parts.{name}: found={info.get('found')} "
              f"hook_errors={info.get('hook_errors')}{extra}")


def show_part(run: Path, run_id: str, part: str) -> None:
    folder, keys = PARTS[part]
    events = lines_of(run / folder / f"{run_id}.jsonl")
    detailed = lines_of(run / folder / f"{run_id}_detailed.jsonl")
    records = [r for r in events if "metrics" in r]
    alerts = [r for r in events if "alert" in r]
    if not events and not detailed:
        return
    print(f"{part}: {len(records)} compact records, {len(detailed)} detailed, "
          f"{len(alerts)} alerts ({folder}/)")
    if records:
        last = records[-1]
        for key in keys:
            if key in last["metrics"]:
                print(f"  step {last['step']:>4}  {key}: {fmt(last['metrics'][key])}")
    if detailed and detailed[-1].get("histograms"):
        print(f"  histograms at step {detailed[-1]['step']}: "
              f"{len(detailed[-1]['histograms'])} (e.g. {next(iter(detailed[-1]['histograms']))})")


def main(run_dir: str, run_id: str) -> None:
    run = Path(run_dir)
    show_train(run, run_id)
    for part in PARTS:
        show_part(run, run_id, part)


if __name__ == "__main__":
    main(*sys.argv[1:3])
