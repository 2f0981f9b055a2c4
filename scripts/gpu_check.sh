#!/usr/bin/env bash
# The GPU run in time-boxed phases, for a CUDA machine without network access:
#   scripts/gpu_check.sh OUTDIR [--phases build,smoke,bench,tests,sanitizer] [--budget SECONDS] [--dry-run]
# build (180 s), smoke (120 s), headline benchmarks (240 s), the test suite (what is left),
# compute-sanitizer (60 s); 540 s in all. Each phase writes its log and results to OUTDIR when
# it ends and OUTDIR/phases.json records them all, so a run cut short keeps what it finished.
# See scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
