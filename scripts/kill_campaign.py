"""A randomized kill campaign: training processes ended by SIGTERM or SIGKILL at random
moments, then resumed from random earlier checkpoints, and every run folder checked.

    PYTHONPATH=. .venv/bin/python scripts/kill_campaign.py                # 24 cases
    PYTHONPATH=. .venv/bin/python scripts/kill_campaign.py --cases 3 --seed 1

Each case is one run folder. A worker process (this script with ``--worker``) trains and
logs ``loss = step`` at every step (the plain ``Monitor``, or the CogVLA facade on the
stand-in model, each case picks one and a log interval 1..7), and prints each step it
finished. The campaign kills it 1 to 3 times at a random moment (SIGTERM or SIGKILL, half
each), each time restarting it from a random earlier step (a checkpoint: the "rewind"),
and lets the last segment run to its end and ``finalize()``. Checked, as figures:

* **hangs**: a process still alive 60 s after its signal, or a last segment that does not
  end within its bound;
* **crashes of training**: a worker that exits other than by the signal (a traceback), or
  a last segment that does not exit 0;
* **data lost**: a JSONL line that does not parse or a JSON file that does not; after a
  SIGTERM, a value the worker logged that is not on disk (the counts of the segment's
  records must sum to the steps it finished, +1 for a step under way), meta without
  ``"terminated"``/``"SIGTERM"`` or a lock left behind; at the end, ``read_run``'s train
  history not exactly the earlier segments' records before each rewind followed by every
  record of the last segment (each step once), or a final status other than "completed".

SIGKILL loses the values logged since the last record by design: counted apart, not as
loss. Also reported: the time from SIGTERM to the process's exit (what torchrun's 30 s
grace period must cover).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANG_S = 60.0
END_AFTER = 25  # the last segment logs this many steps after its start, then finalizes


# -- the worker ---------------------------------------------------------------------------

def worker(run_dir: str, start: int, end: int, interval: int, facade: bool) -> None:
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # a resume's lock take-over warning
    if facade:
        from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
        from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch

        model_cfg = TinyCogVLAConfig(image_size=16)
        model = build_tiny_cogvla(model_cfg, seed=0)
        mon = CogVLAMonitoring(run_dir=run_dir, run_id="run", cfg=CogVLAMonitoringConfig(
            monitor_log_interval=interval, pruning_event_log_interval=interval,
            detailed_log_interval=2 * interval, film_sample_layers=[0], console=False))
        mon.attach(model)
        gen = torch.Generator().manual_seed(start)
    else:
        from monitor import Monitor

        mon = Monitor(run_dir=run_dir, run_id="run", log_interval=interval, console=False)
    print("ready", flush=True)
    for step in range(start, end):
        mon.log_step(step)
        if facade:
            with torch.no_grad():
                model(**synthetic_batch(model_cfg, batch_size=1, generator=gen))
        with mon.step(step) as h:
            h.log(loss=float(step))
        if mon.session.ended_by is None:  # after a signal's end, steps are ignored
            print(step, flush=True)
        time.sleep(0.01)
    mon.finalize()
    print("end", flush=True)


# -- the campaign -------------------------------------------------------------------------

def read_lines(path: Path) -> tuple[list[dict], int]:
    """Every line of a JSONL file parsed strictly, and the number that did not parse."""
    if not path.exists():
        return [], 0
    raw = path.read_bytes()
    bad = 0 if raw == b"" or raw.endswith(b"\n") else 1
    out = []
    for line in raw.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            bad += 1
    return out, bad


def files_problems(run_dir: Path) -> list[str]:
    problems = []
    for path in run_dir.rglob("*.jsonl"):
        if read_lines(path)[1]:
            problems.append(f"torn line in {path.name}")
    for path in run_dir.rglob("*.json"):
        try:
            json.loads(path.read_text())
        except ValueError:
            problems.append(f"unreadable {path.name}")
    return problems


def train_lines(run_dir: Path) -> list[dict]:
    return read_lines(run_dir / "monitor_logs" / "run.jsonl")[0]


def segment_records(run_dir: Path, before: int) -> list[dict]:
    """The train records a segment appended (``before``: the lines there were before it)."""
    return [r for r in train_lines(run_dir)[before:] if "metrics" in r]


def live_steps(run_dir: Path) -> list[int]:
    import monitor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [r["step"] for r in monitor.read_run(run_dir)["train"].records]


class Worker:
    """A worker process whose output lines are collected by threads as they come."""

    def __init__(self, run_dir: Path, start: int, end: int, interval: int,
                 facade: bool) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--worker", str(run_dir), str(start), str(end),
               str(interval), str(int(facade))]
        self.proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(f, lines), daemon=True)
                         for f, lines in ((self.proc.stdout, self.out),
                                          (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.strip())

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while "ready" not in self.out and self.proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return "ready" in self.out

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        for t in self._threads:
            t.join(10)
        return True

    @property
    def done(self) -> int | None:
        steps = [int(line) for line in self.out if line.isdigit()]
        return steps[-1] if steps else None


def run_segment(rng, run_dir, start, interval, facade, sig, out):
    """One segment from ``start``; killed by ``sig`` at a random moment (or run to its end
    when ``sig`` is None). Returns the last step the worker finished (or None)."""
    end = start + (END_AFTER if sig is None else 10_000)
    before = len(train_lines(run_dir))
    worker = Worker(run_dir, start, end, interval, facade)
    if not worker.wait_ready(HANG_S):
        worker.proc.kill()
        worker.wait(HANG_S)
        where = "hangs" if worker.proc.returncode == -signal.SIGKILL else "crashes"
        out[where].append(f"{run_dir.name}: no start ({' | '.join(worker.err[-3:])})")
        return None
    if sig is not None:
        time.sleep(rng.uniform(0.05, 2.5))
        sent = time.time()
        worker.proc.send_signal(sig)
    if not worker.wait(HANG_S if sig is not None else 600):
        out["hangs"].append(f"{run_dir.name}: still alive after {sig!r}")
        worker.proc.kill()
        worker.wait(HANG_S)
        return worker.done
    exited = time.time()
    done, err = worker.done, "\n".join(worker.err)
    expected = 0 if sig is None else -sig
    if worker.proc.returncode != expected:
        out["crashes"].append(f"{run_dir.name}: exit {worker.proc.returncode} ({err[-300:]})")
        return done
    out["problems"].extend(f"{run_dir.name}: {p}" for p in files_problems(run_dir))
    if sig == signal.SIGTERM:
        out["term_exit_s"].append(exited - sent)
        meta = json.loads((run_dir / "monitor_logs" / "run_meta.json").read_text())
        if (meta.get("status"), meta.get("error")) != ("terminated", "SIGTERM"):
            out["problems"].append(f"{run_dir.name}: meta {meta.get('status')!r} at SIGTERM")
        if (run_dir / ".monitor.lock").exists():
            out["problems"].append(f"{run_dir.name}: lock left after SIGTERM")
        logged = 0 if done is None else done - start + 1
        on_disk = sum(r["metrics"]["loss"]["count"] for r in segment_records(run_dir, before))
        if on_disk not in (logged, logged + 1):
            out["problems"].append(f"{run_dir.name}: SIGTERM at step {done}: {logged} values "
                                   f"logged, {on_disk} on disk")
    elif sig == signal.SIGKILL:
        logged = 0 if done is None else done - start + 1
        on_disk = sum(r["metrics"]["loss"]["count"] for r in segment_records(run_dir, before))
        out["sigkill_values_lost"] += max(0, logged - on_disk)
    return done


def run_case(rng, index: int, base: Path, out: dict) -> None:
    run_dir = base / f"case{index:02d}"
    interval, facade = rng.randint(1, 7), rng.random() < 0.3
    start, history = 0, []
    for _ in range(rng.randint(1, 3)):
        sig = rng.choice([signal.SIGTERM, signal.SIGKILL])
        out["kills"][signal.Signals(sig).name] += 1
        done = run_segment(rng, run_dir, start, interval, facade, sig, out)
        steps = live_steps(run_dir) if (run_dir / "monitor_logs" / "run.jsonl").exists() else []
        last = steps[-1] if steps else (done if done is not None else start)
        rewind = rng.randint(0, max(0, last))  # a checkpoint at or before what was written
        history = [s for s in steps if s < rewind]
        out["rewinds"].append(last - rewind)
        start = rewind
    before = len(train_lines(run_dir))
    run_segment(rng, run_dir, start, interval, facade, None, out)
    final = live_steps(run_dir)
    own = [r["step"] for r in segment_records(run_dir, before)]
    if final != history + own or len(set(final)) != len(final):
        out["problems"].append(f"{run_dir.name}: history {final} != {history} + {own}")
    meta = json.loads((run_dir / "monitor_logs" / "run_meta.json").read_text())
    if meta.get("status") != "completed":
        out["problems"].append(f"{run_dir.name}: final status {meta.get('status')!r}")
    out["cases"] += 1
    print(f"case {index:02d}: interval {interval}, {'facade' if facade else 'Monitor'}, "
          f"{len(meta['segments'])} segments, {len(final)} live records", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--keep", help="run folders go here (default: a temporary folder)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    out = {"cases": 0, "kills": {"SIGTERM": 0, "SIGKILL": 0}, "hangs": [], "crashes": [],
           "problems": [], "term_exit_s": [], "sigkill_values_lost": 0, "rewinds": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        base.mkdir(parents=True, exist_ok=True)
        for index in range(args.cases):
            run_case(rng, index, base, out)
    kills = out["kills"]
    print(f"\ncases tried: {out['cases']}, kills: {sum(kills.values())} ({kills['SIGTERM']} "
          f"SIGTERM, {kills['SIGKILL']} SIGKILL), rewinds of 0..{max(out['rewinds'])} steps")
    print(f"data lost: {len(out['problems'])}, hangs: {len(out['hangs'])}, crashes of "
          f"training: {len(out['crashes'])}")
    for line in out["problems"] + out["hangs"] + out["crashes"]:
        print("  " + line)
    if out["term_exit_s"]:
        t = out["term_exit_s"]
        print(f"SIGTERM to exit: median {statistics.median(t):.3f} s, max {max(t):.3f} s "
              f"(torchrun waits 30 s before SIGKILL)")
    print(f"values a SIGKILL lost since the last record (by design): "
          f"{out['sigkill_values_lost']}")
    sys.exit(1 if out["problems"] or out["hangs"] or out["crashes"] else 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        run_dir, start, end, interval, facade = sys.argv[2:7]
        worker(run_dir, int(start), int(end), int(interval), facade == "1")
    else:
        main()
