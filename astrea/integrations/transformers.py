"""Hugging Face transformers MoE models on astrea ops.

In transformers >= 5 a sparse MoE block holds a router module ``gate`` or ``router``
(``weight [E, H]``, or an ``nn.Linear`` ``gate`` / ``wg`` inside it; returns ``(router_logits,
routing_weights, expert_indices)``) and a fused experts module ``experts``
(``@use_experts_implementation``: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; called as
``experts(hidden_states, top_k_index, top_k_weights)``). Patching a block binds a new
``forward`` to each of these two modules:

* router: the same ``F.linear`` logits, then scoring (softmax, sigmoid, or softmax over
  the top-k logits), the selection bias (``e_score_correction_bias``, on the router or passed
  to it by the block), grouped top-k, renormalisation and ``routed_scaling_factor`` in
  :func:`astrea.ops.router_topk`;
* experts: :func:`astrea.ops.moe_dispatch`, then :func:`astrea.ops.moe_experts` (both grouped
  GEMMs and the weighted sum over each token's slots in one op, no host sync) on the stacks as
  they are: ``gate_up_proj`` or, ungated (Nemotron-H), ``up_proj``; transposed stacks
  (``[E, H, 2I]``, ``[E, I, H]``: Aria, gpt-oss) as transposed views, without a copy; the
  biases ``*_proj_bias``; the activation or gate the experts compute, probed numerically:
  ``act(gate) * up`` or ``act(up)`` with SiLU, exact or tanh GELU, ReLU or ReLU², or
  gpt-oss's clamped SwiGLU (gate and up interleaved or concatenated). Other gating runs the
  experts' own ``_apply_gate`` on each expert's contiguous rows after
  :func:`astrea.ops.permute`, and :func:`astrea.ops.weighted_combine` sums them (fp32
  accumulation); so do experts whose weights and biases differ in dtype.

The block's own forward (jitter noise, shared experts, plain or gated, reshapes) and every
parameter stay as they are: state_dicts load unchanged, and the router still returns its logits, so
``output_router_logits`` and transformers' auxiliary loss work as before. Refused, with
:class:`UnsupportedMoEBlockError` naming the block and the reason: routers that are not one
linear map (an MLP, a norm before it), that score otherwise (sqrt-softplus, sparsemixer),
select by token id (hash routing) or return more than the three tensors; experts with a norm
after each expert, or expert-parallel ones.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import astrea.ops
from astrea.reference.experts import (
    ACTIVATIONS,
    GATE_UP_LAYOUTS,
    SWIGLU_ALPHA,
    SWIGLU_LIMIT,
    clamped_swiglu,
    split_gate_up,
)

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
    """How a router turns hidden states into routing weights, as :func:`astrea.ops.router_topk`
    runs it (the fields after ``scoring`` are that op's arguments of the same names)."""

    top_k: int
    renormalize: bool
    # Qwen-family and OLMoE routers round the fp32 weights to the logits' dtype; Mixtral keeps fp32.
    weights_in_logits_dtype: bool
    scoring: str = "softmax"
    # Where the selection bias is: None, a dotted attribute path on the router
    # ("e_score_correction_bias", "moe_statics.e_score_correction_bias"), or "argument" (the
    # second argument of the router's forward, passed by the block).
    bias: Optional[str] = None
    bias_on: str = "scores"
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "top2_sum"
    scaling_factor: float = 1.0
    # The logits: F.linear on the inputs as they are ("input"), cast to the weight's dtype
    # ("weight") or both in fp32 ("float32"); then cast to fp32 if logits_in_float32.
    linear: str = "input"
    logits_in_float32: bool = False
    # The weights in the hidden states' dtype (wins over weights_in_logits_dtype).
    weights_in_input_dtype: bool = False
    # The dotted path of the router's linear weight [E, H] ("weight"; "gate.weight" or
    # "wg.weight" for a router that holds an nn.Linear); a `bias` beside it is the logits' bias.
    weight: str = "weight"


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

_PROBE_TOKENS = 512
# The probe's router weights give logits of unit scale (as trained routers have: softmax far
# from one-hot, sigmoid scores spread over (0, 1)), and its selection bias is of the size of
# the score differences, so that grouped and plain top-k, and biased and unbiased selection,
# choose differently on many probe tokens.
_PROBE_BIAS_SCALE = 0.1
_BIAS_ATTRIBUTES = ("e_score_correction_bias", "moe_statics.e_score_correction_bias")
_SCALE_ATTRIBUTES = ("routed_scaling_factor", "router_scaling_factor", "route_scale")


def _attribute(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _router_logits(router: nn.Module, hidden_states: torch.Tensor, routing: Routing) -> torch.Tensor:
    owner, _, name = routing.weight.rpartition(".")
    linear = _attribute(router, owner) if owner else router
    weight, bias = getattr(linear, name), getattr(linear, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    if routing.linear == "float32":
        logits = F.linear(hidden_states.float(), weight.float(), None if bias is None else bias.float())
    elif routing.linear == "weight":
        logits = F.linear(hidden_states.to(weight.dtype), weight, bias)
    else:
        logits = F.linear(hidden_states, weight, bias)
    return logits.float() if routing.logits_in_float32 else logits


def _router_forward(self: nn.Module, hidden_states: torch.Tensor, *bias_argument: torch.Tensor):
    routing = self.astrea_routing
    tokens = hidden_states.reshape(-1, _attribute(self, routing.weight).shape[1])
    router_logits = _router_logits(self, tokens, routing)
    if routing.bias == "argument":
        bias = bias_argument[0] if bias_argument else None  # an optional one may be left out or None
    else:
        bias = None if routing.bias is None else _attribute(self, routing.bias)
    out = astrea.ops.router_topk(
        router_logits, routing.top_k, scoring=routing.scoring, renormalize=routing.renormalize,
        bias=None if bias is None else bias.reshape(-1), bias_on=routing.bias_on, num_groups=routing.num_groups,
        topk_groups=routing.topk_groups if routing.num_groups > 1 else None, group_score=routing.group_score,
        scaling_factor=routing.scaling_factor,
    )
    if routing.weights_in_input_dtype:
        weights = out.weights.to(hidden_states.dtype)
    elif routing.weights_in_logits_dtype:
        weights = out.weights.to(router_logits.dtype)
    else:
        weights = out.weights
    return router_logits, weights, out.indices.long()


# The layout flags that transformers' @use_experts_implementation puts on an experts module
# and those astrea runs: gated (gate_up_proj) or not (up_proj), with or without biases,
# transposed or not. A norm after each expert and expert parallelism are refused.
_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")

# The probe of an experts module's activation and gate: random pre-activations large enough
# that gpt-oss's clamp (limit 7) cuts many of them; accepted within a few fp32 ulps.
_GATE_PROBE_ROWS = 64
_GATE_PROBE_SCALE = 8.0
_GATE_PROBE_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class _ExpertsLayout:
    """How a fused experts module computes, as :func:`_experts_forward` runs it."""

    up: str  # "gate_up_proj" (gated) or "up_proj" (act(up) alone)
    transposed: bool  # weights stored [E, H, 2I] and [E, I, H]
    bias: bool  # ``<up>_bias [E, 2I]`` and ``down_proj_bias [E, H]``
    # The moe_experts activation of the one-op path, probed; None: the experts' own gating
    # (or activation) per expert, which no moe_experts activation reproduces.
    activation: Optional[str]
    gate_up_layout: str = "concatenated"
    swiglu_alpha: float = SWIGLU_ALPHA
    swiglu_limit: float = SWIGLU_LIMIT
    # What the probe saw (:func:`_gating_state`): the one-op path runs only while the experts
    # still have it; an act_fn, _apply_gate, alpha or limit changed after patching runs per expert.
    probed: tuple = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def gated(self) -> bool:
        return self.up == "gate_up_proj"


def _gating_state(experts: nn.Module) -> tuple:
    return (getattr(experts, "act_fn", None), getattr(type(experts), "_apply_gate", None),
            *(getattr(experts, name, None) for name in ("alpha", "limit", "swiglu_alpha", "swiglu_limit")))


def _matches(got, expected: torch.Tensor) -> bool:
    return (isinstance(got, torch.Tensor) and got.shape == expected.shape
            and torch.allclose(got, expected, rtol=_GATE_PROBE_RTOL, atol=_GATE_PROBE_RTOL * 1e-1))


def _probed_activation(act: Callable, width: int, generator: torch.Generator) -> str | None:
    """The :data:`astrea.reference.experts.ACTIVATIONS` entry that ``act`` computes on random
    inputs, or None."""
    z = torch.randn(_GATE_PROBE_ROWS, width, generator=generator) * _GATE_PROBE_SCALE
    with torch.no_grad():
        got = act(z)
        return next((name for name, formula in ACTIVATIONS.items() if _matches(got, formula(z))), None)


def _probed_gating(experts: nn.Module, flags: dict, intermediate: int) -> dict:
    """The one-op path's activation (and gate/up layout, SwiGLU alpha and limit) that computes
    what ``experts`` computes between its projections, probed numerically: the ``act_fn`` of
    transformers' default gate ``act(gate) * up`` or of an ungated ``act(up)``; a class's own
    ``_apply_gate`` (run on random pre-activations) against ``act(gate) * up`` for every
    activation and gpt-oss's clamped SwiGLU (with the module's numeric ``alpha`` and ``limit``,
    or ``swiglu_alpha`` and ``swiglu_limit``), gate and up concatenated or interleaved.
    ``{"activation": None}`` when none matches."""
    generator = torch.Generator().manual_seed(0)
    gate = type(experts)._apply_gate if flags["has_gate"] else None
    if gate is None or gate is transformers.integrations.moe._default_apply_gate:
        return {"activation": _probed_activation(experts.act_fn, intermediate, generator)}
    alpha, limit = (next((getattr(experts, n) for n in names if hasattr(experts, n)), None)
                    for names in (("alpha", "swiglu_alpha"), ("limit", "swiglu_limit")))
    swiglu = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (alpha, limit)) and limit > 0
    z = torch.randn(_GATE_PROBE_ROWS, 2 * intermediate, generator=generator) * _GATE_PROBE_SCALE
    with torch.no_grad():
        got = gate(experts, z)
        for layout in GATE_UP_LAYOUTS:
            gate_half, up_half = split_gate_up(z, layout)
            for name, act in ACTIVATIONS.items():
                if _matches(got, act(gate_half) * up_half):
                    return {"activation": name, "gate_up_layout": layout}
            if swiglu and _matches(got, clamped_swiglu(gate_half, up_half, float(alpha), float(limit))):
                return {"activation": "clamped_swiglu", "gate_up_layout": layout, "swiglu_alpha": float(alpha),
                        "swiglu_limit": float(limit)}
    return {"activation": None}


def _weights(self: nn.Module, layout: _ExpertsLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [E, 2I or I, H], down [E, H, I]): the parameters, or transposed views of them (no copy)."""
    up, down = getattr(self, layout.up), self.down_proj
    if layout.transposed:
        return up.transpose(1, 2), down.transpose(1, 2)
    return up, down


def _experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    layout = self.astrea_layout
    up, down = _weights(self, layout)
    dispatch = astrea.ops.moe_dispatch(top_k_index.to(torch.int32), up.shape[0])
    up_bias = getattr(self, f"{layout.up}_bias") if layout.bias else None
    down_bias = self.down_proj_bias if layout.bias else None
    # transformers' grouped_mm runs the projections in the weights' dtype.
    one_op = layout.activation is not None and _gating_state(self) == layout.probed
    if one_op and all(t.dtype == up.dtype for t in (down, up_bias, down_bias) if t is not None):
        out = astrea.ops.moe_experts(
            hidden_states.to(up.dtype), dispatch, up, down, top_k_weights, activation=layout.activation,
            gated=layout.gated, gate_up_bias=up_bias, down_bias=down_bias, gate_up_layout=layout.gate_up_layout,
            swiglu_alpha=layout.swiglu_alpha, swiglu_limit=layout.swiglu_limit)
        return out.to(hidden_states.dtype)
    rows = astrea.ops.permute(hidden_states.to(up.dtype), dispatch)
    offsets = dispatch.expert_offsets.tolist()
    outputs = []
    for expert, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
        if start < end:
            pre = F.linear(rows[start:end], up[expert])
            if up_bias is not None:  # added after the product, in its dtype, as transformers adds it
                pre = pre + up_bias[expert].to(pre.dtype)
            out = F.linear((self._apply_gate(pre) if layout.gated else self.act_fn(pre)).to(down.dtype), down[expert])
            outputs.append(out if down_bias is None else out + down_bias[expert].to(out.dtype))
    expert_out = torch.cat(outputs) if outputs else rows.new_empty((0, down.shape[1]), dtype=down.dtype)
    return astrea.ops.weighted_combine(expert_out, top_k_weights, dispatch).to(hidden_states.dtype)


def _unsupported(where: str, block: nn.Module, why: str) -> UnsupportedMoEBlockError:
    return UnsupportedMoEBlockError(
        f"apply_astrea: {where} ({type(block).__name__}) {why}, so astrea cannot reproduce it; nothing was "
        "patched. Call astrea.ops from that block's forward instead (README, 'Using astrea.ops in another MoE model')"
    )


def _is_matrix(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2


def _check_experts(where: str, block: nn.Module) -> _ExpertsLayout:
    """The layout of the block's fused experts, or UnsupportedMoEBlockError naming what astrea
    does not run."""
    experts = getattr(block, "experts", None)
    missing = [name for name in _LAYOUT_FLAGS if not hasattr(experts, name)]
    if not missing:
        flags = {flag: getattr(experts, flag) for flag in _LAYOUT_FLAGS}
        up = "gate_up_proj" if flags["has_gate"] else "up_proj"
        biases = (f"{up}_bias", "down_proj_bias") if flags["has_bias"] else ()
        needed = (up, "down_proj", *biases, "_apply_gate" if flags["has_gate"] else "act_fn")
        missing = [name for name in needed if not isinstance(getattr(experts, name, None), (torch.Tensor, Callable))]
    if missing:
        raise _unsupported(
            where, block,
            f"has experts {type(experts).__name__}, not a transformers fused experts module "
            f"(@use_experts_implementation, gate_up_proj [E, 2I, H], down_proj [E, H, I]; it lacks {missing[0]})",
        )
    if flags["_is_expert_parallel"]:
        raise _unsupported(where, block, "has expert-parallel experts (_is_expert_parallel=True: routing slots of "
                                         "other ranks' experts), which astrea's ops do not take")
    if flags["has_post_expert_norm"]:
        norm = type(getattr(experts, "post_expert_norm", None)).__name__
        raise _unsupported(
            where, block,
            f"has experts with a norm after each expert (has_post_expert_norm=True: {norm}) before the routing "
            "weight, which astrea.ops.moe_experts applies inside its one op",
        )
    layout = _ExpertsLayout(up, bool(flags["is_transposed"]), bool(flags["has_bias"]), None)
    stored, down_stored = getattr(experts, up), experts.down_proj
    if stored.dim() != 3 or down_stored.dim() != 3:
        raise _unsupported(where, block, f"has experts {up} {tuple(stored.shape)} and down_proj "
                                         f"{tuple(down_stored.shape)}; expected 3-dimensional stacks [E, ., .]")
    up_weight, down = _weights(experts, layout)
    num_experts, hidden, intermediate = down.shape
    width = 2 * intermediate if layout.gated else intermediate
    if tuple(up_weight.shape) != (num_experts, width, hidden):
        expected = (num_experts, hidden, width) if layout.transposed else (num_experts, width, hidden)
        raise _unsupported(where, block, f"has experts {up} {tuple(stored.shape)} and down_proj "
                                         f"{tuple(down_stored.shape)}; expected {up} {expected} for that down_proj")
    biases = {f"{up}_bias": (num_experts, width), "down_proj_bias": (num_experts, hidden)} if layout.bias else {}
    for name, shape in biases.items():
        if tuple(getattr(experts, name).shape) != shape:
            raise _unsupported(where, block, f"has experts {name} {tuple(getattr(experts, name).shape)}; "
                                             f"expected {shape}")
    try:
        gating = _probed_gating(experts, flags, intermediate)
    except Exception:  # a gate or activation that fails on the probe: its own code runs, per expert
        gating = {"activation": None}
    return dataclasses.replace(layout, **gating, probed=_gating_state(experts))


_ROUTER_NAMES = ("gate", "router")
# Where a router keeps its linear weight [E, H]: its own parameter, or an nn.Linear it holds
# (AFMoE's `gate`, HunYuan's `wg`).
_ROUTER_WEIGHTS = ("weight", "gate.weight", "wg.weight")


def _router_name(block: nn.Module) -> str | None:
    for name in _ROUTER_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    return None


def _check_gate(where: str, block: nn.Module) -> tuple[nn.Module, str]:
    """(the block's router, the path of its weight [E, H]), or UnsupportedMoEBlockError."""
    name = _router_name(block)
    if name is None:
        raise _unsupported(where, block, "has no router module `gate` or `router`")
    router = getattr(block, name)
    for path in _ROUTER_WEIGHTS:
        if _is_matrix(_attribute(router, path)):
            return router, path
    children = [f"{n} ({type(m).__name__})" for n, m in router.named_children()]
    computes = f"it runs {', '.join(children)}" if children else "it holds no submodule"
    raise _unsupported(
        where, block,
        f"has a router `{name}` ({type(router).__name__}) whose logits are not one linear map of the hidden states: "
        f"{computes} (no weight [num_experts, hidden] at {' / '.join(_ROUTER_WEIGHTS)})",
    )


def _check_block(where: str, block: nn.Module, routing: Routing) -> _ExpertsLayout:
    """The structure the patched forwards rely on, checked before anything is patched."""
    layout = _check_experts(where, block)
    router, _ = _check_gate(where, block)
    weight = _attribute(router, routing.weight)
    if not _is_matrix(weight):
        raise _unsupported(where, block, f"has no router weight [num_experts, hidden] at `{routing.weight}`")
    num_experts = weight.shape[0]
    experts = getattr(block.experts, layout.up).shape[0]
    if experts != num_experts:
        raise _unsupported(where, block, f"has router weight {tuple(weight.shape)} for {num_experts} experts and "
                                         f"{experts} experts in {layout.up}")
    if not 1 <= routing.top_k <= num_experts:
        raise _unsupported(where, block, f"routes to top_k={routing.top_k} of {num_experts} experts")
    return layout


def _bind(module: nn.Module, forward) -> None:
    module.forward = types.MethodType(forward, module)


def patch_moe_block(block: nn.Module, routing: Routing, *, where: str = "block") -> nn.Module:
    """Runs one transformers sparse MoE block (router ``gate`` or ``router`` + fused ``experts``)
    on astrea ops.

    ``routing`` says how its router scores and normalises (the family functions and
    :func:`apply_astrea` work it out). Raises :class:`UnsupportedMoEBlockError` when the
    block does not have the structure described in the module docstring.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"patch_moe_block: routing must be an astrea Routing, got {type(routing).__name__}")
    layout = _check_block(where, block, routing)
    router, _ = _check_gate(where, block)
    router.astrea_routing = routing
    block.experts.astrea_layout = layout
    _bind(router, _router_forward)
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


def _bias_argument(where: str, block: nn.Module, router: nn.Module) -> str | None:
    """Whether the router's forward takes the selection bias as its second argument (the
    block passes it): "required", "optional" (it defaults to None: LFM2-MoE's block passes
    None without its expert bias) or None; any other extra argument is refused."""
    parameters = [p for p in list(inspect.signature(type(router).forward).parameters.values())[2:]
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in parameters if p.default is inspect.Parameter.empty]
    if not required:
        optional = parameters[:1]
        return "optional" if optional and "bias" in optional[0].name and optional[0].default is None else None
    if len(required) == 1 and "bias" in required[0].name:
        return "required"
    names = ", ".join(p.name for p in required)
    if any(p.name == "input_ids" for p in required):
        raise _unsupported(
            where, block,
            f"has a router ({type(router).__name__}) that selects its experts by token id (its forward takes "
            f"{names}: hash routing, a fixed token-to-expert table), where astrea.ops.router_topk selects "
            "from the hidden states' scores",
        )
    raise _unsupported(where, block, f"has a router whose forward takes more than the hidden states ({names})")


def _candidates(router: nn.Module, weight: str, top_k: int, bias_argument: bool) -> list[Routing]:
    """The routings a router may compute, read off its attributes; the probe keeps the one
    that reproduces it."""
    num_experts = _attribute(router, weight).shape[0]
    if bias_argument:
        biases = ["argument"]
    else:
        tensors = {path: _attribute(router, path) for path in _BIAS_ATTRIBUTES}
        biases = [None, *(path for path, tensor in tensors.items()
                          if isinstance(tensor, torch.Tensor) and tensor.numel() == num_experts)]
    num_groups = getattr(router, "num_group", None) or getattr(router, "n_group", None)
    topk_groups = getattr(router, "topk_group", None)
    groups = [(1, 1, "top2_sum")]
    if isinstance(num_groups, int) and num_groups > 1 and isinstance(topk_groups, int):
        groups += [(num_groups, topk_groups, "top2_sum"), (num_groups, topk_groups, "max")]
    scale = next((getattr(router, name) for name in _SCALE_ATTRIBUTES if getattr(router, name, None)), None)
    scales = [1.0] + ([float(scale)] if isinstance(scale, (int, float)) and scale != 1.0 else [])
    if top_k > 1:
        scales.append(1.0 / top_k)  # weights that average the k experts (OpenAI's privacy filter)
    first = bool(getattr(router, "norm_topk_prob", True))
    return [
        Routing(top_k, renormalize, weights_in_logits_dtype=False, scoring=scoring, bias=bias, bias_on=bias_on,
                num_groups=g, topk_groups=tg, group_score=group_score, scaling_factor=scaling, weight=weight)
        for scoring in ("softmax", "sigmoid", "topk_softmax")
        for renormalize in (first, not first)
        for bias in biases
        for bias_on in (("scores", "logits") if bias else ("scores",))
        for g, tg, group_score in groups
        for scaling in scales
        if not (scoring == "topk_softmax" and not renormalize)  # its weights always sum to 1
    ]


def _randomised(router: nn.Module, generator: torch.Generator) -> nn.Module:
    """An fp32 copy of ``router`` with random weights of realistic scale (see _PROBE_BIAS_SCALE)."""
    probe = copy.deepcopy(router).to("cpu", torch.float32)
    with torch.no_grad():
        for name, tensor in [*probe.named_parameters(), *probe.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            if tensor.dim() == 2 and name.endswith("weight"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * tensor.shape[1] ** -0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * _PROBE_BIAS_SCALE)
    return probe


def _run_routing(probe: nn.Module, routing: Routing, hidden_states, extra):
    probe.astrea_routing = routing
    try:
        with astrea.backend("reference"):
            return _router_forward(probe, hidden_states, *extra)
    finally:
        del probe.astrea_routing


def _same_routing(got, expected) -> bool:
    """Same logits, the same set of experts per token and the same weight for each (the
    experts' order within a token does not matter to the block)."""
    if not (isinstance(expected, tuple) and len(expected) == 3 and all(isinstance(t, torch.Tensor) for t in expected)):
        return False
    logits, weights, indices = got
    ref_logits, ref_weights, ref_indices = expected
    if indices.shape != ref_indices.shape or weights.shape != ref_weights.shape or logits.shape != ref_logits.shape:
        return False
    order, ref_order = indices.sort(dim=1), ref_indices.long().sort(dim=1)
    if not torch.equal(order.values, ref_order.values):
        return False
    return torch.allclose(logits, ref_logits.to(logits.dtype), rtol=1e-5, atol=1e-6) and torch.allclose(
        weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices).to(weights.dtype), rtol=1e-5,
        atol=1e-6)


def _same_dtypes(router, rule: Routing, hidden_states, extra, expected) -> bool:
    """Whether ``rule`` gives the logits (to the last bit) and the weights' dtype of the
    router's output ``expected`` on low-precision inputs. The experts chosen in bf16 may
    differ: astrea scores in fp32, where transformers' bf16 softmax rounds ties together."""
    try:
        logits, weights, _ = _run_routing(router, rule, hidden_states, extra)
    except (RuntimeError, TypeError):  # this rule cannot take these dtypes
        return False
    ref_logits, ref_weights = expected[0], expected[1]
    return (logits.dtype == ref_logits.dtype and weights.dtype == ref_weights.dtype
            and torch.equal(logits, ref_logits))


def _router_difference(router: nn.Module) -> str | None:
    """What a router that no candidate reproduced computes instead, where its code names it
    (only the refusal's message reads this; acceptance is the probe's alone)."""
    if "sparsemixer" in type(router).forward.__code__.co_names:
        return ("routes with sparsemixer (each chosen expert weighted by a softmax over only the logits within "
                "2 * jitter_eps of its own, the experts chosen before it masked; sampled in training), not by "
                "the top-k of one score")
    score_fn = getattr(router, "score_fn", None)
    if isinstance(score_fn, nn.Module) and not isinstance(score_fn, (nn.Sigmoid, nn.Softmax)):
        return (f"scores its logits with {type(score_fn).__name__} (score_fn), not softmax, sigmoid or softmax "
                "over the top-k")
    return None


def _probe_rule(where, block, probe, weight, top_k, bias_argument, hidden_states, extra) -> Routing:
    original = type(probe).forward
    expected = original(probe, hidden_states, *extra)
    if not (isinstance(expected, tuple) and len(expected) == 3):
        returned = f"{len(expected)} values" if isinstance(expected, tuple) else type(expected).__name__
        raise _unsupported(where, block, f"has a router ({type(probe).__name__}) that returns {returned}, not "
                                         "(router_logits, routing_weights, expert_indices), which its block uses")
    # Plainest first (no bias, no groups, no scale): a rule with a bias or groups is accepted
    # only after its plain variant chose other experts on the probe, i.e. the probe told them apart.
    for routing in _candidates(probe, weight, top_k, bias_argument):
        if _same_routing(_run_routing(probe, routing, hidden_states, extra), expected):
            return routing
    difference = _router_difference(probe)
    if difference is not None:
        raise _unsupported(where, block, f"has a router ({type(probe).__name__}) that {difference}")
    raise _unsupported(
        where, block,
        f"has a router ({type(probe).__name__}) whose weights on random inputs are none of softmax / sigmoid / "
        f"softmax-after-top-{top_k} of F.linear(hidden, weight), with or without its selection bias, grouped "
        "selection, renormalisation and scaling",
    )


# How the logits and weights of a router may follow the dtypes: (linear, logits_in_float32,
# weights_in_logits_dtype, weights_in_input_dtype), plainest first.
_DTYPE_RULES = [
    (linear, logits_fp32, in_logits, in_input)
    for linear in ("input", "weight", "float32")
    for logits_fp32 in (False, True)
    for in_logits, in_input in ((False, False), (True, False), (False, True))
    if not (linear == "float32" and logits_fp32)
]


def _probe_dtypes(where, block, probe, routing: Routing, hidden_states, extra) -> Routing:
    """The dtype rule of the router: the dtypes of its outputs and its logits on bf16 hidden
    states, with bf16 and with fp32 router weights (a model may keep the router in fp32)."""
    original = type(probe).forward
    half_probe = copy.deepcopy(probe).to(torch.bfloat16)
    if routing.bias is not None and routing.bias != "argument":  # selection biases stay fp32, as models keep them
        _attribute(half_probe, routing.bias).data = _attribute(probe, routing.bias).data.clone()
    cases = []
    for router in (half_probe, probe):
        try:
            expected = original(router, hidden_states.bfloat16(), *extra)
        except (RuntimeError, TypeError):  # this router does not take mixed dtypes: nor need astrea's
            continue
        cases.append((router, expected))
    for linear, logits_fp32, in_logits, in_input in _DTYPE_RULES:
        rule = dataclasses.replace(routing, linear=linear, logits_in_float32=logits_fp32,
                                   weights_in_logits_dtype=in_logits, weights_in_input_dtype=in_input)
        if all(_same_dtypes(router, rule, hidden_states.bfloat16(), extra, expected) for router, expected in cases):
            return rule
    raise _unsupported(where, block, "has a router whose logits or weights follow the dtypes in a way astrea "
                                     "does not reproduce")


def _same_without_bias(probe: nn.Module, routing: Routing, hidden_states: torch.Tensor) -> bool:
    """Whether ``routing`` also reproduces the router called with its optional bias None (true
    when the router cannot take None: its block always passes a tensor then)."""
    try:
        expected = type(probe).forward(probe, hidden_states, None)
    except TypeError:
        return True
    return _same_routing(_run_routing(probe, routing, hidden_states, (None,)), expected)


def _probe_input(probe: nn.Module, tokens: torch.Tensor, extra) -> torch.Tensor:
    """The probe tokens as the router takes them: ``[N, H]``, or ``[1, N, H]`` for a router
    that unpacks (batch, sequence, hidden) as its block's hidden states have them."""
    try:
        type(probe).forward(probe, tokens, *extra)
        return tokens
    except Exception as error:
        try:
            type(probe).forward(probe, tokens[None], *extra)
        except Exception:
            raise error from None
        return tokens[None]


def _probe_routing(where: str, block: nn.Module) -> Routing:
    """Works out the routing of a router nobody described by running its original forward on
    a copy with random weights of realistic scale (and a random selection bias), and accepts
    only a rule astrea reproduces on that probe, in fp32 and in bf16."""
    router, weight = _check_gate(where, block)
    top_k = getattr(router, "top_k", None)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise _unsupported(where, block, f"has a router without an integer `top_k` (got {top_k!r})")
    if _attribute(router, weight).is_meta:
        raise _unsupported(where, block, "has its router on the meta device; load the weights first")
    num_experts, hidden = _attribute(router, weight).shape
    if not 1 <= top_k <= num_experts:
        raise _unsupported(where, block, f"routes to top_k={top_k} of {num_experts} experts")
    bias_argument = _bias_argument(where, block, router)
    generator = torch.Generator().manual_seed(0)
    probe = _randomised(router, generator)
    hidden_states = torch.randn(_PROBE_TOKENS, hidden, generator=generator)
    extra = (torch.randn(num_experts, generator=generator) * _PROBE_BIAS_SCALE,) if bias_argument else ()
    try:
        with torch.no_grad():
            hidden_states = _probe_input(probe, hidden_states, extra)
            routing = _probe_rule(where, block, probe, weight, top_k, bias_argument, hidden_states, extra)
            if bias_argument == "optional" and not _same_without_bias(probe, routing, hidden_states):
                raise _unsupported(where, block, f"has a router ({type(probe).__name__}) that routes otherwise "
                                                 "when its optional bias argument is None")
            return _probe_dtypes(where, block, probe, routing, hidden_states, extra)
    except UnsupportedMoEBlockError:
        raise
    except Exception as error:  # the router's own forward failed on the probe: refuse, never crash
        raise _unsupported(where, block, f"has a router whose forward raised {type(error).__name__} on a probe "
                                         f"({' '.join(str(error).split())[:160]})") from error


def apply_astrea(model: nn.Module) -> nn.Module:
    """Runs every sparse MoE block of ``model`` (every module with an ``experts`` submodule)
    on astrea ops, and returns ``model``.

    Mixtral, Qwen2-MoE, OLMoE and Qwen3-VL-MoE blocks get their family's routing; any other
    block of the "router ``gate`` or ``router`` + fused ``experts``" pattern is patched when
    its router, probed on a copy with random weights of realistic scale and a random
    selection bias, is reproduced exactly by :func:`astrea.ops.router_topk` (softmax, sigmoid
    or softmax after top-k; with or without its correction bias, grouped top-k,
    renormalisation and scaling, the routed scaling factor or 1/k; the dtypes of its logits and
    weights), and its experts have a layout the module docstring lists. Any other block
    raises :class:`UnsupportedMoEBlockError` naming it and the reason, and then nothing is
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
            module.__dict__.pop("astrea_layout", None)
    return model
