import subprocess
import sys

import torch

from astrea import _backend, _extension, info


def test_info_command_runs_and_reports_truth():
    out = subprocess.run([sys.executable, "-m", "astrea.info"], capture_output=True, text=True, check=True).stdout
    assert f"torch                      {torch.__version__}" in out
    if _extension.available():
        assert "astrea._C                  loaded from" in out
        cuda_built = _extension.has_kernel("queue_enqueue_", "CUDA")
        assert ("built, arch" in out) == cuda_built
    else:
        assert "astrea._C                  not loaded" in out
    for name in _backend.OPS:
        assert name in out
    assert "flash-attn" in out and "xformers" in out


def test_op_table_matches_dispatch():
    for name, cpu, cuda in info.op_table():
        assert cpu == _backend.OPS[name].describe("cpu")
        assert cuda == _backend.OPS[name].describe("cuda")


def test_report_lists_each_ops_declared_capabilities():
    out = info.report()
    for name, spec in _backend.OPS.items():
        assert spec.capabilities() in out, name
    assert "num_experts <= 8192" in out and "num_experts <= 32" in out


def test_extension_is_built_here():
    """The documented install builds _C; a silent CPU-only or missing build is a failure."""
    assert _extension.available(), _extension.load_error()
    assert _extension.has_kernel("queue_enqueue_", "CPU")
    build = _extension.build_info()
    assert build["torch_version"] == torch.__version__
    assert build["with_cuda"] == _extension.has_kernel("queue_enqueue_", "CUDA")


def test_minimum_versions_are_reported_and_an_old_triton_is_refused_by_name(monkeypatch):
    rows = dict(info.minimum_version_rows())
    assert rows["torch minimum"].startswith(">= 2.10: met")
    assert rows["triton minimum"].startswith(">= 3.6: ")
    old = type(sys)("triton")
    old.__version__ = "3.2.0"
    monkeypatch.setitem(sys.modules, "triton", old)
    _backend.triton_import_error.cache_clear()
    try:
        why = _backend.triton_import_error()
    finally:
        monkeypatch.undo()
        _backend.triton_import_error.cache_clear()
    assert why == ("triton 3.2.0 is older than 3.6, the oldest astrea's kernels support; "
                   "install `pip install 'triton>=3.6'`")
    assert _backend.triton_import_error() is None
