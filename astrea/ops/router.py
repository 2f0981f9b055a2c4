"""Fused MoE router: top-k routing and the statistics of its auxiliary losses in one pass.

Non-finite logits, without a host sync: a row whose log-sum-exp is not finite (it holds
a NaN or a +Inf logit, or every logit is -Inf) gets NaN ``lse`` and NaN weights, for
both scorings, so the NaN reaches the loss instead of being hidden. Its indices are
still valid expert ids, chosen deterministically and identically by every implementation:
NaN keys rank strictly below every number, -Inf included (an expert with a NaN key is
chosen only after every expert with a -Inf key), and equal keys, two NaNs included, go to
the lower expert index. With a bias the keys are ``score + bias`` (or ``logit + bias``),
so a NaN bias entry makes its expert rank last too; a group whose score is NaN is kept
last. Its scores enter ``prob_sums`` as computed (NaN for softmax). -Inf logits in a row
with a finite logit are ordinary: probability 0.

Renormalisation where the scores underflow: the renormalised weights ``v_j / sum_i v_i`` of
the chosen scores ``v`` are finite even where fp32 rounds every ``v`` to 0 (sigmoid scores of
logits below about -88, or softmax scores of experts that a bias picked far below the row's
best). Where ``sum_i v_i < 2**-64`` every implementation computes them as the softmax over
the chosen logits instead, ``exp(l_j - max l) / sum_i exp(l_i - max l)``: the same function
to rounding, since a softmax score is ``exp(l - lse)`` and a sigmoid score below ``2**-64``
is ``exp(l) * (1 - O(2**-64))`` (the log-space weights ``exp(logsigmoid(l_j) -
logsumexp_i logsigmoid(l_i))`` tend to it as ``l -> -inf``). So rows whose chosen logits lie
at -100 or -1000 get the softmax of those logits, and a backward by that softmax's Jacobian,
finite. Above the threshold nothing changes. A row whose chosen logits are all -Inf (a bias
may choose them in a row with finite logits) has no positive score at all: NaN weights, as
0 / 0 gives. The scaling factor multiplies the renormalised weights in either case; the bias
only chooses the experts, their unbiased scores are what is renormalised.

Implementations: the Triton kernels (kernels/router.py) on CUDA; on CPU tensors the C++
kernel of ``astrea._C`` (csrc/cpu/router.cpp), else the reference. The custom ops also take
float64 logits on CPU (outputs float64 then), so that gradcheck can test the C++ kernel;
:func:`router_topk` itself takes fp32/fp16/bf16.
"""

import math
from typing import NamedTuple, Optional, Union

import torch

from astrea import _backend, _extension, reference
from astrea._validation import check_choice, check_int, check_same_device, check_size

SPEC = _backend.declare_op(
    "router_topk", kernel="triton", cpu_kernel="router_topk_cpu",
    supports={"triton": "any E (a row never spans programs; no register spills up to E = 4096), any k <= E, "
                        "any group count dividing E",
              "extension": "any E and k <= E, any group count dividing E, float64 logits too (for gradcheck)"})

SCORINGS = ("softmax", "sigmoid", "topk_softmax")
BIAS_ON = ("scores", "logits")
GROUP_SCORES = ("top2_sum", "max")


class RouterOutput(NamedTuple):
    """What :func:`router_topk` returns (N tokens, E experts)."""

    weights: torch.Tensor  # [N, k] fp32 routing weights, the score of each chosen expert (renormalised)
    indices: torch.Tensor  # [N, k] int32 chosen experts, best first
    counts: torch.Tensor  # [E] int32 tokens routed to each expert
    prob_sums: torch.Tensor  # [E] fp32 sum over tokens of each expert's score (full distribution)
    lse: torch.Tensor  # [N] fp32 log-sum-exp of each row of fp32 logits


def _triton_forward(*args):
    from astrea.kernels.router import router_topk_forward

    return router_topk_forward(*args, interpreter=args[0].device.type == "cpu")


def _triton_backward(*args):
    from astrea.kernels.router import router_topk_backward

    return router_topk_backward(*args, interpreter=args[0].device.type == "cpu")


