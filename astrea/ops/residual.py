"""Stochastic residual, alone and fused with the weighted combine, dense or sparse (Triton
kernels; on CPU the C++ kernel of astrea._C for the residual, and the fused forms run the
combine, then that residual: the two ops in sequence, which the fused kernels equal bit for bit).

Training: ``y + m * r / p`` with ``m ~ Bernoulli(p)`` per mask unit, drawn inside the
kernel from Philox keyed by ``(seed, offset + unit)`` and never stored; the backward
regenerates it. Units: each ``[..., D]`` row of the flattened ``[-1, D]`` view
(``granularity="token"``) or each sample along dim 0 (``"sample"``). The draw of unit
``i`` depends only on ``seed`` and ``offset + i``, so a caller that advances ``offset`` by
the number of units per call gets fresh, non-overlapping streams under one seed.
Eval, or ``p == 1``: exactly ``y + r``.
"""

from __future__ import annotations

import math
import numbers

import torch

from astrea import _backend
from astrea._validation import FLOAT_DTYPES, check_choice, check_int, check_same_device, check_tensor
from astrea.ops import combine, dense_combine
from astrea.ops.dispatch import Dispatch
from astrea.reference import residual as reference

GRANULARITIES = ("token", "sample")
_MAX_COUNTER = 2**63 - 1

_backend.declare_op("stochastic_residual", kernel="triton", cpu_extension_op="stochastic_residual_cpu")
_backend.declare_op("combine_residual", kernel="triton")


def _check_draw(op: str, p, seed, offset, granularity, training) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{op}: p must be a float in (0, 1], got {type(p).__name__}")
    if not 0.0 < p <= 1.0:  # also rejects NaN
        raise ValueError(f"{op}: p (the keep probability) must be in (0, 1]; got {p}")
    check_int(op, "seed", seed, low=0, high=_MAX_COUNTER)
    check_int(op, "offset", offset, low=0, high=_MAX_COUNTER)
    check_choice(op, "granularity", granularity, GRANULARITIES)
    if not isinstance(training, bool):
        raise TypeError(f"{op}: training must be a bool, got {type(training).__name__}")
    return float(p)


