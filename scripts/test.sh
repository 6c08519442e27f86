#!/usr/bin/env bash
# Set up .venv (see bootstrap.sh), lint (ruff) and type-check (mypy) the package, then run
# the whole suite in parallel. A lint or type error fails before any test runs.
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
"$VENV/bin/ruff" check monitor tests scripts
"$VENV/bin/mypy"
exec "$VENV/bin/python" -m pytest -n auto --dist worksteal "$@"
