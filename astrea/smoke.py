"""A quick check that every op runs and is right on a device: ``python -m astrea.smoke``.

Each case builds random inputs for one op in one dtype, runs the op forward and backward
on the kernels the device runs — on CUDA the Triton kernels and ``astrea._C``'s CUDA
kernels (backend ``auto``); on CPU tensors the Triton kernels through the Triton
interpreter (backend ``triton``, ``TRITON_INTERPRET=1`` set before triton is imported) —
and compares every output and input gradient with the op's reference
(:mod:`astrea.reference`):

* integer outputs (expert indices, counts, dispatch layouts) must equal the reference's
  on the same inputs; the router's logits are drawn without ties, so the choice is unique;
* a floating output's error ``|out - truth| / |truth|`` (Frobenius norms), where the
  truth is the reference on fp32 copies of the inputs on the same device, must stay within
  ``max(4 * e_torch, FLOOR[dtype])``, ``e_torch`` being the reference's own error when it
  runs in the case's dtype (flash-attention's rule). The floors, four unit roundoffs of
  tf32 (for fp32 inputs, whose matrix products may use it), fp16 and bf16, allow a few
  roundings of the operands and the output; this is a
  check that a kernel computes the right function on a device, not of its last bits,
  which the test suite holds to derived bounds.

``--sizes tiny`` (the default on CPU) keeps the interpreter's runs to seconds; on a GPU
``small`` (odd sizes that cross tile boundaries) and ``bench`` (the benchmarks' headline
sizes, bf16 only) follow. Results are written to ``--out`` (JSON) after every case, so a run
stopped by a time limit keeps what it finished. Exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Callable

import torch

import astrea
from astrea import ops

# Smallest bound on a floating output's relative error, by dtype: four unit roundoffs of the
# precision products are formed in (tf32 for fp32 inputs, whose matrix units may use it).
FLOOR = {torch.float32: 4 * 2.0 ** -11, torch.float16: 4 * 2.0 ** -11, torch.bfloat16: 4 * 2.0 ** -8}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = ("tiny", "small", "bench")
# Times a floating output's error may exceed the reference's own error in the case's dtype.
TORCH_ERROR_FACTOR = 4.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One op: ``make(size, generator)`` gives CPU inputs, float32 for the floating ones;
    ``call(size, **inputs)`` runs the op and returns its outputs by name; ``grads`` names
    the floating inputs whose gradients are checked; ``sizes`` gives the shape parameters
    of each size (``tiny``, ``small``, ``bench``)."""

    op: str
    make: Callable[[dict, torch.Generator], dict[str, torch.Tensor]]
    call: Callable[..., dict[str, torch.Tensor]]
    sizes: dict[str, dict]
    grads: tuple[str, ...] = ()


def _normal(generator, *shape):
    return torch.randn(*shape, generator=generator)


def _tie_free_logits(generator, rows, experts):
    """Logits whose rows are distinct multiples of 1/8, exact in fp16 and bf16 (E <= 256):
    the top-k of a row is unique in every dtype."""
    keys = torch.rand(rows, experts, generator=generator).argsort(dim=1).float()
    return (keys - experts / 2) / 8


def _expert_choice(generator, rows, top_k, experts):
    """[rows, top_k] int32 of distinct experts per row (the router's indices)."""
    return torch.rand(rows, experts, generator=generator).argsort(dim=1)[:, :top_k].to(torch.int32)


def _router_make(size, generator):
    inputs = {"logits": _tie_free_logits(generator, size["N"], size["E"])}
    if size["scoring"] == "sigmoid" or size.get("options"):
        inputs["bias"] = _normal(generator, size["E"]) / 64
    return inputs


def _router_call(size, logits, bias=None):
    out = ops.router_topk(logits, size["k"], scoring=size["scoring"], bias=bias, **size.get("options", {}))
    return {"weights": out.weights, "indices": out.indices, "counts": out.counts, "prob_sums": out.prob_sums,
            "lse": out.lse, "balancing_loss": ops.load_balancing_loss(out), "z_loss": ops.router_z_loss(out)}


def _routed_make(size, generator):
    tokens, top_k, experts, dim = size["N"], size["k"], size["E"], size["D"]
    return {"indices": _expert_choice(generator, tokens, top_k, experts), "x": _normal(generator, tokens, dim),
            "expert_out": _normal(generator, tokens * top_k, dim),
            "weights": torch.rand(tokens, top_k, generator=generator),
            "expert_scale": 0.5 + torch.rand(experts, generator=generator)}


def _routed_call(size, indices, x, expert_out, weights, expert_scale):
    dispatch = ops.moe_dispatch(indices, size["E"])
    return {"sorted_token_ids": dispatch.sorted_token_ids, "expert_offsets": dispatch.expert_offsets,
            "inverse_positions": dispatch.inverse_positions, "permuted": ops.permute(x, dispatch),
            "combined": ops.weighted_combine(expert_out, weights, dispatch, expert_scale),
            "combine_residual": ops.combine_residual(expert_out, weights, x, RESIDUAL_P, seed=SEED,
                                                     expert_scale=expert_scale, dispatch=dispatch)}


RESIDUAL_P, SEED = 0.75, 1234


def _dense_make(size, generator):
    shape = (size["B"], size["T"], size["D"])
    return {"expert_out": _normal(generator, size["E"], *shape),
            "weights": torch.rand(size["B"], size["E"], generator=generator),
            "expert_scale": 0.5 + torch.rand(size["E"], generator=generator), "residual": _normal(generator, *shape)}


def _dense_call(size, expert_out, weights, expert_scale, residual):
    return {"combined": ops.dense_weighted_combine(expert_out, weights, expert_scale),
            "stochastic_residual": ops.stochastic_residual(residual, residual * 0.5, RESIDUAL_P, seed=SEED),
            "combine_residual": ops.combine_residual(expert_out, weights, residual, RESIDUAL_P, seed=SEED,
                                                     expert_scale=expert_scale)}


def _moco_make(size, generator):
    def unit(rows):
        return torch.nn.functional.normalize(_normal(generator, rows, size["D"]), dim=1)
    return {"q": unit(size["N"]), "k": unit(size["N"]), "queue": unit(size["K"]), "keys": unit(size["B"])}


def _moco_call(size, q, k, queue, keys):
    written = queue.detach().clone()
    ptr = torch.tensor([written.shape[0] - 1], dtype=torch.int64, device=queue.device)
    ops.queue_enqueue_(written, ptr, keys.detach())
    return {"logits": ops.moco_logits(q, k, queue, 0.07), "infonce": ops.moco_infonce(q, k, queue, 0.07),
            "queue_after_enqueue": written, "ptr_after_enqueue": ptr}


def _experts_make(size, generator):
    experts, hidden, inter = size["E"], size["H"], size["I"]
    return {"x": _normal(generator, size["N"], hidden),
            "indices": _expert_choice(generator, size["N"], size["k"], experts),
            "gate_up": _normal(generator, experts, 2 * inter, hidden) / hidden ** 0.5,
            "down": _normal(generator, experts, hidden, inter) / inter ** 0.5,
            "weights": torch.rand(size["N"], size["k"], generator=generator),
            "expert_scale": 0.5 + torch.rand(experts, generator=generator)}


def _experts_call(size, x, indices, gate_up, down, weights, expert_scale):
    dispatch = ops.moe_dispatch(indices, size["E"])
    return {"out": ops.moe_experts(x, dispatch, gate_up, down, weights, expert_scale=expert_scale)}


def _gpt_oss_experts_make(size, generator):
    """gpt-oss's experts as transformers stores them: gate_up_proj [E, H, 2I] (gate and up columns
    interleaved) and down_proj [E, I, H], both biased; the pre-activations spread past the clamps
    of its SwiGLU (limit 7)."""
    experts, hidden, inter = size["E"], size["H"], size["I"]
    return {"x": _normal(generator, size["N"], hidden),
            "indices": _expert_choice(generator, size["N"], size["k"], experts),
            "gate_up_proj": _normal(generator, experts, hidden, 2 * inter) * (6 / hidden ** 0.5),
            "gate_up_proj_bias": _normal(generator, experts, 2 * inter) * 2,
            "down_proj": _normal(generator, experts, inter, hidden) / inter ** 0.5,
            "down_proj_bias": _normal(generator, experts, hidden),
            "weights": torch.rand(size["N"], size["k"], generator=generator)}


def _gpt_oss_experts_call(size, x, indices, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, weights):
    dispatch = ops.moe_dispatch(indices, size["E"])
    return {"out": ops.moe_experts(x, dispatch, gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2), weights,
                                   activation="clamped_swiglu", gate_up_bias=gate_up_proj_bias,
                                   down_bias=down_proj_bias, gate_up_layout="interleaved")}