_FORWARD = _backend.Implementations("router_topk", triton=_triton_forward, extension="router_topk_cpu",
                                    reference=lambda *args: tuple(reference.router_topk(*args)))
_BACKWARD = _backend.Implementations("router_topk_backward", triton=_triton_backward,
                                     extension="router_topk_backward_cpu",
                                     reference=lambda *args: reference.router_topk_backward(*args).contiguous())


# ``impl`` stays the sixth argument, where the first schema had it, so that calls written for
# that schema run unchanged; the routing options added since follow it, with defaults.
@torch.library.custom_op("astrea::router_topk", mutates_args=())
def _router_topk_op(
    logits: torch.Tensor, k: int, scoring: str, renormalize: bool, bias: Optional[torch.Tensor], impl: str,
    bias_on: str = "scores", num_groups: int = 1, topk_groups: int = 1, group_score: str = "top2_sum",
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _FORWARD(impl, logits, k, scoring, renormalize, bias, bias_on, num_groups, topk_groups, group_score,
                    scaling_factor)


def _router_topk_fake(logits, k, *_):
    n, e = logits.shape
    values = torch.float64 if logits.dtype == torch.float64 else torch.float32  # float64: CPU only
    return (
        logits.new_empty((n, k), dtype=values),
        logits.new_empty((n, k), dtype=torch.int32),
        logits.new_empty((e,), dtype=torch.int32),
        logits.new_empty((e,), dtype=values),
        logits.new_empty((n,), dtype=values),
    )


_router_topk_op.register_fake(_router_topk_fake)
_extension.register_fake("router_topk_cpu", _router_topk_fake)


@torch.library.custom_op("astrea::router_topk_backward", mutates_args=())
def _router_topk_backward_op(
    logits: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor, grad_weights: torch.Tensor,
    grad_prob_sums: torch.Tensor, grad_lse: torch.Tensor, scoring: str, renormalize: bool, impl: str,
    scaling_factor: float = 1.0,
) -> torch.Tensor:
    return _BACKWARD(impl, logits, indices, lse, grad_weights, grad_prob_sums, grad_lse, scoring, renormalize,
                     scaling_factor)


def _router_topk_backward_fake(logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


_router_topk_backward_op.register_fake(_router_topk_backward_fake)
_extension.register_fake("router_topk_backward_cpu", _router_topk_backward_fake)


def _setup_context(ctx, inputs, output):
    logits, _, scoring, renormalize, _, ctx.impl, _, _, _, _, ctx.scaling_factor = inputs
    # Softmax over the k chosen logits is the renormalised softmax: the same closed form.
    ctx.scoring, ctx.renormalize = ("softmax", True) if scoring == "topk_softmax" else (scoring, renormalize)
    _, indices, _, _, lse = output
    ctx.save_for_backward(logits, indices, lse)


def _backward(ctx, grad_weights, _grad_indices, _grad_counts, grad_prob_sums, grad_lse):
    logits, indices, lse = ctx.saved_tensors

    def values(grad, shape):  # an output not used in the loss may bring no gradient
        if grad is None:
            return logits.new_zeros(shape, dtype=lse.dtype)
        return grad.to(lse.dtype).contiguous()

    grad_logits = _router_topk_backward_op(
        logits, indices, lse, values(grad_weights, indices.shape), values(grad_prob_sums, logits.shape[1:]),
        values(grad_lse, lse.shape), ctx.scoring, ctx.renormalize, ctx.impl, ctx.scaling_factor,
    )
    return grad_logits, *([None] * 10)


_router_topk_op.register_autograd(_backward, setup_context=_setup_context)


def router_topk(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: Optional[torch.Tensor] = None,
    bias_on: str = "scores",
    num_groups: int = 1,
    topk_groups: Optional[int] = None,
    group_score: str = "top2_sum",
    scaling_factor: float = 1.0,
) -> RouterOutput:
    """Routes each of N tokens to its top-``k`` of E experts, reading the logits once.

    Args:
        logits: ``[N, E]`` fp32/fp16/bf16 gate logits, any strides; computed in fp32. N may
            be 0 (empty outputs, zero counts and sums).
        k: experts per token, ``1 <= k <= E``.
        scoring: how the weights come from the logits: ``"softmax"`` (probabilities over
            all experts), ``"sigmoid"`` (independent scores, DeepSeek-V3) or
            ``"topk_softmax"`` (the k largest logits chosen, then a softmax over those k:
            gpt-oss, Mixtral's "softmax after top-k"; the weights sum to 1 and
            ``renormalize`` does not apply). ``prob_sums`` and ``lse`` are those of the full
            softmax for ``"topk_softmax"``.
        renormalize: divide the k chosen scores by their sum, so each row's weights add to 1
            (finite where the scores underflow: see the module docstring).
        bias: optional ``[E]`` selection bias (aux-loss-free balancing, DeepSeek-V3): it
            changes which experts are chosen, never the weights, and gets no gradient.
        bias_on: where ``bias`` is added: ``"scores"`` (experts ranked by ``score + bias``,
            DeepSeek-V3) or ``"logits"`` (ranked by ``logit + bias``, before the softmax or
            sigmoid). For ``"topk_softmax"`` the scores ranked are the logits.
        num_groups: > 1 splits the E experts into this many equal contiguous groups (it
            must divide E) and picks the experts among the ``topk_groups`` best groups
            only (DeepSeek-V2/V3 grouped routing). Experts are then ranked by their
            selection scores (``score (+ bias)``) rather than their logits.
        topk_groups: groups kept per token, ``1 <= topk_groups <= num_groups``, with
            ``k <= topk_groups * E / num_groups``; required when ``num_groups > 1``.
        group_score: what ranks the groups: ``"top2_sum"``, the sum of the group's two
            largest selection scores (DeepSeek-V3 ``noaux_tc``; groups of >= 2 experts), or
            ``"max"``, its largest (DeepSeek-V2 ``group_limited_greedy``).
        scaling_factor: multiplies the weights after renormalisation (DeepSeek's
            ``routed_scaling_factor``).

    Equal keys (and equal group scores) go to the lower index. Non-finite logits: see the
    module docstring. Differentiable w.r.t. ``logits`` through ``weights``, ``prob_sums``
    and ``lse`` (so :func:`load_balancing_loss` and :func:`router_z_loss` are too).
    """
    op = "router_topk"
    SPEC.check_tensor("logits", logits, ndim=2)
    num_experts = logits.shape[1]
    check_int(op, "k", k, low=1, high=num_experts)
    check_choice(op, "scoring", scoring, SCORINGS)
    if not isinstance(renormalize, bool):
        raise TypeError(f"{op}: renormalize must be a bool, got {type(renormalize).__name__}")
    check_choice(op, "bias_on", bias_on, BIAS_ON)
    if bias is not None:
        SPEC.check_tensor("bias", bias, ndim=1)
        check_size(op, "bias", bias, 0, num_experts, "the number of experts logits.shape[1]")
        check_same_device(op, logits=logits, bias=bias)
        bias = bias.detach().float().contiguous()
    _check_groups(op, num_experts, k, num_groups, topk_groups, group_score)
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)):
        raise TypeError(f"{op}: scaling_factor must be a float, got {type(scaling_factor).__name__}")
    if not math.isfinite(scaling_factor):
        raise ValueError(f"{op}: scaling_factor must be finite; got {scaling_factor}")
    return RouterOutput(*_router_topk_op(logits, k, scoring, renormalize, bias, SPEC.choose(logits.device), bias_on,
                                         num_groups, topk_groups or 1, group_score, float(scaling_factor)))


