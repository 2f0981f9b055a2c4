"""The moco CUDA kernels checked on a machine without a GPU, with the host C++ compiler:

* tests/cpp/moco_tile_layout.cpp: the tensor-core tile geometry of csrc/cuda/moco_tiles.h
  (every wmma fragment covered once, aligned, inside its shared-memory array; the products
  replayed with wmma's documented load/store semantics);
* tests/cpp/moco_kernels_emulated.cpp: the kernels of csrc/cuda/moco_device.cuh themselves,
  compiled against tests/cpp/cuda_emulation.h (CUDA threads as std::threads, barriers,
  shuffles, fp16/bf16 rounding, wmma), for bf16 / fp16 (tensor-core tiles) and fp32 (FMA
  tiles), against a float64 reference.

Neither replaces a GPU run: they cannot see the hardware's fragment layouts, timing-dependent
races that happen not to show, or performance."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPP = ROOT / "tests" / "cpp"


def _compiler(tmp_path: Path) -> str:
    """A host C++ compiler with C++20's <barrier> (GCC >= 11, Clang >= 11), else skip."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler on PATH")
    probe = tmp_path / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    result = subprocess.run([compiler, "-std=c++20", "-pthread", str(probe), "-o", str(tmp_path / "probe")],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"{compiler} lacks C++20 <barrier>: {result.stderr[-300:]}")
    return compiler


def _build_and_run(source: str, tmp_path: Path) -> str:
    compiler = _compiler(tmp_path)
    binary = tmp_path / Path(source).stem
    build = subprocess.run([compiler, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Werror",
                            "-I", str(ROOT / "csrc"), "-I", str(CPP), str(CPP / source), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def test_tensor_core_tile_layout(tmp_path):
    assert "moco tile layouts OK" in _build_and_run("moco_tile_layout.cpp", tmp_path)


def test_kernels_emulated_on_host_match_float64(tmp_path):
    out = _build_and_run("moco_kernels_emulated.cpp", tmp_path)
    assert "moco kernels OK" in out
    assert all(dtype in out for dtype in ("bf16 N=", "fp16 N=", "fp32 N="))
