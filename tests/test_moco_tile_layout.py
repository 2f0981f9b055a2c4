"""Host check of the tensor-core tile geometry of the moco CUDA kernels (csrc/cuda/moco_tiles.h):
tests/cpp/moco_tile_layout.cpp is compiled with the host C++ compiler and run. It needs no GPU
and no CUDA toolkit: coverage, alignment and bounds of every wmma fragment, and the score tile
and gradient accumulation replayed with wmma's documented load/store semantics."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tensor_core_tile_layout(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler on PATH")
    binary = tmp_path / "moco_tile_layout"
    build = subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", str(ROOT / "csrc"),
                            str(ROOT / "tests" / "cpp" / "moco_tile_layout.cpp"), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "moco tile layouts OK" in result.stdout
