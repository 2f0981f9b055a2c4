"""Which transformers MoE families ``apply_astrea`` runs exactly: for every model family whose
experts module is a transformers fused experts module (``@use_experts_implementation``), a
tiny randomly initialised model built from its config, patched and compared with itself
unpatched (fp32): the output of every MoE block, the logits (or last hidden states), the
aux loss where the model has one, the gradients of every parameter and 5 greedily generated
tokens where transformers generates from the tiny model. Prints the README table (or writes
it with ``--readme``).

    python scripts/moe_family_table.py [--readme] [--only deepseek_v3,gpt_oss]

A family is "patched exactly" when every comparison holds; "refused" when apply_astrea raises
UnsupportedMoEBlockError (its reason is quoted); "not built" when no tiny model could be made
from its config here (the reason is given); anything else is a failure of astrea, and the
script exits non-zero: a crash (another exception) or a patch whose outputs differ.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import pkgutil
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import transformers
import transformers.models

from astrea.integrations.transformers import UnsupportedMoEBlockError, apply_astrea

# fp32 block outputs: at most this much apart, relative to the block's largest output (the
# tiny models' residual streams grow to tens, where one fp32 ulp is already ~4e-6).
BLOCK_TOLERANCE = 1e-5
# Sizes of the tiny models, applied to every config (and sub-config) attribute of that name.
TINY = dict(
    hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    expert_intermediate_size=32, ffn_hidden_size=64, num_hidden_layers=2, num_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, num_experts_per_tok=2, first_k_dense_replace=1,
    decoder_sparse_step=1, moe_layer_freq=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, initializer_range=0.2, depth=1, num_heads=2, out_hidden_size=64,
    pad_token_id=0, linear_num_heads=2, linear_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=16, unpadded_vocab_size=128, swa_head_dim=16, mamba_n_heads=8,
    mamba_d_head=16,
)
GREEDY_TOKENS = 5
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
NUM_EXPERTS = 8
README_START = "<!-- moe-family-table:start -->"
README_END = "<!-- moe-family-table:end -->"


@dataclass
class Result:
    family: str
    status: str  # "patched exactly", "refused", "not built", "CRASH", "DIFFERS"
    detail: str = ""


def fused_families() -> list[str]:
    """Model families whose modeling file defines a @use_experts_implementation experts class."""
    root = Path(transformers.models.__file__).parent
    names = []
    for info in pkgutil.iter_modules(transformers.models.__path__):
        source = root / info.name / f"modeling_{info.name}.py"
        if source.exists() and "@use_experts_implementation" in source.read_text():
            names.append(info.name)
    return sorted(names)


def _shrink(config) -> None:
    """Shrinks ``config`` and its sub-configs in place to the TINY sizes (lists with one entry
    per layer cut to the new layer count). A heterogeneous config (``per_layer_config``) keeps
    its per-layer overrides on the layers left, their sizes shrunk to the same TINY sizes."""
    overrides = None
    if getattr(config, "is_heterogeneous", False):
        overrides = config._heterogeneity_spec.per_layer_overrides
        config.per_layer_config = None  # homogeneous while the global sizes shrink
    _shrink_homogeneous(config)
    if overrides is not None:
        layers = getattr(config, "num_hidden_layers", None)
        config.per_layer_config = {
            layer: {name: TINY.get(name, value) for name, value in changes.items()}
            for layer, changes in overrides.items() if layers is None or layer < layers
        }


def _shrink_homogeneous(config) -> None:
    layers_before = getattr(config, "num_hidden_layers", None)
    if hasattr(config, "top_k_experts"):  # Gemma-4 (dense unless asked) and DiffusionGemma: MoE sizes unset
        config.top_k_experts, config.moe_intermediate_size = 2, TINY["moe_intermediate_size"]
        if hasattr(config, "enable_moe_block"):
            config.enable_moe_block = True
    head_is_rope = getattr(config, "head_dim", None) == getattr(config, "qk_rope_head_dim", False)
    for name, value in TINY.items():
        if not hasattr(config, name):
            continue
        current = getattr(config, name)
        if isinstance(current, list) and all(isinstance(v, int) for v in current):
            setattr(config, name, [value] * len(current))  # one per layer or per modality
        elif current is not None or name in ("num_experts_per_tok", "head_dim"):
            setattr(config, name, value)
    if isinstance(getattr(config, "kv_lora_rank", None), int):  # multi-head latent attention: its derived sizes
        config.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        config.head_dim = config.qk_rope_head_dim if head_is_rope else config.qk_head_dim
        config.num_key_value_heads = config.num_attention_heads
        rope = getattr(config, "rope_parameters", None)
        # One rope dict, or one per layer type (Dots3-Note)
        nested = isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values())
        for params in (rope.values() if nested else [rope] if isinstance(rope, dict) else []):
            if "partial_rotary_factor" in params:
                params["partial_rotary_factor"] = config.qk_rope_head_dim / config.qk_head_dim
    for name in EXPERT_COUNTS:
        if hasattr(config, name) and not isinstance(getattr(config, name), (bool, list)):
            setattr(config, name, NUM_EXPERTS)
    if hasattr(config, "n_group") and hasattr(config, "topk_group"):  # grouped selection, 4 groups of 2
        config.n_group, config.topk_group = 4, 2
        if getattr(config, "topk_method", None) == "greedy":
            config.topk_method = "group_limited_greedy"
    if hasattr(config, "n_shared_experts"):
        config.n_shared_experts = 1
    _shrink_rope(config)
    if hasattr(config, "num_dense_layers"):  # LFM2-MoE: a dense first layer, then sparse ones
        config.num_dense_layers = 1
    if type(config).__name__ == "Lfm2MoeConfig" and config.layer_types is None:  # no default: a conv, an attention
        config.layer_types = ["conv", "full_attention"][: config.num_hidden_layers]
    if hasattr(config, "mlp_only_layers"):
        config.mlp_only_layers = []
    if hasattr(config, "mlp_layer_types"):  # a dense first layer, then sparse ones
        config.mlp_layer_types = ["dense"] + ["sparse"] * (config.num_hidden_layers - 1)
    if isinstance(layers_before, int):
        for name, value in list(vars(config).items()):
            if isinstance(value, list) and len(value) == layers_before and name not in ("mlp_only_layers",
                                                                                          "mlp_layer_types"):
                setattr(config, name, value[: config.num_hidden_layers])
    for value in list(vars(config).values()):
        if isinstance(value, transformers.PretrainedConfig):
            _shrink(value)


def _shrink_rope(config) -> None:
    """Multimodal rotary sections fitted to the tiny heads: mrope_section sums to half the
    rotary width."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not hasattr(config, "hidden_size"):
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    half = int(head_dim * factor) // 2
    sections = rope.get("mrope_section")
    if sections is None and "mrope_section" in getattr(config, "ignore_keys_at_rope_validation", ()):
        sections = [1, 1, 1]  # the modeling file's default is sized for the full model
    if isinstance(sections, list) and sum(sections) != half:
        fitted = [max(1, half * part // sum(sections)) for part in sections]
        fitted[-1] += half - sum(fitted)
        rope["mrope_section"] = fitted


def _config_class(family: str):
    """The family's config class: the one whose model_type is the family's name, else the one
    config of its module that no other holds as a sub-config (Inkling's model_type is
    "inkling_mm_model")."""
    module = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    configs = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
               if issubclass(cls, transformers.PretrainedConfig) and cls.__module__ == module.__name__]
    for cls in configs:
        if getattr(cls, "model_type", None) == family:
            return cls
    held = {sub for cls in configs for sub in getattr(cls, "sub_configs", {}).values()}
    roots = [cls for cls in configs if cls not in held]
    if len(roots) == 1:
        return roots[0]
    raise LookupError(f"no config class with model_type {family!r}, and {len(roots)} top-level config classes")


def _model_class(family: str, config_class):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    classes = [cls for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__]
    for suffix in ("ForCausalLM", "ForConditionalGeneration", "Model"):
        for cls in classes:
            if cls.__name__.endswith(suffix) and getattr(cls, "config_class", None) is config_class:
                return cls
    for cls in classes:
        if cls.__name__.endswith("ForCausalLM"):
            return cls
    raise LookupError("no model class for its config")


def build(family: str, seed: int = 0) -> nn.Module:
    """A tiny fp32 model of ``family`` with random weights, its selection-bias buffers random
    too (as in a trained model), in eval mode."""
    config_class = _config_class(family)
    config = config_class()
    model_class = _model_class(family, config_class)
    thinker_only = model_class.forward is nn.Module.forward and hasattr(config, "thinker_config")
    if thinker_only:  # Qwen3-Omni-MoE: a generate-only wrapper; its thinker is the MoE LLM with a forward
        config.enable_audio_output = False
        # The thinker's rope reads vision_start_token_id, which only the talker's config class has.
        if not hasattr(config.thinker_config, "vision_start_token_id"):
            config.thinker_config.vision_start_token_id = config.talker_config.vision_start_token_id
    _shrink(config)
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    if thinker_only:
        model = model.thinker
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if "correction_bias" in name or name.endswith(".expert_bias"):
                tensor.copy_(torch.randn(tensor.shape) * 0.1)
        # A router initialised to zeros (AFMoE's) ties every expert, and torch.topk breaks
        # ties in no specified order: give it the weights of a trained router.
        for _, block in moe_blocks(model):
            for name, tensor in block.named_parameters():
                if name.split(".")[0] in ("gate", "router") and tensor.dim() == 2 and not tensor.any():
                    tensor.normal_(0, config.get_text_config().initializer_range)
    return model


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "experts", None), nn.Module)]


