"""Hugging Face transformers MoE models on astrea ops.

In transformers >= 5 a sparse MoE block holds a router module ``gate`` or ``router``
(``weight [E, H]``; returns ``(router_logits, routing_weights, expert_indices)``) and a fused
experts module ``experts`` (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``; called as
``experts(hidden_states, top_k_index, top_k_weights)``). Patching a block binds a new
``forward`` to each of these two modules:

* router: the same ``F.linear`` logits, then scoring (softmax, sigmoid, or softmax over
  the top-k logits), the selection bias (``e_score_correction_bias``, on the router or passed
  to it by the block), grouped top-k, renormalisation and ``routed_scaling_factor`` in
  :func:`astrea.ops.router_topk`;
* experts: :func:`astrea.ops.moe_dispatch`, then :func:`astrea.ops.moe_experts` on
  ``gate_up_proj``/``down_proj`` as they are (both grouped GEMMs and the weighted sum over each
  token's slots in one op, no host sync) when the experts gate with the default
  ``act(gate) * up`` of an activation astrea has (SiLU, exact or tanh GELU, ReLU). Other
  gating runs the experts' own ``_apply_gate`` on each expert's contiguous rows after
  :func:`astrea.ops.permute`, and :func:`astrea.ops.weighted_combine` sums them (fp32
  accumulation).

The block's own forward (jitter noise, shared experts, plain or gated, reshapes) and every
parameter stay as they are: state_dicts load unchanged, and the router still returns its logits, so
``output_router_logits`` and transformers' auxiliary loss work as before.
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
    weight, bias = router.weight, getattr(router, "bias", None)
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
    tokens = hidden_states.reshape(-1, self.weight.shape[1])
    router_logits = _router_logits(self, tokens, routing)
    if routing.bias == "argument":
        (bias,) = bias_argument
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


_ROUTER_NAMES = ("gate", "router")


def _router_name(block: nn.Module) -> str | None:
    for name in _ROUTER_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    return None


def _check_gate(where: str, block: nn.Module) -> nn.Module:
    name = _router_name(block)
    router = getattr(block, name) if name else None
    if router is None or not _is_matrix(getattr(router, "weight", None)):
        found = f"its `{name}` ({type(router).__name__}) has no weight [num_experts, hidden]" if name else "none"
        raise _unsupported(where, block, f"has no router module `gate` or `router` with a weight "
                                         f"[num_experts, hidden] ({found})")
    return router


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
    """Runs one transformers sparse MoE block (router ``gate`` or ``router`` + fused ``experts``)
    on astrea ops.

    ``routing`` says how its router scores and normalises (the family functions and
    :func:`apply_astrea` work it out). Raises :class:`UnsupportedMoEBlockError` when the
    block does not have the structure described in the module docstring.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"patch_moe_block: routing must be an astrea Routing, got {type(routing).__name__}")
    _check_block(where, block, routing)
    router = _check_gate(where, block)
    router.astrea_routing = routing
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


def _bias_argument(where: str, block: nn.Module, router: nn.Module) -> bool:
    """Whether the router's forward takes the selection bias as its second argument (the
    block passes it); any other extra argument is refused."""
    parameters = list(inspect.signature(type(router).forward).parameters.values())[2:]
    required = [p for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return False
    if len(required) == 1 and "bias" in required[0].name:
        return True
    names = ", ".join(p.name for p in required)
    raise _unsupported(where, block, f"has a router whose forward takes more than the hidden states ({names})")


def _candidates(router: nn.Module, top_k: int, bias_argument: bool) -> list[Routing]:
    """The routings a router may compute, read off its attributes; the probe keeps the one
    that reproduces it."""
    num_experts = router.weight.shape[0]
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
    first = bool(getattr(router, "norm_topk_prob", True))
    return [
        Routing(top_k, renormalize, weights_in_logits_dtype=False, scoring=scoring, bias=bias, bias_on=bias_on,
                num_groups=g, topk_groups=tg, group_score=group_score, scaling_factor=scaling)
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


def _probe_rule(where, block, probe, top_k, bias_argument, hidden_states, extra) -> Routing:
    original = type(probe).forward
    expected = original(probe, hidden_states, *extra)
    if not (isinstance(expected, tuple) and len(expected) == 3):
        raise _unsupported(
            where, block, "has a router that does not return (router_logits, routing_weights, expert_indices)"
        )
    # Plainest first (no bias, no groups, no scale): a rule with a bias or groups is accepted
    # only after its plain variant chose other experts on the probe, i.e. the probe told them apart.
    for routing in _candidates(probe, top_k, bias_argument):
        if _same_routing(_run_routing(probe, routing, hidden_states, extra), expected):
            return routing
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


def _probe_routing(where: str, block: nn.Module) -> Routing:
    """Works out the routing of a router nobody described by running its original forward on
    a copy with random weights of realistic scale (and a random selection bias), and accepts
    only a rule astrea reproduces on that probe, in fp32 and in bf16."""
    router = _check_gate(where, block)
    top_k = getattr(router, "top_k", None)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise _unsupported(where, block, f"has a router without an integer `top_k` (got {top_k!r})")
    if router.weight.is_meta:
        raise _unsupported(where, block, "has its router on the meta device; load the weights first")
    num_experts, hidden = router.weight.shape
    if not 1 <= top_k <= num_experts:
        raise _unsupported(where, block, f"routes to top_k={top_k} of {num_experts} experts")
    bias_argument = _bias_argument(where, block, router)
    generator = torch.Generator().manual_seed(0)
    probe = _randomised(router, generator)
    hidden_states = torch.randn(_PROBE_TOKENS, hidden, generator=generator)
    extra = (torch.randn(num_experts, generator=generator) * _PROBE_BIAS_SCALE,) if bias_argument else ()
    try:
        with torch.no_grad():
            routing = _probe_rule(where, block, probe, top_k, bias_argument, hidden_states, extra)
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
    renormalisation and scaling; the dtypes of its logits and weights). Any other block
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
    return model
