"""Fused MoE router: top-k routing and the statistics of its auxiliary losses in one pass.

Non-finite logits, without a host sync: a row whose log-sum-exp is not finite (it holds
a NaN or a +Inf logit, or every logit is -Inf) gets NaN ``lse`` and NaN weights, for
both scorings, so the NaN reaches the loss instead of being hidden. Its indices are
still valid expert ids, chosen deterministically and identically by every implementation:
NaN keys rank strictly below every number, -Inf included (an expert with a NaN key is
chosen only after every expert with a -Inf key), and equal keys, two NaNs included, go to
the lower expert index. With a bias the keys are ``score + bias``, so a NaN bias entry
makes its expert rank last too. Its scores enter ``prob_sums`` as computed
(NaN for softmax). -Inf logits in a row with a finite logit are ordinary: probability 0.

Implementations: the Triton kernels (kernels/router.py) on CUDA; on CPU tensors the C++
kernel of ``astrea._C`` (csrc/cpu/router.cpp), else the reference. The custom ops also take
float64 logits on CPU (outputs float64 then), so that gradcheck can test the C++ kernel;
:func:`router_topk` itself takes fp32/fp16/bf16.
"""

from typing import NamedTuple, Optional, Union

import torch

from astrea import _backend, _extension, reference
from astrea._validation import check_choice, check_int, check_same_device, check_size

SPEC = _backend.declare_op(
    "router_topk", kernel="triton", cpu_kernel="router_topk_cpu",
    supports={"triton": "any E (a row never spans programs; no register spills up to E = 4096), any k <= E",
              "extension": "any E and k <= E, float64 logits too (for gradcheck)"})

SCORINGS = ("softmax", "sigmoid")


class RouterOutput(NamedTuple):
    """What :func:`router_topk` returns (N tokens, E experts)."""

    weights: torch.Tensor  # [N, k] fp32 routing weights, the score of each chosen expert (renormalised)
    indices: torch.Tensor  # [N, k] int32 chosen experts, best first
    counts: torch.Tensor  # [E] int32 tokens routed to each expert
    prob_sums: torch.Tensor  # [E] fp32 sum over tokens of each expert's score (full distribution)
    lse: torch.Tensor  # [N] fp32 log-sum-exp of each row of fp32 logits


def _triton_forward(logits, k, scoring, renormalize, bias):
    from astrea.kernels.router import router_topk_forward

    return router_topk_forward(logits, k, scoring, renormalize, bias, interpreter=logits.device.type == "cpu")


def _triton_backward(logits, indices, lse, grad_weights, grad_prob_sums, grad_lse, scoring, renormalize):
    from astrea.kernels.router import router_topk_backward

    return router_topk_backward(logits, indices, lse, grad_weights, grad_prob_sums, grad_lse, scoring, renormalize,
                                interpreter=logits.device.type == "cpu")


_FORWARD = _backend.Implementations("router_topk", triton=_triton_forward, extension="router_topk_cpu",
                                    reference=lambda *args: tuple(reference.router_topk(*args)))
_BACKWARD = _backend.Implementations("router_topk_backward", triton=_triton_backward,
                                     extension="router_topk_backward_cpu",
                                     reference=lambda *args: reference.router_topk_backward(*args).contiguous())


@torch.library.custom_op("astrea::router_topk", mutates_args=())
def _router_topk_op(
    logits: torch.Tensor, k: int, scoring: str, renormalize: bool, bias: Optional[torch.Tensor], impl: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _FORWARD(impl, logits, k, scoring, renormalize, bias)


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
) -> torch.Tensor:
    return _BACKWARD(impl, logits, indices, lse, grad_weights, grad_prob_sums, grad_lse, scoring, renormalize)


def _router_topk_backward_fake(logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


_router_topk_backward_op.register_fake(_router_topk_backward_fake)
_extension.register_fake("router_topk_backward_cpu", _router_topk_backward_fake)


def _setup_context(ctx, inputs, output):
    logits, _, ctx.scoring, ctx.renormalize, _, ctx.impl = inputs
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
        values(grad_lse, lse.shape), ctx.scoring, ctx.renormalize, ctx.impl,
    )
    return grad_logits, None, None, None, None, None


_router_topk_op.register_autograd(_backward, setup_context=_setup_context)


def router_topk(
    logits: torch.Tensor,
    k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias: Optional[torch.Tensor] = None,
) -> RouterOutput:
    """Routes each of N tokens to its top-``k`` of E experts, reading the logits once.

    Args:
        logits: ``[N, E]`` fp32/fp16/bf16 gate logits, any strides; computed in fp32. N may
            be 0 (empty outputs, zero counts and sums).
        k: experts per token, ``1 <= k <= E``.
        scoring: ``"softmax"`` (probabilities over the experts) or ``"sigmoid"``
            (independent scores, DeepSeek-V3).
        renormalize: divide the k chosen scores by their sum, so each row's weights add to 1.
        bias: optional ``[E]`` selection bias (aux-loss-free balancing, DeepSeek-V3): experts
            are ranked by ``score + bias``, but the weights are the unbiased scores. It gets
            no gradient. Without it experts are ranked by their logits (the scores' order).

    Equal keys go to the lower expert index. Non-finite logits: see the module docstring.
    Differentiable w.r.t. ``logits`` through ``weights``, ``prob_sums`` and ``lse`` (so
    :func:`load_balancing_loss` and :func:`router_z_loss` are too).
    """
    op = "router_topk"
    SPEC.check_tensor("logits", logits, ndim=2)
    check_int(op, "k", k, low=1, high=logits.shape[1])
    check_choice(op, "scoring", scoring, SCORINGS)
    if not isinstance(renormalize, bool):
        raise TypeError(f"{op}: renormalize must be a bool, got {type(renormalize).__name__}")
    if bias is not None:
        SPEC.check_tensor("bias", bias, ndim=1)
        check_size(op, "bias", bias, 0, logits.shape[1], "the number of experts logits.shape[1]")
        check_same_device(op, logits=logits, bias=bias)
        bias = bias.detach().float().contiguous()
    return RouterOutput(*_router_topk_op(logits, k, scoring, renormalize, bias, SPEC.choose(logits.device)))


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
