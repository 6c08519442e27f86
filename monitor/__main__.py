"""Command line: ``python -m monitor report RUN_DIR`` and ``python -m monitor compare A B``."""

from __future__ import annotations

import argparse
import sys

from monitor import report
from monitor.readback import read_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monitor",
                                description="Read a monitor run folder back.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="tables per part and PNG plots in RUN_DIR/report/")
    r.add_argument("run_dir")
    r.add_argument("--run-id", default=None, help="when the folder holds several runs")
    r.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/report)")
    r.add_argument("--all", action="store_true", help="every per-component metric too")
    r.add_argument("--no-plots", action="store_true", help="tables only")
    c = sub.add_parser("compare", help="overlay two runs' plots")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", default=None,
                   help="folder for the PNGs (default RUN_A/report/compare-<RUN_B name>)")
    args = p.parse_args(argv)
    try:
        if args.command == "report":
            run = read_run(args.run_dir, args.run_id)
            print(report.run_tables(run, all_metrics=args.all))
            if args.no_plots:
                return 0
            paths = report.report(run, args.out)
        else:
            runs = [read_run(args.run_a), read_run(args.run_b)]
            for run in runs:
                print(report.run_tables(run))
                print()
            paths = report.compare(runs[0], runs[1], args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        return 2
    if report.pyplot() is None:
        print(f"\nmonitor: {report.NO_MATPLOTLIB}")
    else:
        print("\nplots:")
        for path in paths:
            print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
