"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

Every kernel module lists :class:`AOTSpec` entries in ``AOT_SPECS``; :func:`compile_spec`
compiles one for a compute capability and reads the cubin's resource usage (registers,
stack and local memory: spilled registers land there) with the ``cuobjdump`` that ships
with Triton.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclasses.dataclass(frozen=True)
class AOTSpec:
    """One compile of a kernel: argument types (``"*fp32"``, ``"i32"``, ``"constexpr"``...),
    constexpr values and launch options, labelled for test ids.

    Compiles are specialised as Triton's JIT specialises a launch on contiguous torch
    tensors, so that registers and layouts match what runs: every pointer is 16-byte
    aligned, an integer argument given a value in ``constexprs`` (a unit stride) is
    compiled as that constant, and the integers named in ``divisible_by_16`` are
    multiples of 16."""

    label: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()

    def source(self) -> ASTSource:
        signature = {name: "constexpr" if name in self.constexprs else kind for name, kind in self.signature.items()}
        arg_names = self.kernel.arg_names
        attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
                 if (isinstance(kind, str) and kind.startswith("*")) or name in self.divisible_by_16}
        return ASTSource(self.kernel, signature=signature, constexprs=self.constexprs, attrs=attrs)


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def all_specs() -> list[AOTSpec]:
    """The AOT specs of every kernel module in astrea.kernels."""
    import astrea.kernels as package

    specs: list[AOTSpec] = []
    for module in pkgutil.iter_modules(package.__path__):
        if module.name == "aot":
            continue
        specs.extend(getattr(importlib.import_module(f"astrea.kernels.{module.name}"), "AOT_SPECS", ()))
    return specs


def _cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump not found (neither in triton's bundle nor on PATH)")
    return found


def _field(text: str, name: str) -> int:
    match = re.search(rf"\b{name}:(\d+)", text)
    if match is None:
        raise ValueError(f"cuobjdump output has no {name} field:\n{text}")
    return int(match.group(1))


def compile_spec(spec: AOTSpec, capability: int) -> Resources:
    compiled = triton.compile(
        spec.source(),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
    return Resources(
        registers=_field(usage, "REG"),
        stack_bytes=_field(usage, "STACK"),
        local_bytes=_field(usage, "LOCAL"),
        shared_bytes=compiled.metadata.shared,
    )
