"""Hugging Face transformers MoE models on astrea ops.

In transformers >= 5 a sparse MoE block holds a router module ``gate`` (``weight [E, H]``;
returns ``(router_logits, routing_weights, expert_indices)``) and a fused experts module
``experts`` (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; called as
``experts(hidden_states, top_k_index, top_k_weights)``). Patching a block binds a new
``forward`` to each of these two modules:

* router: the same ``F.linear`` logits, then scoring, top-k and renormalisation in
  :func:`astrea.ops.router_topk`;
* experts: :func:`astrea.ops.moe_dispatch`, then :func:`astrea.ops.moe_experts` on
  ``gate_up_proj``/``down_proj`` as they are (both grouped GEMMs and the weighted sum over each
  token's slots in one op, no host sync) when the experts gate with the default
  ``act(gate) * up`` of an activation astrea has (SiLU, exact or tanh GELU, ReLU). Other
  gating runs the experts' own ``_apply_gate`` on each expert's contiguous rows after
  :func:`astrea.ops.permute`, and :func:`astrea.ops.weighted_combine` sums them (fp32
  accumulation).

The block's own forward (jitter noise, shared experts, reshapes) and every parameter stay
as they are: state_dicts load unchanged, and the router still returns its logits, so
``output_router_logits`` and transformers' auxiliary loss work as before.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import astrea.ops

try:
    import transformers
    import transformers.integrations.moe
except ImportError as exc:
    raise ImportError(
        "astrea.integrations.transformers needs transformers>=5.0; install it with `pip install 'astrea[hf]'`"
    ) from exc

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        "astrea.integrations.transformers needs transformers>=5.0 (fused experts modules); "
        f"found {transformers.__version__}"
    )

__all__ = [
    "Routing",
    "UnsupportedMoEBlockError",
    "apply_astrea",
    "apply_astrea_to_mixtral",
    "apply_astrea_to_olmoe",
    "apply_astrea_to_qwen2_moe",
    "apply_astrea_to_qwen3_vl_moe",
    "patch_moe_block",
    "remove_astrea",
]


class UnsupportedMoEBlockError(ValueError):
    """A sparse MoE block that astrea cannot run exactly as the original does."""


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a router turns its logits into routing weights, as :func:`astrea.ops.router_topk` runs it."""

    top_k: int
    renormalize: bool
    # Qwen-family and OLMoE routers round the fp32 weights to the logits' dtype; Mixtral keeps fp32.
    weights_in_logits_dtype: bool
    scoring: str = "softmax"


@dataclasses.dataclass(frozen=True)
class _Family:
    module: str
    block: str
    routing: Callable[[nn.Module], Routing]  # from the block's router


_FAMILIES = {
    "mixtral": _Family(
        "transformers.models.mixtral.modeling_mixtral",
        "MixtralSparseMoeBlock",
        lambda gate: Routing(gate.top_k, renormalize=True, weights_in_logits_dtype=False),
    ),
    "qwen2_moe": _Family(
        "transformers.models.qwen2_moe.modeling_qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        lambda gate: Routing(gate.top_k, renormalize=bool(gate.norm_topk_prob), weights_in_logits_dtype=True),
    ),
    "olmoe": _Family(
        "transformers.models.olmoe.modeling_olmoe",
        "OlmoeSparseMoeBlock",
        lambda gate: Routing(gate.top_k, renormalize=bool(gate.norm_topk_prob), weights_in_logits_dtype=True),
    ),
    "qwen3_vl_moe": _Family(
        "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
        "Qwen3VLMoeTextSparseMoeBlock",
        lambda gate: Routing(gate.top_k, renormalize=True, weights_in_logits_dtype=True),
    ),
}

# What the fused experts forward below computes: the layout flags that
# transformers' @use_experts_implementation puts on an experts module.
_EXPERTS_LAYOUT = {
    "has_gate": True,
    "has_bias": False,
    "is_transposed": False,
    "is_concatenated": True,
    "has_post_expert_norm": False,
    "_is_expert_parallel": False,
}

_PROBE_TOKENS = 64


def _router_forward(self: nn.Module, hidden_states: torch.Tensor):
    routing = self.astrea_routing
    hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
    router_logits = F.linear(hidden_states, self.weight, getattr(self, "bias", None))
    out = astrea.ops.router_topk(
        router_logits, routing.top_k, scoring=routing.scoring, renormalize=routing.renormalize
    )
    weights = out.weights.to(router_logits.dtype) if routing.weights_in_logits_dtype else out.weights
    return router_logits, weights, out.indices


def _grouped_activation(experts: nn.Module) -> str | None:
    """The :func:`astrea.ops.moe_experts` activation that computes exactly what ``experts``
    computes between its projections, or None when its gating is another one."""
    if type(experts)._apply_gate is not transformers.integrations.moe._default_apply_gate:
        return None
    act = experts.act_fn
    name = type(act).__name__
    if name in ("SiLUActivation", "SiLU"):
        return "silu"
    if name == "GELUActivation" and getattr(act, "act", None) is F.gelu:
        return "gelu"
    if name == "GELUTanh":
        return "gelu_tanh"
    if name == "ReLU":
        return "relu"
    return None