def _check_groups(op: str, num_experts: int, k: int, num_groups: int, topk_groups: Optional[int],
                  group_score: str) -> None:
    check_int(op, "num_groups", num_groups, low=1, high=num_experts)
    check_choice(op, "group_score", group_score, GROUP_SCORES)
    if num_groups == 1:
        if topk_groups not in (None, 1):
            raise ValueError(f"{op}: topk_groups={topk_groups} needs num_groups > 1; got num_groups=1")
        return
    if num_experts % num_groups:
        raise ValueError(f"{op}: num_groups must divide the number of experts logits.shape[1] = {num_experts}; "
                         f"got {num_groups}")
    if topk_groups is None:
        raise ValueError(f"{op}: topk_groups is required with num_groups={num_groups}")
    check_int(op, "topk_groups", topk_groups, low=1, high=num_groups)
    group_size = num_experts // num_groups
    if group_score == "top2_sum" and group_size < 2:
        raise ValueError(f"{op}: group_score='top2_sum' needs groups of >= 2 experts; got {num_experts} experts "
                         f"in {num_groups} groups")
    if k > topk_groups * group_size:
        raise ValueError(f"{op}: k must be <= topk_groups * experts per group = {topk_groups} * {group_size}; "
                         f"got {k}")


def _check_output(op: str, out) -> None:
    if not isinstance(out, RouterOutput):
        raise TypeError(f"{op}: out must be the RouterOutput of router_topk, got {type(out).__name__}")