def _relu2_experts_make(size, generator):
    """Nemotron-H's experts: plain (ungated) FFNs with relu2."""
    experts, hidden, inter = size["E"], size["H"], size["I"]
    return {"x": _normal(generator, size["N"], hidden),
            "indices": _expert_choice(generator, size["N"], size["k"], experts),
            "up": _normal(generator, experts, inter, hidden) / hidden ** 0.5,
            "down": _normal(generator, experts, hidden, inter) / inter ** 0.5,
            "weights": torch.rand(size["N"], size["k"], generator=generator)}


def _relu2_experts_call(size, x, indices, up, down, weights):
    dispatch = ops.moe_dispatch(indices, size["E"])
    return {"out": ops.moe_experts(x, dispatch, up, down, weights, activation="relu2", gated=False)}


def _router_sizes(scoring):
    return {"tiny": dict(N=5, E=7, k=2, scoring=scoring), "small": dict(N=37, E=60, k=6, scoring=scoring),
            "bench": dict(N=65536, E=64, k=8, scoring=scoring)}


# DeepSeek-V3's router: sigmoid scores, a selection bias, the top 4 of 8 groups ranked by their
# top-2 sums, k = 8, renormalised and scaled.
_GROUPED = dict(scoring="sigmoid", options=dict(num_groups=8, topk_groups=4, scaling_factor=2.5))
GROUPED_ROUTER_SIZES = {"tiny": dict(N=5, E=16, k=4, **_GROUPED), "small": dict(N=37, E=160, k=8, **_GROUPED),
                        "bench": dict(N=65536, E=256, k=8, **_GROUPED)}


CASES = (
    Case("router_topk softmax", _router_make, _router_call, _router_sizes("softmax"), ("logits",)),
    Case("router_topk sigmoid+bias", _router_make, _router_call, _router_sizes("sigmoid"), ("logits",)),
    Case("router_topk grouped (DeepSeek-V3)", _router_make, _router_call, GROUPED_ROUTER_SIZES, ("logits",)),
    Case("moe_dispatch, permute, weighted_combine, combine_residual (sparse)", _routed_make, _routed_call,
         {"tiny": dict(N=5, k=2, E=3, D=9), "small": dict(N=37, k=3, E=7, D=200),
          "bench": dict(N=65536, k=8, E=64, D=2048)}, ("x", "expert_out", "weights", "expert_scale")),
    Case("dense_weighted_combine, stochastic_residual, combine_residual (dense)", _dense_make, _dense_call,
         {"tiny": dict(B=2, T=3, D=9, E=3), "small": dict(B=3, T=37, D=200, E=4),
          "bench": dict(B=64, T=1024, D=2048, E=4)}, ("expert_out", "weights", "expert_scale", "residual")),
    Case("moco_logits, moco_infonce, queue_enqueue_", _moco_make, _moco_call,
         {"tiny": dict(N=3, K=11, D=8, B=4), "small": dict(N=33, K=130, D=72, B=40),
          "bench": dict(N=4096, K=65536, D=128, B=256)}, ("q", "k")),
    Case("moe_experts", _experts_make, _experts_call,
         {"tiny": dict(N=5, k=2, E=3, H=9, I=6), "small": dict(N=37, k=3, E=6, H=33, I=200),
          "bench": dict(N=8192, k=8, E=128, H=2048, I=768)}, ("x", "gate_up", "down", "weights", "expert_scale")),
    Case("moe_experts gpt-oss (biases, interleaved, clamped_swiglu, transposed stacks)", _gpt_oss_experts_make,
         _gpt_oss_experts_call,
         {"tiny": dict(N=5, k=2, E=3, H=9, I=6), "small": dict(N=37, k=4, E=8, H=72, I=100),
          "bench": dict(N=8192, k=4, E=32, H=2880, I=2880)},
         ("x", "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias", "weights")),
    Case("moe_experts relu2, ungated (Nemotron-H)", _relu2_experts_make, _relu2_experts_call,
         {"tiny": dict(N=5, k=2, E=3, H=9, I=6), "small": dict(N=37, k=3, E=6, H=33, I=200),
          "bench": dict(N=8192, k=6, E=128, H=2688, I=1856)}, ("x", "up", "down", "weights")),
)


