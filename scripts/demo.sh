#!/usr/bin/env bash
# The main job: set up .venv, train a small model on 2 CPU ranks (torchrun, gloo, DDP) with
# the monitor on every rank, then show the log tree rank 0 wrote and what it says.
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
RUN_ID="${RUN_ID:-demo-$(date +%Y%m%d-%H%M%S)}"
RUN_DIR="$ROOT/runs/$RUN_ID"
OMP_NUM_THREADS=1 "$VENV/bin/torchrun" --standalone --nproc_per_node 2 \
    scripts/demo_train.py --run-dir "$RUN_DIR" --run-id "$RUN_ID" "$@"
echo
echo "== log tree: $RUN_DIR"
(cd "$RUN_DIR" && find . -type f | sort)
echo
"$VENV/bin/python" scripts/show_run.py "$RUN_DIR" "$RUN_ID"