def _check_num_tokens(op: str, num_tokens) -> None:
    """``num_tokens`` is a positive int, or a tensor of one positive integer: checked here on
    CPU; on other devices by a device-side assertion, which does not sync the host."""
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"{op}: num_tokens must hold one value; got shape {tuple(num_tokens.shape)}")
        if num_tokens.dtype == torch.bool or num_tokens.is_complex():
            raise TypeError(f"{op}: num_tokens must be a real tensor; got {num_tokens.dtype}")
        if num_tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool(num_tokens > 0):
                raise ValueError(f"{op}: num_tokens must be positive; got {num_tokens.item()}")
        else:
            torch._assert_async(num_tokens.reshape(()) > 0, f"{op}: num_tokens must be positive")
        return
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"{op}: num_tokens must be an int or a tensor; got {type(num_tokens).__name__}")
    if num_tokens <= 0:
        raise ValueError(f"{op}: num_tokens must be positive; got {num_tokens}")


def load_balancing_loss(out: RouterOutput, *, num_tokens: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
    """Switch Transformer balancing loss ``E * sum_e f_e * P_e`` from a router pass.

    ``f_e = counts_e / (num_tokens * k)`` is the fraction of routing slots given to expert
    e and ``P_e = prob_sums_e / num_tokens`` its mean score; the loss is 1 when both are
    uniform. Differentiable w.r.t. the logits through ``prob_sums``; no second read of the
    logits. ``num_tokens`` defaults to the N of ``out``; pass the global token count when
    ``counts`` and ``prob_sums`` were all-reduced across ranks (a rank's own N may then be 0).

    Raises:
        ValueError: ``num_tokens`` is 0 or negative, or it is not given and ``out`` has
            N = 0 tokens (the loss of no tokens is undefined). A ``num_tokens`` tensor is
            checked on the host when it is a CPU tensor (a ValueError, as for an int). A
            CUDA tensor is checked by a device-side assertion instead (``torch._assert_async``,
            no host sync): a value that is not positive makes a later CUDA call fail with a
            device-side assert RuntimeError rather than this ValueError.
    """
    op = "load_balancing_loss"
    _check_output(op, out)
    num_experts = out.counts.shape[0]
    k = out.weights.shape[1]
    if num_tokens is None:
        if out.lse.shape[0] == 0:
            raise ValueError(f"{op}: out has N = 0 tokens, so num_tokens (default: N) would be 0; "
                             "pass the global num_tokens when other ranks hold the tokens")
        tokens = out.lse.shape[0]
    else:
        _check_num_tokens(op, num_tokens)
        tokens = num_tokens
    fractions = out.counts.float() / (tokens * k)
    mean_scores = out.prob_sums / tokens
    return num_experts * (fractions * mean_scores).sum()


def router_z_loss(out: RouterOutput) -> torch.Tensor:
    """Router z-loss (ST-MoE): the mean over tokens of ``lse**2``, which keeps the logits
    small; differentiable w.r.t. the logits through ``lse``.

    Raises:
        ValueError: ``out`` has N = 0 tokens (the mean over no tokens is undefined).
    """
    op = "router_z_loss"
    _check_output(op, out)
    if out.lse.shape[0] == 0:
        raise ValueError(f"{op}: out has N = 0 tokens; the mean of lse**2 over no tokens is undefined")
    return out.lse.square().mean()
