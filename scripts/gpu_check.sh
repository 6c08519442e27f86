#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py; docs/PERFORMANCE.md) in one call, on a
# machine with one CUDA GPU and its own torch:
#
#   PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
#
# Uses the Python that is there ($PYTHON, else python3) as it is: never installs torch or
# anything else, never builds .venv (bootstrap.sh would pin the CPU torch). This checkout
# goes on PYTHONPATH instead of an install. The JSON goes to $OUT/gpu-check-results.json
# when $OUT is set (else the repository root); extra arguments go to gpu_check.py
# (e.g. --cpu, --sections overhead). A hard limit ($GPU_CHECK_TIMEOUT_S, 470 s) stops it
# inside the 8 minutes even if something hangs; the JSON is rewritten after each section.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
"$PY" -c 'import sys, torch, numpy, monitor
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" cuda available: {torch.cuda.is_available()}, monitor from {monitor.__file__}")' \
    || { echo "gpu_check: torch, numpy or this checkout's monitor does not import with $PY" >&2
         exit 1; }
args=()
if [[ -n "${OUT:-}" ]]; then
    args+=(--out "$OUT/gpu-check-results.json")
fi
timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-470}" "$PY" scripts/gpu_check.py ${args[@]+"${args[@]}"} "$@"
