"""Print a few lines of what a run's log tree says (used by demo.sh)."""

import json
import sys
from pathlib import Path


def fmt(v: dict) -> str:
    if v["mean"] is None:
        return f"n={v['count']} nonfinite={v['nonfinite']}"
    return f"{v['mean']:.4g} ± {v['std']:.2g} [{v['min']:.3g}, {v['max']:.3g}] n={v['count']}"


def main(run_dir: str, run_id: str) -> None:
    logs = Path(run_dir) / "monitor_logs"
    meta = json.loads((logs / f"{run_id}_meta.json").read_text())
    part = meta["participation"]
    print(f"world_size={meta['world_size']} backend={meta['backend']} "
          f"participation={part['decision']} ({part['statistics']} statistics)")
    lines = (logs / f"{run_id}.jsonl").read_text().splitlines()
    print(f"{len(lines)} records in {logs / (run_id + '.jsonl')}; a few of them:")
    for line in lines[:2] + lines[-2:]:
        rec = json.loads(line)
        print(f"  step {rec['step']:>4} {rec['mode']:<5} " +
              "  ".join(f"{k}: {fmt(v)}" for k, v in rec["metrics"].items() if k != "pred_abs"))
    summary = json.loads((logs / f"{run_id}_summary.json").read_text())
    loss = summary["metrics"]["train"]["loss"]
    print(f"summary: status={summary['status']} records={summary['records_written']} "
          f"train loss first={loss['first']:.4f} last={loss['last']:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
