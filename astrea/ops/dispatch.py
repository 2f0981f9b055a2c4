"""MoE token dispatch: ``moe_dispatch`` sorts the routing slots by expert, ``permute``
gathers token features into that expert-contiguous order (Triton kernels in
:mod:`astrea.kernels.dispatch`; on CPU tensors the C++ kernels of csrc/cpu/moe.cpp)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from astrea import _backend, _extension
from astrea._validation import check_int, check_same_device, check_size
from astrea.reference import dispatch as reference

DISPATCH_SPEC = _backend.declare_op(
    "moe_dispatch", kernel="triton", cpu_kernel="moe_dispatch_cpu",
    dtypes={"cpu": (torch.int32,), "cuda": (torch.int32,)},
    # The sort keys of a block of rows, (E + 2) * rows per block, must stay in int32, the per-block
    # histogram of E + 1 buckets lives in registers, and row positions are int32.
    limits={"num_experts": 8192, "rows": 2**31 - 1},
    supports={"triton": "stable counting sort; out-of-range experts placed after offsets[E], no host sync",
              "extension": "stable counting sort; out-of-range experts raise"})
PERMUTE_SPEC = _backend.declare_op(
    "permute", kernel="triton", cpu_kernel="permute_cpu",
    supports={"triton": "any strides", "extension": "any strides, float64 too"})


class Dispatch(NamedTuple):
    """Where each routing slot ``(t, j)`` of ``indices[N, k]`` goes in the expert-ordered layout.

    Attributes:
        sorted_token_ids: ``[N*k]`` int32, the token of each row of the layout; rows are
            grouped by expert, tokens ascending inside an expert.
        expert_offsets: ``[E+1]`` int64, expert ``e`` owns rows ``[offsets[e], offsets[e+1])``.
        inverse_positions: ``[N, k]`` int32, the row of slot ``(t, j)`` in the layout.
        indices: ``[N, k]`` int32, the expert of each slot (the routing input, kept for the combine).
    """

    sorted_token_ids: torch.Tensor
    expert_offsets: torch.Tensor
    inverse_positions: torch.Tensor
    indices: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.expert_offsets.shape[0] - 1


def _check_expert_range(indices: torch.Tensor, num_experts: int) -> None:
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= num_experts:
        raise ValueError(f"moe_dispatch: indices must lie in [0, num_experts={num_experts}); "
                         f"got values in [{low}, {high}]")


def _reference_dispatch(indices: torch.Tensor, num_experts: int):
    _check_expert_range(indices, num_experts)
    return reference.moe_dispatch(indices, num_experts)


def _triton_dispatch(indices: torch.Tensor, num_experts: int):
    # Checking the range reads the data: done on CPU; on CUDA it would cost a host sync, so the
    # kernel places out-of-range slots after expert_offsets[E] instead (see moe_dispatch).
    if indices.device.type == "cpu":
        _check_expert_range(indices, num_experts)
    from astrea.kernels.dispatch import dispatch_forward

    return dispatch_forward(indices, num_experts)


# The C++ kernel checks the expert range in its histogram pass.
_DISPATCH = _backend.Implementations("moe_dispatch", triton=_triton_dispatch, reference=_reference_dispatch,
                                     extension="moe_dispatch_cpu")


@torch.library.custom_op("astrea::moe_dispatch", mutates_args=())
def _moe_dispatch(indices: torch.Tensor, num_experts: int, impl: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _DISPATCH(impl, indices, num_experts)


def _dispatch_layout_fake(indices, num_experts):
    num_tokens, top_k = indices.shape
    return (indices.new_empty(num_tokens * top_k, dtype=torch.int32),
            indices.new_empty(num_experts + 1, dtype=torch.int64),
            indices.new_empty(num_tokens, top_k, dtype=torch.int32))


_moe_dispatch.register_fake(lambda indices, num_experts, impl: _dispatch_layout_fake(indices, num_experts))
_extension.register_fake("moe_dispatch_cpu", _dispatch_layout_fake)


def moe_dispatch(indices: torch.Tensor, num_experts: int) -> Dispatch:
    """Stable counting sort of the routing slots by expert (histogram, exclusive scan, scatter).

    Args:
        indices: ``[N, k]`` int32 expert of each token's k routing slots.
        num_experts: E, the number of experts (1 to 8192).

    Returns:
        :class:`Dispatch`. Deterministic: the same indices always give the same layout.

    Out-of-range experts: on CPU tensors a ``ValueError``. On CUDA tensors the check would
    need a host sync, so the kernel never uses such a value as an address: those slots are
    placed after ``expert_offsets[E]`` (which is then less than ``N*k``), belong to no expert
    and contribute nothing to :func:`astrea.ops.weighted_combine`.
    :class:`astrea.nn.SparseMoE` reads the offsets anyway and raises on that flag.
    """
    op = "moe_dispatch"
    DISPATCH_SPEC.check_tensor("indices", indices, ndim=2)
    check_int(op, "num_experts", num_experts, low=1, high=DISPATCH_SPEC.limit("num_experts"))
    num_rows = indices.shape[0] * indices.shape[1]
    if num_rows > DISPATCH_SPEC.limit("rows"):
        raise ValueError(f"{op}: indices has N*k = {num_rows} slots; at most {DISPATCH_SPEC.limit('rows')} "
                         "are supported")
    sorted_token_ids, expert_offsets, inverse_positions = torch.ops.astrea.moe_dispatch(
        indices, num_experts, DISPATCH_SPEC.choose(indices.device))
    return Dispatch(sorted_token_ids, expert_offsets, inverse_positions, indices)


def check_dispatch(op: str, dispatch) -> Dispatch:
    if not isinstance(dispatch, Dispatch):
        raise TypeError(f"{op}: dispatch must be the Dispatch returned by astrea.ops.moe_dispatch, "
                        f"got {type(dispatch).__name__}")
    return dispatch


def _triton_permute(x, sorted_token_ids, inverse_positions):
    from astrea.kernels.dispatch import permute_forward

    return permute_forward(x, inverse_positions)


def _triton_permute_backward(grad_out, inverse_positions):
    from astrea.kernels.dispatch import permute_backward

    return permute_backward(grad_out, inverse_positions)


_PERMUTE = _backend.Implementations(
    "permute", triton=_triton_permute, reference=lambda x, ids, positions: reference.permute(x, ids),
    extension=lambda x, ids, positions: torch.ops.astrea.permute_cpu(x, ids))
_PERMUTE_BACKWARD = _backend.Implementations("permute_backward", triton=_triton_permute_backward,
                                             reference=reference.permute_backward, extension="permute_backward_cpu")


@torch.library.custom_op("astrea::permute", mutates_args=())
def _permute(x: torch.Tensor, sorted_token_ids: torch.Tensor, inverse_positions: torch.Tensor,
             impl: str) -> torch.Tensor:
    return _PERMUTE(impl, x, sorted_token_ids, inverse_positions)


def _permuted_fake(x, sorted_token_ids, *_):
    return x.new_empty(sorted_token_ids.shape[0], x.shape[1])


_permute.register_fake(_permuted_fake)
_extension.register_fake("permute_cpu", _permuted_fake)


@torch.library.custom_op("astrea::permute_backward", mutates_args=())
def _permute_backward(grad_out: torch.Tensor, inverse_positions: torch.Tensor, impl: str) -> torch.Tensor:
    return _PERMUTE_BACKWARD(impl, grad_out, inverse_positions)


def _unpermuted_fake(grad_out, inverse_positions, *_):
    return grad_out.new_empty(inverse_positions.shape[0], grad_out.shape[1])


_permute_backward.register_fake(_unpermuted_fake)
_extension.register_fake("permute_backward_cpu", _unpermuted_fake)


def _permute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.impl = inputs[3]


def _permute_grad(ctx, grad_out):
    (inverse_positions,) = ctx.saved_tensors
    return torch.ops.astrea.permute_backward(grad_out, inverse_positions, ctx.impl), None, None, None


_permute.register_autograd(_permute_grad, setup_context=_permute_setup_context)


def permute(x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """Rows of ``x`` in expert order: ``out[inverse_positions[t, j]] = x[t]``.

    Args:
        x: ``[N, D]`` fp32/fp16/bf16 token features, any strides.
        dispatch: the :class:`Dispatch` of the routing indices of these N tokens.

    Returns:
        ``[N*k, D]`` in x's dtype; expert e's tokens are rows ``expert_offsets[e]:expert_offsets[e+1]``.
        Backward: ``grad_x[t] = sum_j grad[pos(t, j)]``, each token summed by one program (no atomics).
    """
    op = "permute"
    dispatch = check_dispatch(op, dispatch)
    PERMUTE_SPEC.check_tensor("x", x, ndim=2)
    check_size(op, "x", x, 0, dispatch.inverse_positions.shape[0], "the number of tokens N of dispatch")
    check_same_device(op, x=x, inverse_positions=dispatch.inverse_positions)
    return torch.ops.astrea.permute(x, dispatch.sorted_token_ids, dispatch.inverse_positions,
                                    PERMUTE_SPEC.choose(x.device))
