"""Which implementation runs an op: the backend switch.

``ASTREA_BACKEND`` (read at each call) or the :func:`backend` context manager picks:

* ``auto`` (default): CUDA tensors run the kernels (Triton, or the compiled extension
  ``astrea._C``); CPU tensors run the C++ CPU kernel where ``_C`` has one, otherwise
  the plain-PyTorch reference in :mod:`astrea.reference`.
* ``triton``: the Triton kernels run on every tensor. On CPU tensors this needs the
  Triton interpreter (``TRITON_INTERPRET=1`` set before ``import triton``); the test
  suite runs the kernels this way on machines without a GPU. Ops whose kernel lives in
  ``_C`` use ``_C``.
* ``reference``: every op runs its plain-PyTorch reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import os
from typing import Iterator, Literal

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "ASTREA_BACKEND"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("astrea_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """An op was asked to run on an implementation that is not installed or cannot run here.

    ``short`` is a few words for tables (``python -m astrea.info``); the message says it all.
    """

    def __init__(self, message: str, short: str):
        super().__init__(message)
        self.short = short


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost :func:`backend` context, else ``$ASTREA_BACKEND``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (auto, triton or reference)."""
    token = _forced.set(_check_name(name, "backend name"))
    try:
        yield
    finally:
        _forced.reset(token)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when triton imports, else why it does not."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # a broken install raises more than ImportError
        return f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    return None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What implementations an op has, for dispatch and for ``python -m astrea.info``."""

    name: str
    kernel: Literal["triton", "extension"]
    # Ops with a C++ CPU kernel in _C run it on CPU tensors under `auto`.
    cpu_kernel: bool = False
    # For a Triton op with a C++ CPU kernel: the _C op (``astrea::<name>``) that has it.
    # Without a _C that registers it, CPU tensors get the reference.
    cpu_extension_op: str | None = None


OPS: dict[str, OpSpec] = {}


def declare_op(name: str, kernel: Literal["triton", "extension"], cpu_kernel: bool = False,
               cpu_extension_op: str | None = None) -> OpSpec:
    if cpu_extension_op is not None and kernel != "triton":
        raise ValueError(f"declare_op({name!r}): cpu_extension_op is for Triton ops; extension ops use cpu_kernel")
    spec = OpSpec(name, kernel, cpu_kernel or cpu_extension_op is not None, cpu_extension_op)
    OPS[name] = spec
    return spec


Impl = Literal["triton", "extension", "reference"]


def choose(op: str, device: torch.device) -> Impl:
    """The implementation that runs ``op`` on tensors of ``device`` now, or an error saying why none can."""
    spec = OPS[op]
    mode = current_backend()
    if mode == "reference":
        return "reference"
    if spec.kernel == "extension":
        if device.type == "cpu" and not spec.cpu_kernel:
            return "reference"
        from astrea import _extension

        _extension.require(op, device)
        return "extension"
    # A Triton op.
    on_cpu = device.type == "cpu"
    if mode == "auto" and on_cpu:
        if spec.cpu_extension_op is not None:
            from astrea import _extension

            if _extension.has_kernel(spec.cpu_extension_op, "CPU"):
                return "extension"
        return "reference"
    reason = triton_import_error()
    if reason is not None:
        raise BackendUnavailableError(f"astrea.ops.{op} on {device.type} needs Triton: {reason}", "triton missing")
    if on_cpu and not triton_interpreter_enabled():
        raise BackendUnavailableError(
            f"astrea.ops.{op}: the Triton backend runs on CPU tensors only under the Triton "
            "interpreter; set TRITON_INTERPRET=1 before triton is imported, or use a CUDA tensor",
            "needs TRITON_INTERPRET=1",
        )
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(
            f"astrea.ops.{op}: no Triton kernel for {device.type} tensors", f"no {device.type} kernel"
        )
    return "triton"


def describe(op: str, device_type: str) -> str:
    """One line for the info report: what would run ``op`` on ``device_type`` tensors, or why nothing."""
    try:
        return choose(op, torch.device(device_type))
    except BackendUnavailableError as exc:
        return f"unavailable: {exc.short}"
