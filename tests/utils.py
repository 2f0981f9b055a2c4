"""Helpers shared by the op tests."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

import astrea
from astrea import _backend, _extension

# What runs an op on this machine's CPU tensors: the Triton kernels (under the interpreter),
# the C++ CPU kernels of astrea._C (which the auto backend picks) and the references.
KERNELS = ("triton", "cpu")
IMPLEMENTATIONS = (*KERNELS, "reference")
# "torch": torch's own kernels (an op declared with kernel="torch"), under auto.
_BACKEND_OF = {"triton": "triton", "cpu": "auto", "torch": "auto", "reference": "reference"}
# The ``impl`` argument the registered ops get for each (direct torch.ops.astrea calls pass it).
CHOICE_OF = {"triton": "triton", "cpu": "extension", "torch": "torch", "reference": "reference"}


@contextlib.contextmanager
def running(impl: str, *ops: str) -> Iterator[None]:
    """Runs the ops called inside on ``impl`` (one of :data:`IMPLEMENTATIONS`), checking that
    each of ``ops`` really dispatches there on CPU tensors (skipping the test when ``impl`` is
    ``cpu`` and astrea._C lacks the kernel). Backward passes run the implementation their
    forward chose, so a ``backward()`` after the block still tests ``impl``."""
    if impl == "cpu":
        missing = [op for op in ops if not _extension.has_kernel(_backend.OPS[op].cpu_kernel, "CPU")]
        if missing:
            pytest.skip(f"astrea._C is not built with the CPU kernels of {missing}")
    with astrea.backend(_BACKEND_OF[impl]):
        for op in ops:
            chosen = _backend.OPS[op].choose(torch.device("cpu"))
            assert chosen == CHOICE_OF[impl], f"{op} dispatches to {chosen}, not {impl}"
        yield

# (atol, rtol) of a kernel against its fp32 reference, by the dtype of the inputs.
def assert_identical(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "") -> None:
    """Exactly equal values (NaN matching NaN), reporting the first mismatches. Every inexact
    comparison in the tests has its own derived bound (assert_within, assert_within_torch_error):
    there is no default tolerance table."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~((a == e) | (a.isnan() & e.isnan()))
    if bad.any():
        where = bad.nonzero()[:10].tolist()
        rows = "\n".join(f"  at {tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}" for i in where)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first ones:\n{rows}")


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous() or x.shape[-1] <= 1
    return view


# Unit roundoff of each dtype: the relative error of rounding one value to it.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def accumulation_bound(abs_sum: torch.Tensor, length: int, expected: torch.Tensor, dtype: torch.dtype, *,
                       accumulation: torch.dtype = torch.float32) -> torch.Tensor:
    """Worst-case error of a sum of ``length`` products accumulated in ``accumulation`` (fp32;
    float64 for float64 kernels) and rounded to ``dtype`` (Higham: |error| <= length * u *
    sum |terms|), with ``abs_sum`` = sum |terms| computed in float64: the bound that holds
    whatever order a BLAS or kernel sums in. The final rounding adds half an ulp: relative for
    normal values, half the subnormal spacing below them (fp16 gradients often land there)."""
    info = torch.finfo(dtype)
    half_subnormal_spacing = info.tiny * info.eps / 2
    return (length * UNIT_ROUNDOFF[accumulation] * abs_sum + UNIT_ROUNDOFF[dtype] * expected.abs()
            + half_subnormal_spacing)


