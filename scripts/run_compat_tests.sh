#!/usr/bin/env bash
# The test suite's second pass: under triton 3.6.0 (the version on the lent GPUs; its
# interpreter needs numpy < 2.3) with every CPU code path capped to AVX2 (ATen, MKL, oneDNN:
# scripts/cpu_isa.sh) and one torch thread, so
# that code needing a newer Triton, and tolerances or determinism that hold only with one
# CPU code path or thread count, fail here and not on another host.
#
# The environment is $VENV with $COMPAT_SITE (default .venv-triton36) in front of it on
# PYTHONPATH: that folder holds only triton 3.6.0 and numpy < 2.3, installed once (a few
# seconds, no compile); torch, astrea and everything else are $VENV's.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SITE=${COMPAT_SITE:-.venv-triton36}
TRITON_VERSION=3.6.0

if ! PYTHONPATH="$SITE" "$VENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$TRITON_VERSION')" 2>/dev/null; then
  rm -rf "$SITE"
  "$VENV/bin/python" -m pip install -q --no-deps --target "$SITE" "triton==$TRITON_VERSION" "numpy>=1.24,<2.3"
fi
# A torch.compile cache of its own: the main pass's cache holds code for its capability.
INDUCTOR_CACHE=$(mktemp -d)
trap 'rm -rf "$INDUCTOR_CACHE"' EXIT
source scripts/cpu_isa.sh
use_cpu_isa avx2
export PYTHONPATH="$SITE" OMP_NUM_THREADS=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # as run_tests.sh TORCHINDUCTOR_CACHE_DIR="$INDUCTOR_CACHE"
echo "compat pass: triton $("$VENV/bin/python" -c 'import triton; print(triton.__version__)'), ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS=$MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA=$ONEDNN_MAX_CPU_ISA, OMP_NUM_THREADS=$OMP_NUM_THREADS"
# Test paths among the arguments replace the whole suite (options alone keep it).
paths=tests
for argument in "$@"; do
  case "$argument" in tests/*|benchmarks/*) paths="" ;; esac
done
"$VENV/bin/python" -m pytest $paths -q -ra -p no:cacheprovider "$@"
