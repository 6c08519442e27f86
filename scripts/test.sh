#!/usr/bin/env bash
# Set up .venv (see bootstrap.sh), then run the whole suite in parallel.
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -n auto "$@"
