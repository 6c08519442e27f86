# Sourced by demo.sh and test.sh: creates .venv if missing and installs the package with
# the CPU build of torch 2.13.0 that lies on this kind of machine's disk (never a CUDA
# download: torch is pinned exactly, in the same pip command as every extra). Installs the
# test tools and every optional extra (tensorboard, wandb, matplotlib, pandas, peft), which
# the suite tests. Idempotent; a second run installs nothing new.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "monitor needs Python >= 3.10 (found $("$PYTHON_BIN" --version))" >&2; exit 1; }
    "$PYTHON_BIN" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch==2.13.0" -e "$ROOT[dev,all]"
"$VENV/bin/python" -c 'import torch, monitor' \
    || { echo "bootstrap failed: torch/monitor do not import from $VENV" >&2; exit 1; }