def _run(case: Case, size: dict, inputs: dict, dtype: torch.dtype, device: torch.device, backend: str):
    """Outputs and input gradients of ``case`` with its floating inputs cast to ``dtype`` on
    ``device``; the backward of ``sum_o <out_o, cotangent_o>`` with fixed random cotangents."""
    placed = {}
    for name, value in inputs.items():
        value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        placed[name] = value.requires_grad_(name in case.grads)
    with astrea.backend(backend):
        outputs = case.call(size, **placed)
        generator = torch.Generator().manual_seed(7)
        floating = [out for out in outputs.values() if out.is_floating_point() and out.requires_grad]
        loss = sum((out.float() * torch.randn(out.shape, generator=generator).to(device)).sum() for out in floating)
        needed = [placed[name] for name in case.grads]
        grads = torch.autograd.grad(loss, needed, allow_unused=True) if floating else [None] * len(needed)
    results = {name: out.detach() for name, out in outputs.items()}
    results.update({f"grad {name}": g for name, g in zip(case.grads, grads) if g is not None})
    return results


def _relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    value, truth = value.double(), truth.double()
    if not torch.isfinite(value).all():
        return float("inf")
    scale = truth.norm().item()
    return (value - truth).norm().item() / (scale if scale > 0 else 1.0)


def check(case: Case, size_name: str, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """One record per output and gradient of ``case`` at ``size_name`` in ``dtype``."""
    size = case.sizes[size_name]
    inputs = case.make(size, torch.Generator().manual_seed(0))
    kernel_backend = "auto" if device.type == "cuda" else "triton"
    start = time.perf_counter()
    got = _run(case, size, inputs, dtype, device, kernel_backend)
    seconds = time.perf_counter() - start
    same_dtype = _run(case, size, inputs, dtype, device, "reference")
    truth = _run(case, size, inputs, torch.float32, device, "reference")
    records = []
    for name, value in got.items():
        record = {"op": case.op, "size": size_name, "shape": size, "dtype": str(dtype).removeprefix("torch."),
                  "output": name, "device": device.type, "kernel_seconds": round(seconds, 4)}
        if name not in truth:
            record.update(ok=False, error="the reference gives no such output")
        elif not value.is_floating_point():
            mismatches = int((value != same_dtype[name]).sum())
            record.update(ok=mismatches == 0, mismatches=mismatches)
        else:
            error = _relative_error(value, truth[name])
            torch_error = _relative_error(same_dtype[name], truth[name])
            bound = max(TORCH_ERROR_FACTOR * torch_error, FLOOR[dtype])
            record.update(ok=error <= bound, error=error, torch_error=torch_error, bound=bound)
        records.append(record)
    return records


def plan(device: torch.device, sizes: tuple[str, ...]) -> list[tuple[Case, str, torch.dtype]]:
    """The (case, size, dtype) runs in order: every op in fp32 first, then the low precisions,
    then the benchmark sizes (bf16 only), so that a time limit cuts the least telling runs."""
    runs = [(case, size, dtype) for size in sizes if size != "bench" for dtype in DTYPES for case in CASES]
    if "bench" in sizes:
        runs += [(case, "bench", torch.bfloat16) for case in CASES]
    return runs


def _write(path: str | None, records: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(records, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m astrea.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help=f"comma-separated, of {', '.join(SIZES)} "
                        "(default: tiny on CPU, small,bench on CUDA)")
    parser.add_argument("--out", default=None, help="JSON file of every record, rewritten after each case")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = tuple((args.sizes or ("tiny" if device.type == "cpu" else "small,bench")).split(","))
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        parser.error(f"--sizes must name sizes of {', '.join(SIZES)}; got {', '.join(unknown)}")
    if device.type == "cpu" and not astrea._backend.triton_interpreter_enabled():
        parser.error("on CPU the Triton kernels run only under the interpreter: set TRITON_INTERPRET=1")
    records: list[dict] = []
    for case, size, dtype in plan(device, sizes):
        done = len(records)
        try:
            records += check(case, size, dtype, device)
        except Exception as exc:  # one broken op must not hide the others' results
            records.append({"op": case.op, "size": size, "dtype": str(dtype).removeprefix("torch."),
                            "device": device.type, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        _write(args.out, records)
        failed = any(not r["ok"] for r in records[done:])
        print(f"{'FAIL' if failed else 'ok  '} {case.op} [{size}, {str(dtype).removeprefix('torch.')}]", flush=True)
    bad = [r for r in records if not r["ok"]]
    for record in bad:
        print("FAILED:", json.dumps(record))
    print(f"smoke: {len(records) - len(bad)} of {len(records)} checks passed on {device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
