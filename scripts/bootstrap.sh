# Sourced by demo.sh and test.sh: creates .venv if missing and installs the package with
# the CPU build of torch 2.13.0 that lies on this kind of machine's disk (never a CUDA
# download: torch is pinned exactly, in the same pip command as every extra). Installs the
# test tools and every optional extra (tensorboard, wandb, matplotlib, pandas, peft), which
# the suite tests. Idempotent; a second run installs nothing new (and skips pip: a stamp).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "monitor needs Python >= 3.10 (found $("$PYTHON_BIN" --version))" >&2; exit 1; }
    "$PYTHON_BIN" -m venv "$VENV"
fi
# pip's own check of an up-to-date venv takes 15-60 s: skip it when the venv was set up
# from this very pyproject.toml and bootstrap.sh (a stamp of both) and still imports torch
# and this checkout's monitor
STAMP="$VENV/.bootstrap-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | cksum)"
imports() {
    "$VENV/bin/python" -c 'import sys, torch, monitor
sys.exit(not monitor.__file__.startswith(sys.argv[1]))' "$ROOT/" 2>/dev/null
}
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! imports; then
    # pip byte-compiles every file it installs on one core (torch alone: thousands);
    # compileall does the same on every core: 95-127 s -> 87-101 s on 2 cores. The .pyc
    # files must exist: where PYTHONDONTWRITEBYTECODE is set, imports would never write them
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile \
        "torch==2.13.0" -e "$ROOT[dev,all]"
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # not the packages' own test suites (2,500 files nothing imports); -qq: a few packages
    # ship files that are not Python 3 (test data), which pip skips too
    "$VENV/bin/python" -m compileall -qq -j 0 -x '/tests/' "$SITE" >/dev/null || true
    imports || { echo "bootstrap failed: torch/monitor do not import from $VENV" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi
