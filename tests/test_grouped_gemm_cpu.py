"""The C++ grouped GEMMs of moe_experts on CPU tensors (csrc/cpu/experts.cpp): values against a
float64 per-expert product within the accumulation bound, every layout the op hands them
(transposed weight views, strided rows, empty experts, rows past the last expert), clear
errors, and bitwise identical results on 1 and 2 threads for the long reductions where
torch's own CPU grouped_mm splits the sum over its threads."""

from __future__ import annotations

import pytest
import torch

from astrea import _extension
from tests.utils import accumulation_bound, assert_bitwise_reproducible, assert_within, strided

pytestmark = pytest.mark.skipif(not _extension.has_kernel("grouped_mm_cpu", "CPU"), reason="astrea._C is not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *counts]).cumsum(0)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped_mm_float64(a, b, offsets):
    bounds = offsets.tolist()
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    for e, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        out[lo:hi] = a[lo:hi].double() @ b[e].double()
    return out


def _weight_grad_float64(a, b, offsets):
    bounds = offsets.tolist()
    return torch.stack([a[:, lo:hi].double() @ b[lo:hi].double() for lo, hi in zip(bounds, bounds[1:])])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed-b", "strided-a"])
def test_grouped_mm(dtype, layout):
    g = torch.Generator().manual_seed(0)
    # An expert without rows, one of a single row, one of more than a tile (256 rows), 5 rows past
    # offsets[E].
    counts, k, n = [3, 0, 1, 300, 17], 37, 29
    offsets = _offsets(counts)
    a = torch.randn(sum(counts) + 5, k, generator=g).to(dtype)
    b = torch.randn(len(counts), k, n, generator=g).to(dtype)
    if layout == "transposed-b":  # gate_up_proj.transpose(-2, -1) as moe_experts passes it
        b = b.transpose(-2, -1).contiguous().transpose(-2, -1)
    if layout == "strided-a":
        a = strided(a)
    out = torch.ops.astrea.grouped_mm_cpu(a, b, offsets)
    assert out.dtype == dtype and out.shape == (a.shape[0], n)
    expected = _grouped_mm_float64(a, b, offsets)
    abs_sum = _grouped_mm_float64(a.abs(), b.abs(), offsets)
    assert_within(out, expected, accumulation_bound(abs_sum, k, expected, dtype, accumulation=_accumulation(dtype)),
                  what=f"grouped_mm_cpu {dtype} {layout}")
    assert torch.equal(out[offsets[-1]:], torch.zeros(5, n, dtype=dtype)), "rows past offsets[E] are zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_weight_grad(dtype):
    g = torch.Generator().manual_seed(1)
    counts, m, n = [0, 70, 2, 9], 1030, 13  # out[e] of more than a tile (1024 rows)
    offsets = _offsets(counts)
    a = strided(torch.randn(m, sum(counts), generator=g).to(dtype))
    b = torch.randn(sum(counts), n, generator=g).to(dtype)
    out = torch.ops.astrea.grouped_weight_grad_cpu(a, b, offsets)
    expected = _weight_grad_float64(a, b, offsets)
    abs_sum = _weight_grad_float64(a.abs(), b.abs(), offsets)
    bound = accumulation_bound(abs_sum, max(counts), expected, dtype, accumulation=_accumulation(dtype))
    assert_within(out, expected, bound, what=f"grouped_weight_grad_cpu {dtype}")
    assert torch.equal(out[0], torch.zeros(m, n, dtype=dtype)), "an expert without rows gets zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_long_reductions_have_one_order_on_any_thread_count(dtype):
    # Few rows and columns, a long K: the shape MKL splits over threads (the first projection of
    # a decode step, the d rows of a small expert).
    g = torch.Generator().manual_seed(2)
    counts, k, n = [4, 8, 1], 8192, 16
    offsets = _offsets(counts)
    a = torch.randn(sum(counts), k, generator=g, dtype=dtype)
    b = torch.randn(len(counts), k, n, generator=g, dtype=dtype)
    grad_a = torch.randn(n, sum(counts), generator=g, dtype=dtype)
    wide_b = torch.randn(sum(counts), k, generator=g, dtype=dtype)
    assert_bitwise_reproducible(lambda: {
        "grouped_mm": torch.ops.astrea.grouped_mm_cpu(a, b, offsets),
        "grouped_weight_grad": torch.ops.astrea.grouped_weight_grad_cpu(grad_a, wide_b, offsets),
    })


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_tiles_have_one_order_on_any_thread_count(dtype):
    # moe_experts' down projection on the benchmark shape (E=8, H=512, I=1024): a transposed
    # weight view and K = 1024, where oneDNN sizes its blocking by the threads OpenMP reports.
    g = torch.Generator().manual_seed(3)
    counts, k, n = [256] * 8, 1024, 512
    offsets = _offsets(counts)
    a = torch.randn(sum(counts), k, generator=g).to(dtype)
    b = torch.randn(len(counts), n, k, generator=g).to(dtype).transpose(-2, -1)
    assert_bitwise_reproducible(lambda: {"grouped_mm": torch.ops.astrea.grouped_mm_cpu(a, b, offsets)})


def test_errors_name_the_operand():
    a, b, offsets = torch.randn(6, 4), torch.randn(2, 4, 3), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match=r"grouped_mm_cpu: a must be \[M, K\] and b \[E, K, n\]"):
        torch.ops.astrea.grouped_mm_cpu(a, torch.randn(2, 5, 3), offsets)
    with pytest.raises(TypeError, match="grouped_mm_cpu: a and b must share one floating dtype"):
        torch.ops.astrea.grouped_mm_cpu(a, b.double(), offsets)
    with pytest.raises(ValueError, match=r"grouped_mm_cpu: offsets must ascend within \[0, 6\]"):
        torch.ops.astrea.grouped_mm_cpu(a, b, torch.tensor([0, 4, 2]))
    with pytest.raises(ValueError, match="grouped_mm_cpu: b must hold E = 1 experts"):
        torch.ops.astrea.grouped_mm_cpu(a, b, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"grouped_weight_grad_cpu: offsets must ascend within \[0, 6\]"):
        torch.ops.astrea.grouped_weight_grad_cpu(torch.randn(3, 6), torch.randn(6, 2), torch.tensor([0, 7]))
