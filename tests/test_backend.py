import os
import subprocess
import sys
import threading

import pytest
import torch

import astrea
from astrea import _backend, _extension, ops


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
    yield spec
    del _backend.OPS[spec.name]


def test_triton_op_on_cpu(triton_op, monkeypatch):
    cpu = torch.device("cpu")
    assert triton_op.choose(cpu) == "reference"
    with astrea.backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert triton_op.choose(cpu) == "triton"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(astrea.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            triton_op.choose(cpu)
        assert triton_op.describe("cpu") == "unavailable: needs TRITON_INTERPRET=1"
    with astrea.backend("reference"):
        assert triton_op.choose(torch.device("cuda")) == "reference"


@pytest.mark.parametrize("cpu_op, expected", [("moco_logits", "extension"), ("_no_such_op", "reference")])
def test_triton_op_with_a_cpu_kernel_in_the_extension(cpu_op, expected):
    """A Triton op whose CPU kernel lives in _C runs it on CPU tensors under auto when _C
    registers it (moco_logits stands in for such a kernel), the reference otherwise."""
    if expected == "extension" and not _extension.available():
        pytest.skip(f"astrea._C did not load: {_extension.load_error()}")
    spec = _backend.declare_op("_test_triton_op_with_cpu_kernel", kernel="triton", cpu_kernel=cpu_op)
    try:
        assert spec.choose(torch.device("cpu")) == expected
        with astrea.backend("reference"):
            assert spec.choose(torch.device("cpu")) == "reference"
    finally:
        del _backend.OPS[spec.name]


def test_triton_op_with_torch_kernels_on_cpu(monkeypatch):
    """cpu_impl="torch": CPU tensors run torch's own kernels under auto, the Triton kernels
    under the triton backend (interpreter), CUDA tensors Triton."""
    spec = _backend.declare_op("_test_triton_op_with_torch_cpu", kernel="triton", cpu_impl="torch")
    try:
        cpu = torch.device("cpu")
        assert spec.choose(cpu) == "torch"
        assert spec.describe("cpu") == "torch"
        assert spec.choose(torch.device("cuda")) == "triton"
        with astrea.backend("triton"):
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            assert spec.choose(cpu) == "triton"
        with astrea.backend("reference"):
            assert spec.choose(cpu) == "reference"
    finally:
        del _backend.OPS[spec.name]
    for kwargs in (dict(kernel="triton", cpu_impl="reference"), dict(kernel="extension", cpu_impl="torch"),
                   dict(kernel="triton", cpu_impl="torch", cpu_kernel="moco_logits")):
        with pytest.raises(ValueError, match="cpu_impl must be 'torch', on a Triton op without a cpu_kernel"):
            _backend.declare_op("_bad_cpu_impl", **kwargs)
    assert "_bad_cpu_impl" not in _backend.OPS


def test_declared_capabilities_drive_validation_and_the_report():
    spec = _backend.declare_op("_test_capabilities", kernel="triton", dtypes={"cpu": (torch.float64,)},
                               limits={"num_experts": 4}, supports={"triton": "tiles of 4"})
    try:
        with pytest.raises(TypeError, match="_test_capabilities: x must have dtype float64 on cpu; got torch.float32"):
            spec.check_tensor("x", torch.zeros(2))
        assert spec.check_tensor("x", torch.zeros(2, dtype=torch.float64), ndim=1).dtype == torch.float64
        assert spec.limit("num_experts") == 4
        assert spec.capabilities() == "cpu: float64; num_experts <= 4; triton: tiles of 4"
        with pytest.raises(TypeError):
            spec.limits["num_experts"] = 5  # capabilities are read-only data
    finally:
        del _backend.OPS[spec.name]
    with pytest.raises(ValueError, match="kernel must be 'triton', 'extension' or 'torch'"):
        _backend.declare_op("_bad", kernel="cuda")


def test_triton_op_on_cuda_runs_triton(triton_op):
    assert triton_op.choose(torch.device("cuda")) == "triton"


def test_registered_ops_reject_an_unknown_implementation():
    with pytest.raises(ValueError, match="astrea::router_topk: impl must be one of triton, extension, reference; "
                                         "got 'fast'"):
        torch.ops.astrea.router_topk(torch.randn(3, 4), 2, "softmax", True, None, "fast")


# ---- the implementation is chosen once per forward call --------------------------------------


@pytest.fixture
def calls(monkeypatch):
    """Records (computation, implementation) of every implementation astrea runs."""
    seen = []
    original = _backend.Implementations.__call__

    def recording(self, impl, *args):
        seen.append((self.op, impl))
        return original(self, impl, *args)

    monkeypatch.setattr(_backend.Implementations, "__call__", recording)
    return seen


def _every_op_forward():
    """One differentiable call of each op with a backward of its own; returns a scalar."""
    logits = torch.randn(6, 4, requires_grad=True)
    routing = ops.router_topk(logits, 2)
    dispatch = ops.moe_dispatch(routing.indices, 4)
    x = torch.randn(6, 8, requires_grad=True)
    permuted = ops.permute(x, dispatch)
    combined = ops.weighted_combine(permuted, routing.weights, dispatch)
    sparse = ops.combine_residual(permuted, routing.weights, x, 0.5, seed=1, dispatch=dispatch)
    experts = [torch.randn(2, 3, 8, requires_grad=True) for _ in range(3)]
    weights = torch.rand(2, 3, requires_grad=True)
    dense = ops.dense_weighted_combine(experts, weights)
    fused = ops.combine_residual(experts, weights, torch.randn(2, 3, 8, requires_grad=True), 0.5, seed=2)
    residual = ops.stochastic_residual(dense, fused, 0.5, seed=3)
    return combined.sum() + sparse.sum() + residual.square().sum() + routing.prob_sums.sum()


@pytest.mark.parametrize("forward_backend", ["triton", "reference", "auto"])
def test_backward_runs_the_forwards_implementation_after_the_block(calls, forward_backend):
    """A backward after the ``with`` block, or inside another one, runs what its forward ran."""
    with astrea.backend(forward_backend):
        loss = _every_op_forward()
    forward_impls = {impl for _, impl in calls}
    assert len(forward_impls) == 1, calls
    calls.clear()
    with astrea.backend("reference" if forward_backend != "reference" else "triton"):
        loss.backward()
    backward_ops = {op for op, _ in calls}
    assert {"router_topk_backward", "permute_backward", "weighted_combine_backward", "dense_combine_backward",
            "stochastic_residual"} <= backward_ops, backward_ops
    assert {impl for _, impl in calls} == forward_impls, calls


def test_backward_on_another_thread_runs_the_forwards_implementation(calls):
    """Autograd may run backward on a worker thread, which does not see the caller's block."""
    with astrea.backend("triton"):
        loss = _every_op_forward()
    calls.clear()
    worker = threading.Thread(target=loss.backward)
    worker.start()
    worker.join()
    assert calls and {impl for _, impl in calls} == {"triton"}, calls


def test_backend_block_is_per_thread():
    seen = {}
    with astrea.backend("reference"):
        worker = threading.Thread(target=lambda: seen.setdefault("worker", astrea.current_backend()))
        worker.start()
        worker.join()
        assert astrea.current_backend() == "reference"
    assert seen["worker"] == _backend.current_backend()


def test_compiled_graph_is_guarded_on_the_backend_block(calls):
    """torch.compile takes the implementation as a constant of the trace and recompiles when
    another backend block is entered: a later switch is honoured, forward and backward."""
    logits = torch.randn(6, 4, requires_grad=True)
    compiled = torch.compile(lambda x: ops.router_topk(x, 2).prob_sums.sum(), fullgraph=True, backend="aot_eager")
    for name, expected in [("triton", "triton"), ("reference", "reference"), ("triton", "triton")]:
        calls.clear()
        with astrea.backend(name):
            compiled(logits).backward()
        assert calls and {impl for _, impl in calls} == {expected}, (name, calls)


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
probe = _backend.declare_op("probe", kernel="triton")
try:
    probe.choose(torch.device("cuda"))
except astrea.BackendUnavailableError as e:
    print("TRITON:", e)
"""
    env = {k: v for k, v in os.environ.items() if k != "ASTREA_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "EXT: astrea.ops.queue_enqueue_ needs the compiled extension astrea._C" in out
    assert "pip install --no-build-isolation -e ." in out
    assert "TRITON: astrea.ops.probe on cuda needs Triton" in out
    assert "pip install triton" in out