def float64_leaves(*tensors: torch.Tensor | None, magnitude: bool = False) -> list[torch.Tensor | None]:
    """Each tensor detached and widened to float64 (``|t|`` when ``magnitude``), as a leaf
    that requires grad; None stays None. A sum of products with nonnegative coefficients
    (a matmul, a combine) evaluated on the magnitudes gives each output's sum |terms|, and
    ``torch.autograd.grad`` of that with ``|grad|`` each gradient's: the ``abs_sum`` of
    :func:`accumulation_bound`."""
    return [None if t is None else (t.detach().double().abs() if magnitude else t.detach().double()).requires_grad_()
            for t in tensors]


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, *, what: str = "") -> None:
    """Elementwise ``|actual - expected| <= bound`` (NaN matching NaN), reporting the worst misses."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e, b = (t.detach().double().cpu() for t in (actual, expected, bound))
    bad = ~(((a - e).abs() <= b) | (torch.isnan(a) & torch.isnan(e)))
    if bad.any():
        rows = "\n".join(f"  at {tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}, "
                         f"bound {b[tuple(i)].item():.3g}" for i in bad.nonzero()[:10].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; "
                             f"first ones:\n{rows}")


def assert_within_torch_error(actual: torch.Tensor, expected64: torch.Tensor, torch_value: torch.Tensor, *,
                              what: str = "", factor: float = 4.0, scale: float | None = None,
                              dtype: torch.dtype | None = None, floor: float = 0.0) -> None:
    """flash-attention's rule: the largest error of ``actual`` against the float64 oracle
    ``expected64`` is at most ``factor`` times that of ``torch_value``, PyTorch's own computation
    of the same formula in the same dtype, plus a floor of 8 ulps of the result's dtype at the
    result's scale (PyTorch can be exact by luck on a few values). ``scale`` replaces the
    result's largest magnitude there for a result that is a difference of larger values (a
    log-sum-exp minus one of its logits): one rounding of those is that big. ``dtype`` replaces
    the result's dtype there when the values were computed in a coarser one (fp32 gradients of
    bf16 products), and ``floor`` adds a caller's derived absolute allowance."""
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    if actual.numel() == 0:
        return
    expected = expected64.detach().double().cpu()
    err = (actual.detach().double().cpu() - expected).abs().max().item()
    torch_err = (torch_value.detach().double().cpu() - expected).abs().max().item()
    floor += 8 * torch.finfo(dtype or actual.dtype).eps * (expected.abs().max().item() if scale is None else scale)
    assert err <= factor * torch_err + floor, (f"{what}: error {err:.3g} against float64, PyTorch's own "
                                               f"{torch_err:.3g} (allowed {factor} x that + {floor:.3g})")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(count)``, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's values as integers of the same width: equal exactly when bitwise equal (-0.0
    and +0.0 differ, a NaN equals the same NaN)."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view(_SAME_SIZE_INT[t.element_size()])


def assert_bitwise_reproducible(run, thread_counts: tuple[int, ...] = (2, 2, 1)) -> None:
    """``run()`` returns named tensors (a dict); it gives bitwise identical tensors (same dtype and
    shape) on each of ``thread_counts`` in turn: two runs on 2 threads, then one on 1 thread.
    A failure names every output that differs, with how many elements and by how much."""
    results = []
    for count in thread_counts:
        with torch_threads(count):
            results.append({name: t.detach().clone() for name, t in run().items()})
    first = results[0]
    differences = []
    for count, other in zip(thread_counts[1:], results[1:]):
        assert other.keys() == first.keys()
        for name, a in first.items():
            b = other[name]
            assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs " \
                                                              f"{b.dtype}{tuple(b.shape)}"
            if not torch.equal(_bits(a), _bits(b)):
                differing = int((_bits(a) != _bits(b)).sum())
                largest = (a.double() - b.double()).abs().max().item()
                differences.append(f"{name} differs between {thread_counts[0]} and {count} threads: "
                                   f"{differing} of {a.numel()} elements, max |diff| {largest:.3g}")
    assert not differences, "; ".join(differences)


def assert_each_within_torch_error(actual: dict, expected64: dict, torch_value: dict, *, what: str = "",
                                   factor: float = 4.0) -> None:
    """:func:`assert_within_torch_error` for each floating tensor of a dict of named tensors (a
    state dict, say), judged against the float64 oracle's tensor of that name and PyTorch's own
    fp32 computation's; integer tensors (counters, pointers) must equal both exactly."""
    assert actual.keys() == expected64.keys() == torch_value.keys(), f"{what}: names differ"
    for name, value in expected64.items():
        if value.is_floating_point():
            assert_within_torch_error(actual[name], value, torch_value[name], what=f"{what} {name}", factor=factor)
        else:
            assert torch.equal(actual[name], value) and torch.equal(torch_value[name], value), f"{what} {name}"


def route_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lets a whole :class:`astrea.nn.SparseMoE` (router, permute, weighted combine) run in
    float64 until ``monkeypatch`` is undone, for a float64 oracle of a model: those public ops take
    fp32/fp16/bf16 only, so they are replaced by their references (the same formulas,
    differentiable through plain autograd). :func:`astrea.ops.moe_experts` takes float64 itself."""
    from astrea import ops, reference
    from astrea.nn import router as router_module

    monkeypatch.setattr(router_module, "router_topk",
                        lambda logits, k, **options: ops.RouterOutput(*reference.router_topk(logits, k, **options)))
    monkeypatch.setattr(ops, "permute", lambda x, dispatch: reference.permute(x, dispatch.sorted_token_ids))
    monkeypatch.setattr(ops, "weighted_combine", lambda expert_out, weights, dispatch, expert_scale=None:
                        reference.weighted_combine(expert_out, weights, dispatch.indices, dispatch.inverse_positions,
                                                   dispatch.expert_offsets.numel() - 1, expert_scale))
