import os
import subprocess
import sys

import pytest
import torch

import astrea
from astrea import _backend, _extension


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("ASTREA_BACKEND", raising=False)
    assert astrea.current_backend() == "auto"


def test_env_var_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("ASTREA_BACKEND", "reference")
    assert astrea.current_backend() == "reference"


def test_context_manager_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv("ASTREA_BACKEND", "reference")
    with astrea.backend("triton"):
        assert astrea.current_backend() == "triton"
        with astrea.backend("auto"):
            assert astrea.current_backend() == "auto"
        assert astrea.current_backend() == "triton"
    assert astrea.current_backend() == "reference"


def test_bad_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend name must be one of auto, triton, reference; got 'cuda'"):
        with astrea.backend("cuda"):
            pass
    monkeypatch.setenv("ASTREA_BACKEND", "fast")
    with pytest.raises(ValueError, match="ASTREA_BACKEND must be one of"):
        astrea.current_backend()


@pytest.fixture
def triton_op():
    spec = _backend.declare_op("_test_triton_op", kernel="triton")
    yield spec.name
    del _backend.OPS[spec.name]


def test_triton_op_on_cpu(triton_op, monkeypatch):
    cpu = torch.device("cpu")
    assert _backend.choose(triton_op, cpu) == "reference"
    with astrea.backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _backend.choose(triton_op, cpu) == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(astrea.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            _backend.choose(triton_op, cpu)
    with astrea.backend("reference"):
        assert _backend.choose(triton_op, torch.device("cuda")) == "reference"


@pytest.mark.parametrize("cpu_op, expected", [("moco_logits", "extension"), ("_no_such_op", "reference")])
def test_triton_op_with_a_cpu_kernel_in_the_extension(cpu_op, expected):
    """A Triton op whose CPU kernel lives in _C runs it on CPU tensors under auto when _C
    registers it (moco_logits stands in for such a kernel), the reference otherwise."""
    if expected == "extension" and not _extension.available():
        pytest.skip(f"astrea._C did not load: {_extension.load_error()}")
    spec = _backend.declare_op("_test_triton_op_with_cpu_kernel", kernel="triton", cpu_extension_op=cpu_op)
    try:
        assert _backend.choose(spec.name, torch.device("cpu")) == expected
        with astrea.backend("reference"):
            assert _backend.choose(spec.name, torch.device("cpu")) == "reference"
    finally:
        del _backend.OPS[spec.name]


def test_cpu_extension_op_is_for_triton_ops():
    with pytest.raises(ValueError, match="cpu_extension_op is for Triton ops"):
        _backend.declare_op("_bad", kernel="extension", cpu_extension_op="moco_logits")


def test_triton_op_on_cuda_runs_triton(triton_op):
    assert _backend.choose(triton_op, torch.device("cuda")) == "triton"


def test_import_without_triton_or_extension():
    """astrea imports with neither triton nor _C; the ops then say what is missing."""
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton.") or name == "astrea._C":
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
import torch, astrea
from astrea import _backend, _extension
assert "triton" not in sys.modules
try:
    astrea.ops.queue_enqueue_(torch.zeros(4, 2), torch.zeros(1, dtype=torch.long), torch.ones(1, 2))
except astrea.BackendUnavailableError as e:
    print("EXT:", e)
_backend.declare_op("probe", kernel="triton")
try:
    _backend.choose("probe", torch.device("cuda"))
except astrea.BackendUnavailableError as e:
    print("TRITON:", e)
"""
    env = {k: v for k, v in os.environ.items() if k != "ASTREA_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "EXT: astrea.ops.queue_enqueue_ needs the compiled extension astrea._C" in out
    assert "pip install --no-build-isolation -e ." in out
    assert "TRITON: astrea.ops.probe on cuda needs Triton" in out
    assert "pip install triton" in out