def _check_pair(op: str, name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    check_tensor(op, name, value, dtypes=FLOAT_DTYPES)
    if value.shape != like.shape:
        raise ValueError(f"{op}: {name} must have the shape of {like_name} {tuple(like.shape)}; "
                         f"got {tuple(value.shape)}")
    if value.dtype != like.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {like_name} ({like.dtype}); got {value.dtype}")


def stochastic_residual(y: torch.Tensor, r: torch.Tensor, p: float, *, seed: int, offset: int = 0,
                        granularity: str = "token", training: bool = True) -> torch.Tensor:
    """``y + m * r / p`` in training (``m ~ Bernoulli(p)`` per token row or per sample), ``y + r`` in eval.

    Args:
        y: ``[B, ..., D]`` base (the identity path), fp32/fp16/bf16, any strides.
        r: the residual branch, same shape and dtype as ``y``; dropped where ``m = 0``.
        p: keep probability in (0, 1]; ``p = 1`` gives exactly ``y + r``.
        seed, offset: non-negative ints keying the Philox draw of unit ``i`` as
            ``(seed, offset + i)``; :func:`astrea.reference.residual.keep_mask` gives the same mask.
        granularity: ``"token"`` (one draw per ``[..., D]`` row) or ``"sample"`` (per index of dim 0).
        training: False gives ``y + r``.

    Returns:
        ``[B, ..., D]`` in ``y``'s dtype (fp32 math). Backward: ``d y = grad``, ``d r = m * grad / p``,
        the mask regenerated from ``(seed, offset)``.
    """
    op = "stochastic_residual"
    check_tensor(op, "y", y, dtypes=FLOAT_DTYPES)
    if y.dim() < 2:
        raise ValueError(f"{op}: y must be [B, ..., D] (at least 2-D); got shape {tuple(y.shape)}")
    _check_pair(op, "r", r, "y", y)
    check_same_device(op, y=y, r=r)
    p = _check_draw(op, p, seed, offset, granularity, training)
    return torch.ops.astrea.stochastic_residual(y, r, p, seed, offset, granularity, training)


def combine_residual(expert_out, weights: torch.Tensor, residual: torch.Tensor, p: float, *, seed: int,
                     offset: int = 0, granularity: str = "token", training: bool = True,
                     expert_scale: torch.Tensor | None = None, dispatch: Dispatch | None = None) -> torch.Tensor:
    """A weighted combine followed by the stochastic residual, in one kernel and one pass,
    bit-identical to the two ops in sequence.

    The combine is the base and ``residual`` the branch kept with probability ``p``; ``p``,
    ``seed``, ``offset``, ``granularity`` and ``training`` as in :func:`stochastic_residual`.

    Dense layout (``dispatch=None``; Astrea's vision experts, the caption expert's features as
    the residual): ``expert_out``, ``weights`` and ``expert_scale`` as in
    :func:`astrea.ops.dense_weighted_combine`; ``residual`` has the shape and dtype of one
    expert output. Equals ``stochastic_residual(dense_weighted_combine(expert_out, weights,
    expert_scale), residual, p, ...)``.

    Sparse layout (``dispatch`` from :func:`astrea.ops.moe_dispatch`): ``expert_out``
    ``[N*k, D]`` in the dispatch's layout, ``weights`` ``[N, k]`` and ``expert_scale`` ``[E]``
    as in :func:`astrea.ops.weighted_combine`; ``residual`` is ``[N, D]`` or ``[B, ..., D]``
    whose rows flatten to N, in expert_out's dtype. The result has residual's shape and its
    mask units (token rows, or samples along dim 0) are those :func:`stochastic_residual` uses
    on that shape: it equals ``stochastic_residual(weighted_combine(expert_out, weights,
    dispatch, expert_scale).view_as(residual), residual, p, ...)``. For a MoE layer with a
    skip connection, as :class:`astrea.nn.SparseMoE` computes it plus a stochastic residual::

        tokens = x.reshape(-1, x.shape[-1])
        routing = router(tokens)
        dispatch = astrea.ops.moe_dispatch(routing.indices, num_experts)
        permuted = astrea.ops.permute(tokens, dispatch)
        offsets = dispatch.expert_offsets.tolist()
        expert_out = torch.cat([expert(permuted[a:b]) for expert, a, b in zip(experts, offsets, offsets[1:])])
        out = astrea.ops.combine_residual(expert_out, routing.weights, x, 0.8, seed=seed, offset=offset,
                                          dispatch=dispatch)  # [B, T, D], x's shape

    Backward: the residual gets ``m * grad / p`` (mask regenerated), the combine's inputs the
    gradients of the combine alone; deterministic, no atomics.
    """
    op = "combine_residual"
    if dispatch is not None:
        return _sparse_combine_residual(expert_out, weights, residual, p, seed, offset, granularity, training,
                                        expert_scale, dispatch)
    experts = dense_combine.expert_list(op, expert_out)
    coef = dense_combine.coefficients(op, experts, weights, expert_scale)
    _check_pair(op, "residual", residual, "an expert output", experts[0])
    check_same_device(op, expert_out=experts[0], residual=residual)
    p = _check_draw(op, p, seed, offset, granularity, training)
    return torch.ops.astrea.combine_residual(experts, coef, residual, p, seed, offset, granularity, training)


def _sparse_combine_residual(expert_out, weights, residual, p, seed, offset, granularity, training, expert_scale,
                             dispatch) -> torch.Tensor:
    """:func:`combine_residual` in the sparse layout: validation, then the registered op."""
    op = "combine_residual"
    dispatch = combine.check_combine_inputs(op, expert_out, weights, dispatch, expert_scale)
    check_tensor(op, "residual", residual, dtypes=FLOAT_DTYPES)
    num_tokens, dim = weights.shape[0], expert_out.shape[1]
    if residual.dim() < 2 or residual.shape[-1] != dim or math.prod(residual.shape[:-1]) != num_tokens:
        raise ValueError(f"{op}: residual must be [N, D] = ({num_tokens}, {dim}) or [B, ..., D] whose rows "
                         f"flatten to N = {num_tokens} with D = {dim}; got shape {tuple(residual.shape)}")
    if residual.dtype != expert_out.dtype:
        raise TypeError(f"{op}: residual must have the dtype of expert_out ({expert_out.dtype}); got {residual.dtype}")
    check_same_device(op, expert_out=expert_out, residual=residual)
    p = _check_draw(op, p, seed, offset, granularity, training)
    return torch.ops.astrea.sparse_combine_residual(expert_out, weights, dispatch.indices, dispatch.inverse_positions,
                                                    dispatch.expert_offsets, expert_scale, residual, p, seed, offset,
                                                    granularity, training)


def stochastic_residual_forward(base: torch.Tensor | None, branch: torch.Tensor, p: float, seed: int, offset: int,
                                granularity: str, training: bool) -> torch.Tensor:
    """Launcher: ``base + m * branch / p``; with ``base=None``, ``m * branch / p`` (the backward of ``r``)."""
    impl = _backend.choose("stochastic_residual", branch.device)
    if impl == "extension":
        return torch.ops.astrea.stochastic_residual_cpu(base, branch, p, seed, offset, granularity, training)
    if impl == "reference":
        if base is None:
            return reference.stochastic_residual_backward(branch, p, seed=seed, offset=offset, granularity=granularity,
                                                          training=training).to(branch.dtype, copy=True)
        return reference.stochastic_residual(base, branch, p, seed=seed, offset=offset, granularity=granularity,
                                             training=training)
    out = torch.empty(branch.shape, dtype=branch.dtype, device=branch.device)
    if out.numel() == 0:
        return out
    from astrea.kernels.residual import launch_stochastic_residual

    draw = dense_combine.residual_draw(p, seed, offset, granularity, training)
    _, rows_per_unit = reference.mask_units(branch.shape, granularity)
    dim = branch.shape[-1]
    launch_stochastic_residual(out.view(-1, dim), None if base is None else base.reshape(-1, dim),
                               branch.reshape(-1, dim), seed=seed, offset=offset, keep_p=draw["keep_p"],
                               inv_p=draw["inv_p"], rows_per_unit=rows_per_unit, stochastic=draw["stochastic"])
    return out


def sparse_combine_residual_forward(expert_out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                                    inverse_positions: torch.Tensor, expert_offsets: torch.Tensor,
                                    expert_scale: torch.Tensor | None, residual: torch.Tensor, p: float, seed: int,
                                    offset: int, granularity: str, training: bool) -> torch.Tensor:
    """Launcher of the sparse combine with the stochastic residual fused; the output has residual's shape."""
    if _backend.choose("combine_residual", residual.device) != "triton":
        # No fused kernel: the two ops in sequence, each on its own CPU kernel or reference.
        combined = combine.weighted_combine_forward(expert_out, weights, indices, inverse_positions, expert_offsets,
                                                    expert_scale)
        return stochastic_residual_forward(combined.view(residual.shape), residual, p, seed, offset, granularity,
                                           training)
    from astrea.kernels.combine import combine_forward

    num_experts = expert_offsets.shape[0] - 1
    draw = dense_combine.residual_draw(p, seed, offset, granularity, training)
    _, rows_per_unit = reference.mask_units(residual.shape, granularity)
    out = combine_forward(expert_out, inverse_positions, weights, indices, expert_scale, num_experts,
                          residual=residual.reshape(-1, residual.shape[-1]), seed=seed, offset=offset,
                          keep_p=draw["keep_p"], inv_p=draw["inv_p"], rows_per_unit=rows_per_unit,
                          stochastic=draw["stochastic"])
    return out.view(residual.shape)


# ---- registration ---------------------------------------------------------------------------


@torch.library.custom_op("astrea::stochastic_residual", mutates_args=())
def _stochastic_residual_op(y: torch.Tensor, r: torch.Tensor, p: float, seed: int, offset: int, granularity: str,
                            training: bool) -> torch.Tensor:
    return stochastic_residual_forward(y, r, p, seed, offset, granularity, training)


@_stochastic_residual_op.register_fake
def _(y, r, p, seed, offset, granularity, training):
    return y.new_empty(y.shape)


@torch.library.custom_op("astrea::stochastic_residual_backward", mutates_args=())
def _stochastic_residual_backward_op(grad: torch.Tensor, p: float, seed: int, offset: int, granularity: str,
                                     training: bool) -> torch.Tensor:
    return stochastic_residual_forward(None, grad, p, seed, offset, granularity, training)


@_stochastic_residual_backward_op.register_fake
def _(grad, p, seed, offset, granularity, training):
    return grad.new_empty(grad.shape)


def _save_draw(ctx, p, seed, offset, granularity, training):
    ctx.draw = (p, seed, offset, granularity, training)


def _residual_setup_context(ctx, inputs, output):
    _, _, *draw = inputs
    _save_draw(ctx, *draw)


def _branch_grad(ctx, grad: torch.Tensor) -> torch.Tensor:
    """``m * grad / p`` with the mask regenerated from the saved draw; ``grad`` itself in eval or at p = 1."""
    p, seed, offset, granularity, training = ctx.draw
    if training and p < 1.0:
        return torch.ops.astrea.stochastic_residual_backward(grad, p, seed, offset, granularity, training)
    return grad


def _residual_backward(ctx, grad):
    grad_r = _branch_grad(ctx, grad) if ctx.needs_input_grad[1] else None
    return grad, grad_r, None, None, None, None, None


_stochastic_residual_op.register_autograd(_residual_backward, setup_context=_residual_setup_context)


@torch.library.custom_op("astrea::combine_residual", mutates_args=())
def _combine_residual_op(experts: list[torch.Tensor], coef: torch.Tensor, residual: torch.Tensor, p: float, seed: int,
                         offset: int, granularity: str, training: bool) -> torch.Tensor:
    return dense_combine.dense_combine_forward(experts, coef, residual, p, seed, offset, granularity, training)


@_combine_residual_op.register_fake
def _(experts, coef, residual, p, seed, offset, granularity, training):
    return experts[0].new_empty(experts[0].shape)


def _combine_residual_setup_context(ctx, inputs, output):
    experts, coef, _, *draw = inputs
    ctx.save_for_backward(*experts, coef)
    _save_draw(ctx, *draw)


def _combine_residual_backward(ctx, grad):
    grad_experts, grad_coef, grad_residual = dense_combine.combine_backward(
        ctx, grad, ctx.needs_input_grad[2], *ctx.draw)
    return grad_experts, grad_coef, grad_residual, None, None, None, None, None


_combine_residual_op.register_autograd(_combine_residual_backward, setup_context=_combine_residual_setup_context)


@torch.library.custom_op("astrea::sparse_combine_residual", mutates_args=())
def _sparse_combine_residual_op(expert_out: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                                inverse_positions: torch.Tensor, expert_offsets: torch.Tensor,
                                expert_scale: torch.Tensor | None, residual: torch.Tensor, p: float, seed: int,
                                offset: int, granularity: str, training: bool) -> torch.Tensor:
    return sparse_combine_residual_forward(expert_out, weights, indices, inverse_positions, expert_offsets,
                                           expert_scale, residual, p, seed, offset, granularity, training)


@_sparse_combine_residual_op.register_fake
def _(expert_out, weights, indices, inverse_positions, expert_offsets, expert_scale, residual, p, seed, offset,
      granularity, training):
    return expert_out.new_empty(residual.shape)


def _sparse_combine_residual_setup_context(ctx, inputs, output):
    *combine_inputs, _, p, seed, offset, granularity, training = inputs
    combine.save_combine_inputs(ctx, *combine_inputs)
    _save_draw(ctx, p, seed, offset, granularity, training)


def _sparse_combine_residual_backward(ctx, grad):
    grad_y = grad_weights = grad_scale = None
    if any(ctx.needs_input_grad[i] for i in (0, 1, 5)):  # expert_out, weights, expert_scale
        grad_y, grad_weights, grad_scale = combine.combine_gradients(ctx, grad.reshape(-1, grad.shape[-1]))
    grad_residual = _branch_grad(ctx, grad) if ctx.needs_input_grad[6] else None
    return grad_y, grad_weights, None, None, None, grad_scale, grad_residual, None, None, None, None, None


_sparse_combine_residual_op.register_autograd(_sparse_combine_residual_backward,
                                              setup_context=_sparse_combine_residual_setup_context)
