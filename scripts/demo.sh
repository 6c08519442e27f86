#!/usr/bin/env bash
# The main job: set up .venv, train a small model on 2 CPU ranks (torchrun, gloo, DDP) with
# the monitor on every rank, then show the log tree rank 0 wrote, what it says, and the
# report (tables and PNG plots in runs/<id>/report/). TensorBoard events are written when
# tensorboard is installed (bootstrap installs it); `WANDB_MODE=offline bash
# scripts/demo.sh --wandb` also writes an offline W&B run under runs/<id>/wandb/.
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
echo
"$VENV/bin/python" -m monitor report "$RUN_DIR"
echo
echo "== next"
echo "report again:  $VENV/bin/python -m monitor report runs/$RUN_ID"
[ -d "$RUN_DIR/tensorboard" ] && \
    echo "TensorBoard:   $VENV/bin/tensorboard --logdir runs/$RUN_ID/tensorboard"
if [ -d "$RUN_DIR/wandb" ]; then
    echo "W&B upload:    $VENV/bin/wandb sync runs/$RUN_ID/wandb/offline-run-*"
fi
