"""Helpers shared by the op tests."""

from __future__ import annotations

import torch

# (atol, rtol) of a kernel against its fp32 reference, by the dtype of the inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *,
                 atol: float | None = None, rtol: float | None = None, what: str = "") -> None:
    """torch.testing.assert_close with per-dtype tolerances and a report of the worst
    mismatches (NaN and Inf included) when it fails."""
    default_atol, default_rtol = TOLERANCES[dtype or expected.dtype]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        where = bad.nonzero()[:10].tolist()
        rows = "\n".join(f"  at {tuple(i)}: got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}" for i in where)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(atol={atol}, rtol={rtol}); first ones:\n{rows}")


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous view (every other column of a wider tensor)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous() or x.shape[-1] <= 1
    return view
