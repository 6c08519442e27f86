"""Print a short report of what a run's log tree says (used by demo.sh).

Usage: python scripts/show_run.py RUN_DIR RUN_ID
"""

from __future__ import annotations

import sys

from monitor import read_run
from monitor.layout import RunLayout
from monitor.readback import PartLog, RunLog

SHOWN = {  # part -> metrics shown from the last compact record
    "lfp": ("overall/keep_ratio", "overall/p_keep", "overall/margin", "overall/forced_p_keep"),
    "film": ("overall/gamma_norm", "overall/beta_norm", "overall/modulation_strength"),
    "moe": ("dino_weight", "siglip_weight", "entropy"),
    "aggr": ("overall/compression_ratio", "overall/tokens_in", "overall/tokens_out"),
}


def fmt(v: dict) -> str:
    if v["mean"] is None:
        return f"n={v['count']} nonfinite={v['nonfinite']}"
    return f"{v['mean']:.4g} ± {v['std']:.2g} [{v['min']:.3g}, {v['max']:.3g}] n={v['count']}"


def show_train(run: RunLog, layout: RunLayout) -> None:
    meta = run.meta or {}
    part = meta.get("participation", {})
    print(f"world_size={meta.get('world_size')} backend={meta.get('backend')} "
          f"participation={part.get('decision')} ({part.get('statistics')} statistics)")
    records = run["train"].records if "train" in run else []
    print(f"train: {len(records)} records in {layout.stream('train')}")
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


def show_part(log: PartLog, layout: RunLayout) -> None:
    if not log.records and not log.detailed:
        return
    print(f"{log.name}: {len(log.records)} compact records, {len(log.detailed)} detailed, "
          f"{len(log.alerts)} alerts ({layout.stream(log.name).split('/')[0]}/)")
    if log.records:
        last = log.records[-1]
        for key in SHOWN.get(log.name, ()):
            if key in last["metrics"]:
                print(f"  step {last['step']:>4}  {key}: {fmt(last['metrics'][key])}")
    hists = log.detailed[-1].get("histograms") if log.detailed else None
    if hists:
        print(f"  histograms at step {log.detailed[-1]['step']}: {len(hists)} "
              f"(e.g. {next(iter(hists))})")


def main(run_dir: str, run_id: str) -> None:
    run = read_run(run_dir, run_id)
    layout = RunLayout(run.run_id)
    show_train(run, layout)
    for part in run.parts:
        if part != "train":
            show_part(run[part], layout)


if __name__ == "__main__":
    main(*sys.argv[1:3])
