#!/usr/bin/env bash
# Full FORCE_CUDA=1 compile and link of astrea._C against the CUDA build of torch, on a
# machine that need not have a GPU. Uses its own venv ($CUDA_VENV, default
# .venv-cuda-build, ~6 GB) and a copy of the tracked sources, so the main install is not
# touched. CUDA_HOME must be the toolkit root (holding bin/nvcc and include/cuda_runtime.h).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CUDA_VENV=${CUDA_VENV:-$ROOT/.venv-cuda-build}
CUDA_TORCH=${CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
# nvcc may be a wrapper script: follow it to the toolkit that holds the headers.
if [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
  real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" | head -1 || true)
  [ -n "$real" ] && CUDA_HOME=$(dirname "$(dirname "$real")")
fi
[ -f "$CUDA_HOME/include/cuda_runtime.h" ] || { echo "no CUDA toolkit at CUDA_HOME=$CUDA_HOME" >&2; exit 1; }

[ -x "$CUDA_VENV/bin/python" ] || python3 -m venv "$CUDA_VENV"
"$CUDA_VENV/bin/python" -m pip install -q "$CUDA_TORCH" "setuptools>=77" wheel ninja numpy
site=$("$CUDA_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Headers torch's CUDA build expects (cusparse.h, ...) ship in the nvidia wheels.
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
cd "$work"
FORCE_CUDA=1 "$CUDA_VENV/bin/python" setup.py build_ext --inplace
"$CUDA_VENV/bin/python" - <<'PY'
import json, pathlib
info = json.loads(pathlib.Path("astrea/_build_info.json").read_text())
assert info["with_cuda"], info
so = next(pathlib.Path("astrea").glob("_C*.so"))
print(f"built {so} ({so.stat().st_size} bytes) with CUDA, arch {info['cuda_arch_list']}")
PY
# Loading needs no GPU: check that every op has its CUDA kernel registered.
PYTHONPATH=. "$CUDA_VENV/bin/python" - <<'PY'
import torch
import astrea._C  # noqa: F401  (registers the ops)
from astrea import _backend
missing = [op for op, spec in _backend.OPS.items() if spec.kernel == "extension"
           and not torch._C._dispatch_has_kernel_for_dispatch_key(f"astrea::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print("CUDA kernels registered for every extension op")
PY
