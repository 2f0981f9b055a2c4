#!/usr/bin/env bash
# Runs the test suite in $VENV. pytest exits non-zero on any failure and with 5 when no
# test ran; both fail this script.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest tests -q -ra "$@"