def _experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    dispatch = astrea.ops.moe_dispatch(top_k_index.to(torch.int32), self.gate_up_proj.shape[0])
    activation = _grouped_activation(self)
    if activation is not None and hidden_states.dtype == self.gate_up_proj.dtype == self.down_proj.dtype:
        return astrea.ops.moe_experts(hidden_states, dispatch, self.gate_up_proj, self.down_proj, top_k_weights,
                                      activation=activation)
    rows = astrea.ops.permute(hidden_states, dispatch)
    offsets = dispatch.expert_offsets.tolist()
    outputs = []
    for expert, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        if start < end:
            gate_up = F.linear(rows[start:end], self.gate_up_proj[expert])
            outputs.append(F.linear(self._apply_gate(gate_up), self.down_proj[expert]))
    expert_out = torch.cat(outputs) if outputs else rows.new_empty((0, self.down_proj.shape[1]))
    return astrea.ops.weighted_combine(expert_out, top_k_weights, dispatch)


def _unsupported(where: str, block: nn.Module, why: str) -> UnsupportedMoEBlockError:
    return UnsupportedMoEBlockError(
        f"apply_astrea: {where} ({type(block).__name__}) {why}, so astrea cannot reproduce it; nothing was "
        "patched. Call astrea.ops from that block's forward instead (README, 'Using astrea.ops in another MoE model')"
    )