def batch_for(model: nn.Module) -> dict:
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, min(vocab, 100), (2, 9), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state


def _run(model: nn.Module, batch: dict):
    """(model output tensor, its aux loss or None, {block name: block output}, {parameter
    name: gradient}); the aux loss, where the model has one, is in the loss differentiated."""
    outputs, hooks = {}, []
    for name, block in moe_blocks(model):
        hooks.append(block.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, _first_tensor(out).detach())))
    try:
        model.zero_grad()
        options = {"output_router_logits": True} if hasattr(model.config, "output_router_logits") else {}
        output = model(**batch, use_cache=False, **options)
        result = _first_tensor(output)
        aux_loss = getattr(output, "aux_loss", None)
        loss = result.float().square().mean()
        (loss if aux_loss is None else loss + aux_loss).backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return result.detach(), None if aux_loss is None else aux_loss.detach(), outputs, grads


def _differences(original: nn.Module, patched: nn.Module) -> list[str]:
    batch = batch_for(original)
    ref_out, ref_aux, ref_blocks, ref_grads = _run(original, batch)
    out, aux, blocks, grads = _run(patched, batch)
    problems = []
    if (aux is None) != (ref_aux is None) or (aux is not None and not torch.allclose(aux, ref_aux, rtol=1e-5)):
        problems.append(f"aux loss {aux} instead of {ref_aux}")
    if not ref_blocks:
        problems.append("no MoE block ran")
    for name, expected in ref_blocks.items():
        error = (blocks[name].double() - expected.double()).abs().max().item()
        if not error <= BLOCK_TOLERANCE * max(1.0, expected.abs().max().item()):
            problems.append(f"block {name} differs by {error:.2e} (largest output {expected.abs().max().item():.3g})")
    if not torch.allclose(out, ref_out, rtol=1e-4, atol=1e-5):
        problems.append(f"outputs differ by {(out - ref_out).abs().max().item():.2e}")
    if grads.keys() != ref_grads.keys():
        problems.append("other parameters get gradients")
    for name, expected in ref_grads.items():
        if name in grads and not torch.allclose(grads[name], expected, rtol=1e-4, atol=1e-5):
            problems.append(f"grad of {name} differs by {(grads[name] - expected).abs().max().item():.2e}")
            break
    tokens = _greedy(original, batch)
    if tokens is not None and not torch.equal(_greedy(patched, batch), tokens):
        problems.append(f"the {GREEDY_TOKENS} greedy tokens differ")
    return problems


