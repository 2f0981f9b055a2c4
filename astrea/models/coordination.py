"""The heterogeneous expert coordination matrix: a learned E x E coupling of the experts' tokens.

The paper integrates its four specialists into an "expert matrix" that explicitly models how
they complement each other. Here that is a learned coupling ``C`` between the experts'
adapted tokens, applied before the router reads them and before fusion combines them. With
``X_e`` the adapted tokens ``[B, T, D]`` of expert ``e`` (all experts share ``T`` and ``D``
after their adapters):

    Y_e = X_e + sum_j C[e, j] * (X_j W)

``W`` (``D x D``, shared) maps an expert's tokens into what it contributes to the others,
and ``C[e, j]`` is how much expert ``j`` contributes to expert ``e``, token by token (token
``t`` of every expert comes from the adapter's query ``t``, so the adapters learn what each
position carries). ``C`` starts at ``(1 - I) / (E - 1)``, each expert receiving the mean of
the others; training may strengthen, weaken, reverse or cut any coupling, the diagonal
included. The identity path ``X_e`` keeps every expert's own features intact.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertCoordination(nn.Module):
    """``Y_e = X_e + sum_j C[e, j] (X_j W)`` over stacked expert tokens ``[E, B, T, D]``.

    Args:
        num_experts: ``E``.
        dim: token width ``D``.
    """

    def __init__(self, num_experts: int, dim: int):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"ExpertCoordination: num_experts must be >= 2 (a coupling between experts); "
                             f"got {num_experts}")
        off_diagonal = 1.0 - torch.eye(num_experts)
        self.coupling = nn.Parameter(off_diagonal / (num_experts - 1))
        self.contribution = nn.Linear(dim, dim, bias=False)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        experts = self.coupling.shape[0]
        if stacked.dim() != 4 or stacked.shape[0] != experts:
            raise ValueError(f"ExpertCoordination: tokens must be stacked [E={experts}, B, T, D]; "
                             f"got shape {tuple(stacked.shape)}")
        coupled = torch.einsum("ej,jbtd->ebtd", self.coupling.to(stacked.dtype), self.contribution(stacked))
        return stacked + coupled
