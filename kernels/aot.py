"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

Every kernel module lists example launches of its own launchers in ``AOT_CASES`` (label ->
function that launches on CPU tensors). :func:`all_specs` runs each under
:func:`recorded_launches`, which records the kernel launches instead of running them, and
turns every launch into an :class:`AOTSpec` specialised as Triton's JIT would specialise it.
:func:`compile_spec` compiles one for a compute capability and reads the cubin's resource
usage (registers, stack and local memory: spilled registers land there) with the
``cuobjdump`` that ships with Triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import triton
from triton._utils import canonicalize_dtype
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelParam

_DIVISIBLE_BY_16 = [["tt.divisibility", 16]]


@dataclasses.dataclass(frozen=True)
class Launch:
    """One ``kernel[grid](...)`` call: the arguments bound to the kernel's parameters (defaults
    applied) and the launch options (the other keywords: num_warps, enable_fp_fusion...)."""

    kernel: Any
    arguments: dict[str, Any]
    options: dict[str, Any]


def _signature_and_params(kernel) -> tuple[inspect.Signature, list[KernelParam]]:
    # Under TRITON_INTERPRET=1 triton.jit makes InterpretedFunctions, which keep neither;
    # they are rebuilt from the Python function so that labels can be listed there too.
    if isinstance(kernel, JITFunction):
        return kernel.signature, kernel.params
    signature = inspect.signature(kernel.fn)
    return signature, [KernelParam(i, p, False, False) for i, p in enumerate(signature.parameters.values())]


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """While active, ``kernel[grid](...)`` appends a :class:`Launch` to the yielded list and
    returns None instead of compiling and running the kernel."""
    launches: list[Launch] = []

    def record(kernel, *args, grid, warmup, **kwargs):
        signature, params = _signature_and_params(kernel)
        names = {param.name for param in params}
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        launches.append(Launch(kernel, dict(bound.arguments), {k: v for k, v in kwargs.items() if k not in names}))

    kernel_classes = (JITFunction, InterpretedFunction)
    originals = [cls.run for cls in kernel_classes]
    try:
        for cls in kernel_classes:
            cls.run = record
        yield launches
    finally:
        for cls, run in zip(kernel_classes, originals):
            cls.run = run


def _specialise(value, path: tuple[int, ...], constexprs: dict, attrs: dict):
    """Triton type of the argument at ``path`` as the JIT specialises it; fills in its
    constexpr value (an int equal to 1) and its tt.divisibility attribute."""
    if isinstance(value, tuple):
        return tuple(_specialise(item, (*path, i), constexprs, attrs) for i, item in enumerate(value))
    if isinstance(value, bool):  # before int: a bool is an int; Triton types bools as u1, unspecialised
        return "u1"
    if isinstance(value, int):
        if value == 1:
            constexprs[path] = 1
            return "constexpr"
        if value % 16 == 0:
            attrs[path] = _DIVISIBLE_BY_16
        if -2**31 <= value < 2**31:
            return "i32"
        return "u64" if value >= 2**63 else "i64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, torch.Tensor):
        if value.data_ptr() % 16 == 0:
            attrs[path] = _DIVISIBLE_BY_16
        return f"*{canonicalize_dtype(value.dtype)}"
    raise TypeError(f"no Triton type for a kernel argument of type {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class AOTSpec:
    """One compile of a kernel, as ``triton.compile`` takes it: argument types (``"*fp32"``,
    ``"i32"``, ``"constexpr"``, tuples of them), constexpr values and ``tt.divisibility``
    attributes keyed by argument index paths, and the launch options."""

    label: str
    kernel: Any
    signature: dict[str, Any]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], list]
    options: dict[str, Any]

    @classmethod
    def of_launch(cls, label: str, launch: Launch) -> AOTSpec:
        _, params = _signature_and_params(launch.kernel)
        signature, constexprs, attrs = {}, {}, {}
        for index, param in enumerate(params):
            value = launch.arguments[param.name]
            if param.is_constexpr:
                constexprs[(index,)] = value
                signature[param.name] = "constexpr"
            elif param.do_not_specialize:  # the JIT keeps such an int a plain i32/i64
                signature[param.name] = _specialise(value, (index,), {}, {})
            else:
                signature[param.name] = _specialise(value, (index,), constexprs, attrs)
        return cls(label, launch.kernel, signature, constexprs, attrs, launch.options)

    def source(self) -> ASTSource:
        return ASTSource(self.kernel, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs)

    def compile_key(self) -> tuple:
        """Equal for two specs that compile to the same kernel."""
        return self.kernel, repr((self.signature, self.constexprs, self.attrs, sorted(self.options.items())))


def _kernel_name(kernel) -> str:
    return kernel.__name__.strip("_").removesuffix("_kernel")


def specs_of_case(label: str, case: Callable[[], Any]) -> list[AOTSpec]:
    """The kernel launches of ``case()``, labelled ``label`` or, when it launches several
    kernels, ``label.<kernel name>``."""
    with recorded_launches() as launches:
        case()
    if not launches:
        raise ValueError(f"AOT case {label} launches no kernel")
    if len(launches) == 1:
        return [AOTSpec.of_launch(label, launches[0])]
    return [AOTSpec.of_launch(f"{label}.{_kernel_name(launch.kernel)}", launch) for launch in launches]


def all_specs() -> list[AOTSpec]:
    """The AOT specs of every kernel module in astrea.kernels, each compile once (under the
    label of its first case)."""
    import astrea.kernels as package

    specs: dict[tuple, AOTSpec] = {}
    for module in pkgutil.iter_modules(package.__path__):
        if module.name == "aot":
            continue
        cases = getattr(importlib.import_module(f"astrea.kernels.{module.name}"), "AOT_CASES", {})
        for label, case in cases.items():
            for spec in specs_of_case(label, case):
                specs.setdefault(spec.compile_key(), spec)
    labels = [spec.label for spec in specs.values()]
    if len(set(labels)) != len(labels):
        raise ValueError(f"AOT spec labels are not unique: {labels}")
    return list(specs.values())


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


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
    compiled = triton.compile(spec.source(), target=GPUTarget("cuda", capability, 32), options=spec.options)
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
