"""``python -m astrea.info``: what this installation of astrea can run, and on what."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

import torch

import astrea
from astrea import _backend, _extension
from astrea.nn.attention import attention_backend
from astrea.ops.moco import CUDA_TILE_MATH


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _importable(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"installed but import fails ({type(exc).__name__}: {exc})"
    return f"available ({_version(module.replace('_', '-'))})"


# The oldest releases astrea runs on, and what sets each bound.
MINIMUM_VERSIONS = {
    "torch": ("2.10", "torch.nn.functional.grouped_mm (moe_experts on CPU tensors); torch.library custom ops"),
    "triton": (".".join(map(str, _backend.MINIMUM_TRITON)),
               "the oldest Triton the kernel tests run under (the second pass of `make test`)"),
}


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '2.13.0+cpu' or '3.6.0'."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def minimum_version_rows() -> list[tuple[str, str]]:
    rows = []
    for dist, (minimum, why) in MINIMUM_VERSIONS.items():
        installed = _version(dist)
        status = ("not installed" if installed == "not installed"
                  else "met" if _release(installed) >= _release(minimum) else f"NOT met by {installed}")
        rows.append((f"{dist} minimum", f">= {minimum}: {status} ({why})"))
    return rows


def collect() -> list[tuple[str, str]]:
    """The report as (key, value) rows."""
    rows = [
        ("astrea", astrea.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "CPU build"),
        ("CUDA devices", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
         or "none visible"),
        ("triton", _backend.triton_import_error() or _version("triton")),
        ("TRITON_INTERPRET", "1" if _backend.triton_interpreter_enabled() else "0"),
        ("backend ($ASTREA_BACKEND)", _backend.current_backend()),
        *minimum_version_rows(),
    ]
    err = _extension.load_error()
    if err is None:
        build = _extension.build_info()
        rows.append(("astrea._C", f"loaded from {sys.modules['astrea._C'].__file__}"))
        rows.append(("_C built against torch", build.get("torch_version", "unknown")))
        rows.append(("_C CUDA kernels", "built, arch " + str(build.get("cuda_arch_list"))
                     if build.get("with_cuda") else f"not built ({build.get('cuda_reason', 'unknown')})"))
        if build.get("with_cuda"):
            rows.append(("moco CUDA tiles", "; ".join(f"{str(dtype).removeprefix('torch.')}: {math}"
                                                      for dtype, math in CUDA_TILE_MATH.items())))
    else:
        rows.append(("astrea._C", f"not loaded: {err}; {_extension.BUILD_HINT}"))
    rows.append(("flash-attn", _importable("flash_attn")))
    rows.append(("xformers", _importable("xformers")))
    rows.append(("attention backend", f"{attention_backend('cuda', torch.bfloat16)} for fp16/bf16 CUDA tensors, "
                                      "sdpa otherwise"))
    return rows


def op_table() -> list[tuple[str, str, str]]:
    """(op, what runs it on CPU tensors, what runs it on CUDA tensors)."""
    return [(name, spec.describe("cpu"), spec.describe("cuda")) for name, spec in sorted(_backend.OPS.items())]


def capability_table() -> list[tuple[str, str]]:
    """(op, its declared capabilities: dtypes by device, limits, what each implementation covers)."""
    return [(name, spec.capabilities()) for name, spec in sorted(_backend.OPS.items())]


def report() -> str:
    rows = collect()
    width = max(len(k) for k, _ in rows)
    lines = ["astrea build and runtime report", ""]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    ops = op_table()
    name_w = max([len("op")] + [len(n) for n, _, _ in ops])
    cpu_w = max([len("CPU tensors")] + [len(c) for _, c, _ in ops])
    lines += ["", f"{'op':<{name_w}}  {'CPU tensors':<{cpu_w}}  CUDA tensors"]
    lines += [f"{n:<{name_w}}  {c:<{cpu_w}}  {g}" for n, c, g in ops]
    lines += ["", "op capabilities"]
    lines += [f"{n:<{name_w}}  {c}" for n, c in capability_table()]
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
