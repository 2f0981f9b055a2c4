#!/usr/bin/env bash
# Runs the test suite in $VENV. pytest exits non-zero on any failure and with 5 when no
# test ran; both fail this script.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# OpenMP threads sleep instead of spinning between parallel regions: the multi-process tests
# (2-4 ranks of 2 threads each on a 2-core host) otherwise spend their time in each other's spins.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$VENV/bin/python" -m pytest tests -q -ra "$@"
