#!/usr/bin/env bash
# The whole GPU run, for a CUDA machine without network access:
#   scripts/gpu_check.sh OUTDIR
# builds astrea._C with CUDA against the machine's torch, reports the build, runs the full
# test suite on CUDA, the _C CUDA kernels under compute-sanitizer (memcheck and racecheck,
# where the toolkit has it) and the benchmarks, and writes logs, the benchmark JSON and its
# markdown report to OUTDIR. Exits non-zero if the build, the tests or a sanitizer check
# fail (the benchmarks still run after a failure, so one call gives every figure).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
echo "== build (FORCE_CUDA=1)"
if ! FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  exit 1
fi
"$PY" -m astrea info | tee "$OUT/info.txt"

echo "== tests"
"$PY" -m pytest tests -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== compute-sanitizer"
sanitizer_rc=0
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  for tool in memcheck racecheck; do
    "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" scripts/cuda_sanitizer_check.py \
      >"$OUT/sanitizer-$tool.log" 2>&1 || sanitizer_rc=1
    echo "$tool: $(tail -1 "$OUT/sanitizer-$tool.log")"
  done
else
  echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer-skipped.txt"
fi

echo "== benchmarks"
"$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/benchmarks.json" >"$OUT/benchmarks.log" 2>&1
bench_rc=$?
tail -5 "$OUT/benchmarks.log"
if [ -f "$OUT/benchmarks.json" ]; then
  "$PY" benchmarks/report.py "$OUT/benchmarks.json" >"$OUT/report.md" && cat "$OUT/report.md"
fi
echo "tests exit $tests_rc, sanitizer exit $sanitizer_rc, benchmarks exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$sanitizer_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
