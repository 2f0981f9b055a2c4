#!/usr/bin/env bash
# Creates (or reuses) the virtual environment $VENV (default .venv) and installs astrea
# into it in editable mode, building astrea._C. Needs only Python >= 3.10 and a C++
# compiler. If the Python that creates the venv already has torch (a CUDA machine), the
# venv sees it and keeps it; otherwise the CPU build torch==2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "bootstrap: using the torch already installed for $PYTHON"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# Build requirements first: the editable install below runs without build isolation so
# that it compiles against this torch instead of downloading another one.
"$PY" -m pip install -q "setuptools>=77" wheel ninja
"$PY" -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
