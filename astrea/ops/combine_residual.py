"""The weighted combine, dense or sparse, with the stochastic residual fused: one kernel, one pass.

The registered ops live with their combines: ``astrea::combine_residual`` (dense layout) in
:mod:`astrea.ops.dense_combine`, ``astrea::sparse_combine_residual`` in :mod:`astrea.ops.combine`.
"""

from __future__ import annotations

import torch

from astrea._residual_draw import ResidualDraw
from astrea.ops.combine import sparse_combine_residual
from astrea.ops.dense_combine import dense_combine_residual
from astrea.ops.dispatch import Dispatch


def combine_residual(expert_out, weights: torch.Tensor, residual: torch.Tensor, p: float, *, seed: int,
                     offset: int = 0, granularity: str = "token", training: bool = True,
                     expert_scale: torch.Tensor | None = None, dispatch: Dispatch | None = None) -> torch.Tensor:
    """A weighted combine followed by the stochastic residual, in one kernel and one pass,
    bit-identical to the two ops in sequence.

    The combine is the base and ``residual`` the branch kept with probability ``p``; ``p``,
    ``seed``, ``offset``, ``granularity`` and ``training`` as in :func:`astrea.ops.stochastic_residual`.

    Dense layout (``dispatch=None``; Astrea's vision experts, the caption expert's features as
    the residual): ``expert_out``, ``weights`` and ``expert_scale`` as in
    :func:`astrea.ops.dense_weighted_combine`; ``residual`` has the shape and dtype of one
    expert output. Equals ``stochastic_residual(dense_weighted_combine(expert_out, weights,
    expert_scale), residual, p, ...)``.

    Sparse layout (``dispatch`` from :func:`astrea.ops.moe_dispatch`): ``expert_out``
    ``[N*k, D]`` in the dispatch's layout, ``weights`` ``[N, k]`` and ``expert_scale`` ``[E]``
    as in :func:`astrea.ops.weighted_combine`; ``residual`` is ``[N, D]`` or ``[B, ..., D]``
    whose rows flatten to N, in expert_out's dtype. The result has residual's shape and its
    mask units (token rows, or samples along dim 0) are those :func:`astrea.ops.stochastic_residual`
    uses on that shape: it equals ``stochastic_residual(weighted_combine(expert_out, weights,
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
    draw = ResidualDraw.checked("combine_residual", p, seed, offset, granularity, training)
    if dispatch is None:
        return dense_combine_residual(expert_out, weights, residual, draw, expert_scale)
    return sparse_combine_residual(expert_out, weights, residual, draw, expert_scale, dispatch)