def _is_matrix(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2


def _check_experts(where: str, block: nn.Module) -> None:
    experts = getattr(block, "experts", None)
    needed = ("gate_up_proj", "down_proj", "_apply_gate", *_EXPERTS_LAYOUT)
    missing = [name for name in needed if not hasattr(experts, name)]
    if missing:
        raise _unsupported(
            where, block,
            f"has experts {type(experts).__name__}, not a transformers fused experts module "
            f"(@use_experts_implementation, gate_up_proj [E, 2I, H], down_proj [E, H, I]; it lacks {missing[0]})",
        )
    for flag, wanted in _EXPERTS_LAYOUT.items():
        if getattr(experts, flag) != wanted:
            raise _unsupported(where, block, f"has experts with {flag}={getattr(experts, flag)!r}; expected {wanted}")


def _check_gate(where: str, block: nn.Module) -> nn.Module:
    gate = getattr(block, "gate", None)
    if not isinstance(gate, nn.Module) or not _is_matrix(getattr(gate, "weight", None)):
        raise _unsupported(where, block, "has no router module `gate` with a weight [num_experts, hidden]")
    return gate


def _check_block(where: str, block: nn.Module, routing: Routing) -> None:
    """The structure the patched forwards rely on, checked before anything is patched."""
    _check_experts(where, block)
    gate = _check_gate(where, block)
    num_experts, hidden = gate.weight.shape
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    if (
        gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != num_experts or down.shape[0] != num_experts
        or gate_up.shape[2] != hidden or down.shape[1] != hidden or gate_up.shape[1] != 2 * down.shape[2]
    ):
        raise _unsupported(
            where, block,
            f"has router weight {tuple(gate.weight.shape)}, gate_up_proj {tuple(gate_up.shape)} and down_proj "
            f"{tuple(down.shape)}; expected [E, H], [E, 2I, H] and [E, H, I]",
        )
    if not 1 <= routing.top_k <= num_experts:
        raise _unsupported(where, block, f"routes to top_k={routing.top_k} of {num_experts} experts")


def _bind(module: nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)


def patch_moe_block(block: nn.Module, routing: Routing, *, where: str = "block") -> nn.Module:
    """Runs one transformers sparse MoE block (router ``gate`` + fused ``experts``) on astrea ops.

    ``routing`` says how its router scores and normalises (the family functions and
    :func:`apply_astrea` work it out). Raises :class:`UnsupportedMoEBlockError` when the
    block does not have the structure described in the module docstring.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"patch_moe_block: routing must be an astrea Routing, got {type(routing).__name__}")
    _check_block(where, block, routing)
    block.gate.astrea_routing = routing
    _bind(block.gate, _router_forward)
    _bind(block.experts, _experts_forward)
    return block


def _apply_family(model: nn.Module, name: str) -> nn.Module:
    family = _FAMILIES[name]
    block_class = getattr(importlib.import_module(family.module), family.block)
    blocks = [(where, m) for where, m in model.named_modules() if isinstance(m, block_class)]
    if not blocks:
        raise ValueError(
            f"apply_astrea_to_{name}: model ({type(model).__name__}) has no {block_class.__name__}; "
            f"expected a {name} model"
        )
    routings = [(where, block, family.routing(block.gate)) for where, block in blocks]
    for where, block, routing in routings:
        _check_block(where, block, routing)
    for where, block, routing in routings:
        patch_moe_block(block, routing, where=where)
    return model


def apply_astrea_to_mixtral(model: nn.Module) -> nn.Module:
    """Mixtral: softmax over all experts (fp32), top-k, renormalised; the weights stay fp32."""
    return _apply_family(model, "mixtral")


def apply_astrea_to_qwen2_moe(model: nn.Module) -> nn.Module:
    """Qwen2-MoE: softmax (fp32), top-k, renormalised if ``config.norm_topk_prob``; weights in
    the logits' dtype. The shared expert and its sigmoid gate run as before."""
    return _apply_family(model, "qwen2_moe")


def apply_astrea_to_olmoe(model: nn.Module) -> nn.Module:
    """OLMoE: softmax (fp32), top-k, renormalised if ``config.norm_topk_prob``; weights in the logits' dtype."""
    return _apply_family(model, "olmoe")


def apply_astrea_to_qwen3_vl_moe(model: nn.Module) -> nn.Module:
    """Qwen3-VL-MoE (the text decoder's sparse blocks; the vision tower has none): softmax
    (fp32), top-k, always renormalised; weights in the logits' dtype."""
    return _apply_family(model, "qwen3_vl_moe")


def _known_routing(block: nn.Module) -> Routing | None:
    for family in _FAMILIES.values():
        if type(block).__module__ == family.module and type(block).__name__ == family.block:
            return family.routing(block.gate)
    return None


def _probe_routing(where: str, block: nn.Module) -> Routing:
    """Works out the routing of a router nobody described by running its original forward on
    a copy with random weights, and accepts only a rule astrea reproduces on that probe."""
    gate = _check_gate(where, block)
    top_k = getattr(gate, "top_k", None)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise _unsupported(where, block, f"has a router without an integer `top_k` (got {top_k!r})")
    if gate.weight.is_meta:
        raise _unsupported(where, block, "has its router on the meta device; load the weights first")
    num_experts, hidden = gate.weight.shape
    generator = torch.Generator().manual_seed(0)
    # Random weights: an untrained (e.g. all-zero) router would agree with any rule.
    probe = copy.deepcopy(gate).to("cpu", torch.float32)
    with torch.no_grad():
        for param in probe.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    hidden_states = torch.randn(_PROBE_TOKENS, hidden, generator=generator)
    original = type(gate).forward
    with torch.no_grad():
        expected = original(probe, hidden_states)
        if not (isinstance(expected, tuple) and len(expected) == 3):
            raise _unsupported(
                where, block, "has a router that does not return (router_logits, routing_weights, expert_indices)"
            )
        low_precision = original(copy.deepcopy(probe).to(torch.bfloat16), hidden_states.to(torch.bfloat16))
        weights_in_logits_dtype = low_precision[1].dtype == low_precision[0].dtype
        first = bool(getattr(gate, "norm_topk_prob", True))
        for renormalize in (first, not first):
            routing = Routing(top_k, renormalize, weights_in_logits_dtype)
            probe.astrea_routing = routing
            with astrea.backend("reference"):
                got = _router_forward(probe, hidden_states)
            if (
                got[1].shape == expected[1].shape
                and torch.equal(got[2].long(), expected[2].long())
                and torch.allclose(got[1].float(), expected[1].float(), rtol=1e-4, atol=1e-5)
                and torch.allclose(got[0], expected[0].float(), rtol=1e-4, atol=1e-5)
            ):
                return routing
    raise _unsupported(
        where, block,
        f"has a router ({type(gate).__name__}) whose weights are not softmax -> top-{top_k} "
        "(-> renormalise) of F.linear(hidden, gate.weight), e.g. sigmoid, grouped or bias-corrected selection",
    )


def apply_astrea(model: nn.Module) -> nn.Module:
    """Runs every sparse MoE block of ``model`` (every module with an ``experts`` submodule)
    on astrea ops, and returns ``model``.

    Mixtral, Qwen2-MoE, OLMoE and Qwen3-VL-MoE blocks get their family's routing; any other
    block of the "router ``gate`` + fused ``experts``" pattern is patched when its router,
    probed on random weights, is reproduced exactly by :func:`astrea.ops.router_topk`.
    Any other block raises :class:`UnsupportedMoEBlockError` naming it, and then nothing is
    patched; a model without sparse MoE blocks raises ValueError.
    """
    blocks = [(where, m) for where, m in model.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)]
    if not blocks:
        raise ValueError(
            f"apply_astrea: model ({type(model).__name__}) has no sparse MoE block (a module with an `experts` "
            "submodule)"
        )
    plan = []
    for where, block in blocks:
        _check_experts(where, block)
        routing = _known_routing(block) or _probe_routing(where, block)
        _check_block(where, block, routing)
        plan.append((where, block, routing))
    for where, block, routing in plan:
        patch_moe_block(block, routing, where=where)
    return model


def remove_astrea(model: nn.Module) -> nn.Module:
    """Undoes :func:`apply_astrea` (and the family functions): the original forwards run again."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ in (_router_forward, _experts_forward):
            del module.forward
            module.__dict__.pop("astrea_routing", None)
    return model