def _greedy(model: nn.Module, batch: dict) -> torch.Tensor | None:
    """GREEDY_TOKENS greedily generated tokens, or None when the model does not generate
    (no generate method, or transformers' generate fails on it unpatched)."""
    if not hasattr(model, "generate"):
        return None
    try:
        return model.generate(**batch, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False)
    except Exception:
        if any("forward" in m.__dict__ for m in model.modules()):  # patched: its failure is astrea's
            raise
        return None


def _short(error: BaseException) -> str:
    text = str(error).split("; nothing was patched")[0]
    text = re.sub(r"^apply_astrea: ", "", text)
    return " ".join(text.split())[:300]


def check(family: str) -> Result:
    try:
        original = build(family)
        _run(copy.deepcopy(original), batch_for(original))
    except Exception as error:  # a config this script cannot shrink, or a model that fails unpatched
        return Result(family, "not built", f"{type(error).__name__}: {_short(error)}")
    if not moe_blocks(original):
        return Result(family, "not built", "the tiny model has no sparse MoE block (a module with `experts`)")
    patched = copy.deepcopy(original)
    try:
        apply_astrea(patched)
    except UnsupportedMoEBlockError as error:
        return Result(family, "refused", _short(error))
    except Exception as error:
        return Result(family, "CRASH", f"{type(error).__name__}: {_short(error)}\n{traceback.format_exc()}")
    try:
        problems = _differences(original, patched)
    except Exception as error:
        return Result(family, "CRASH", f"running the patched model: {type(error).__name__}: {_short(error)}")
    if problems:
        return Result(family, "DIFFERS", "; ".join(problems))
    return Result(family, "patched exactly")


def table(results: list[Result]) -> str:
    counts = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    lines = [f"{len(results)} families with fused experts in transformers {transformers.__version__}: {summary}.", "",
             "| family | apply_astrea | why |", "|---|---|---|"]
    for result in results:
        detail = result.detail.split("\n")[0].replace("|", "\\|")
        lines.append(f"| `{result.family}` | {result.status} | {detail} |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    content = readme.read_text()
    start, end = content.index(README_START) + len(README_START), content.index(README_END)
    readme.write_text(content[:start] + "\n" + text + "\n" + content[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="write the table into README.md between its markers")
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    args = parser.parse_args()
    families = [f for f in args.only.split(",") if f] or fused_families()
    results = []
    for family in families:
        result = check(family)
        print(f"{family}: {result.status} {result.detail}", file=sys.stderr, flush=True)
        results.append(result)
    text = table(results)
    if args.readme:
        write_readme(text)
    print(text)
    return 1 if any(r.status in ("CRASH", "DIFFERS") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
