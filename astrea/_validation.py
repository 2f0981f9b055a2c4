"""Argument checks shared by the ops: each error names the op, the argument, what was seen
and what was expected (TypeError for types and dtypes, ValueError for shapes and values)."""

from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def accumulation_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32, or float64 when any of the (present) tensors is float64: the precision ops accumulate in."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    value,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(f"{op}: {name} must have dtype {dtype_names(dtypes)}; got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D; got shape {tuple(value.shape)}")
    return value


def check_size(op: str, name: str, value: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if value.shape[dim] != expected:
        raise ValueError(
            f"{op}: {name}.shape[{dim}] must equal {meaning} = {expected}; got shape {tuple(value.shape)}"
        )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        seen = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {seen}")
    return next(iter(present.values())).device


def check_int(op: str, name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{op}: {name} must be in {bounds}; got {value}")
    return value


def check_choice(op: str, name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
