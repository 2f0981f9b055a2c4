"""Which implementation runs an op: the backend switch, the ops' capabilities, one dispatch rule.

``ASTREA_BACKEND`` (read at each call) or the :func:`backend` context manager picks:

* ``auto`` (default): CUDA tensors run the kernels (Triton, or the compiled extension
  ``astrea._C``); CPU tensors run the C++ CPU kernel where ``_C`` has one, torch's own
  kernels where the op names them as its CPU implementation (``cpu_impl="torch"``, e.g.
  ``F.grouped_mm`` for the grouped experts), otherwise the plain-PyTorch reference in
  :mod:`astrea.reference`.
* ``triton``: the Triton kernels run on every tensor. On CPU tensors this needs the
  Triton interpreter (``TRITON_INTERPRET=1`` set before ``import triton``); the test
  suite runs the kernels this way on machines without a GPU. Ops whose kernel lives in
  ``_C`` use ``_C``.
* ``reference``: every op runs its plain-PyTorch reference.

An op whose kernels are torch's own on every device (``kernel="torch"``) runs them under
``auto`` and ``triton`` alike.

The choice is made once per forward call, by :meth:`OpSpec.choose`, and travels with the
call: it is an argument of the registered op, saved on the autograd context, and the
backward runs the same implementation even when it runs after the ``with`` block has
exited or on autograd's worker thread (which does not see the block: the switch is
per thread, like torch's grad mode).

Under ``torch.compile`` the choice is made while tracing: the compiled graph is guarded
on the :func:`backend` block in force, so entering another one recompiles; the
``ASTREA_BACKEND`` variable is read when the graph is traced and not guarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import threading
from types import MappingProxyType
from typing import Callable, Iterator, Literal, Mapping

import torch

from astrea import _extension
from astrea._errors import BackendUnavailableError
from astrea._validation import FLOAT_DTYPES, check_tensor, dtype_names

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "ASTREA_BACKEND"

_DEFAULT_DTYPES = MappingProxyType({"cpu": FLOAT_DTYPES, "cuda": FLOAT_DTYPES})
# Per thread; a plain attribute so that torch.compile can read it and guard on it.
_switch = threading.local()

Impl = Literal["triton", "extension", "torch", "reference"]
IMPLEMENTATIONS: tuple[Impl, ...] = ("triton", "extension", "torch", "reference")
Kernel = Literal["triton", "extension", "torch"]

__all__ = ["BACKENDS", "BackendUnavailableError", "backend", "current_backend", "declare_op", "OpSpec", "OPS"]


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost :func:`backend` block of this thread, else ``$ASTREA_BACKEND``."""
    forced = getattr(_switch, "name", None)
    if forced is not None:
        return forced
    return _check_name(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the ops called inside the ``with`` block on backend ``name`` (auto, triton or reference).

    Their backward passes run the implementation their forward ran, wherever and whenever
    they run."""
    previous = getattr(_switch, "name", None)
    _switch.name = _check_name(name, "backend name")
    try:
        yield
    finally:
        _switch.name = previous


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The oldest Triton the kernels are tested with (the second pass of `make test` runs 3.6.0).
MINIMUM_TRITON = (3, 6)


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when a Triton the kernels support imports, else why not."""
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # a broken install raises more than ImportError
        return f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    version = getattr(triton, "__version__", "0")
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if release < MINIMUM_TRITON:
        wanted = ".".join(map(str, MINIMUM_TRITON))
        return f"triton {version} is older than {wanted}, the oldest astrea's kernels support; " \
               f"install `pip install 'triton>={wanted}'`"
    return None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What an op accepts and which implementations it has: the one source of its dispatch,
    of its dtype and size checks, and of its rows in ``python -m astrea info``.

    Attributes:
        name: the op, as in ``astrea.ops.<name>``.
        kernel: ``"triton"`` (kernels in :mod:`astrea.kernels`), ``"extension"`` (in ``_C``) or
            ``"torch"`` (torch's own kernels, on every device).
        cpu_kernel: the ``_C`` op (``astrea::<cpu_kernel>``) holding the C++ CPU kernel, if any.
        cpu_impl: what runs a Triton op's CPU tensors under ``auto`` when it is not a ``_C``
            kernel: ``"torch"`` (torch's own CPU kernels, the op's ``torch`` implementation), or
            None (the reference). The ``triton`` backend still runs the Triton kernels there.
        dtypes: the floating dtypes accepted, by device type (``"cpu"``, ``"cuda"``).
        limits: sizes the kernels bound, by argument (e.g. ``{"num_experts": 8192}``).
        supports: what each implementation covers, by implementation, for the report.
    """

    name: str
    kernel: Kernel
    cpu_kernel: str | None = None
    cpu_impl: Literal["torch"] | None = None
    dtypes: Mapping[str, tuple[torch.dtype, ...]] = dataclasses.field(default_factory=lambda: _DEFAULT_DTYPES)
    limits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    supports: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def choose(self, device: torch.device) -> Impl:
        """The implementation that runs this op on tensors of ``device`` now, or an error saying why none can."""
        impl, why, short = _resolve(self.name, current_backend(), device.type)
        if why is not None:
            raise BackendUnavailableError(why, short)
        return impl

    def describe(self, device_type: str) -> str:
        """What would run this op on ``device_type`` tensors now, or why nothing can."""
        impl, why, short = _resolve(self.name, current_backend(), device_type)
        return impl if why is None else f"unavailable: {short}"

    def accepted_dtypes(self, device: torch.device) -> tuple[torch.dtype, ...]:
        return self.dtypes.get(device.type, FLOAT_DTYPES)

    def check_tensor(self, name: str, value, *, ndim: int | None = None, op: str | None = None) -> torch.Tensor:
        """``value`` is a tensor (of ``ndim`` dimensions) of a dtype this op takes on its device;
        errors name ``op`` (default: this op), the argument, what was seen and what was expected."""
        op = op or self.name
        check_tensor(op, name, value, ndim=ndim)
        accepted = self.accepted_dtypes(value.device)
        if value.dtype not in accepted:
            raise TypeError(f"{op}: {name} must have dtype {dtype_names(accepted)} on {value.device.type}; "
                            f"got {value.dtype}")
        return value

    def limit(self, name: str) -> int:
        return self.limits[name]

    def capabilities(self) -> str:
        """One line for the report: dtypes by device, limits, and what each implementation covers."""
        parts = [f"{device}: {dtype_names(dtypes)}" for device, dtypes in self.dtypes.items()]
        parts += [f"{name} <= {value}" for name, value in self.limits.items()]
        parts += [f"{impl}: {text}" for impl, text in self.supports.items()]
        return "; ".join(parts)


OPS: dict[str, OpSpec] = {}


def declare_op(name: str, kernel: Kernel, *, cpu_kernel: str | None = None, cpu_impl: Literal["torch"] | None = None,
               dtypes: Mapping[str, tuple[torch.dtype, ...]] | None = None, limits: Mapping[str, int] | None = None,
               supports: Mapping[str, str] | None = None) -> OpSpec:
    """Declares an op's capabilities (see :class:`OpSpec`) and registers it for dispatch and the report."""
    if kernel not in ("triton", "extension", "torch"):
        raise ValueError(f"declare_op({name!r}): kernel must be 'triton', 'extension' or 'torch'; got {kernel!r}")
    if cpu_impl is not None and (cpu_impl != "torch" or kernel != "triton" or cpu_kernel is not None):
        raise ValueError(f"declare_op({name!r}): cpu_impl must be 'torch', on a Triton op without a cpu_kernel; "
                         f"got cpu_impl={cpu_impl!r} with kernel={kernel!r}, cpu_kernel={cpu_kernel!r}")
    spec = OpSpec(name, kernel, cpu_kernel, cpu_impl, MappingProxyType(dict(dtypes or _DEFAULT_DTYPES)),
                  MappingProxyType(dict(limits or {})), MappingProxyType(dict(supports or {})))
    OPS[name] = spec
    return spec


@torch.compiler.assume_constant_result
def _resolve(op: str, mode: str, device_type: str) -> tuple[str, str | None, str | None]:
    """(implementation, None, None), or ("", why, short) when none can run: a function of the
    backend mode, the device and what is installed, so that torch.compile may take it as a
    constant of the trace (it cannot trace the import and dispatcher queries inside)."""
    spec = OPS[op]
    if mode == "reference":
        return "reference", None, None
    if spec.kernel == "torch":
        return "torch", None, None
    on_cpu = device_type == "cpu"
    if spec.kernel == "extension":
        if on_cpu and spec.cpu_kernel is None:
            return "reference", None, None
        why = _extension.missing_kernel(op, spec.cpu_kernel if on_cpu else op, device_type)
        return ("extension", None, None) if why is None else ("", *why)
    if mode == "auto" and on_cpu:
        if spec.cpu_impl is not None:
            return spec.cpu_impl, None, None
        has_cpu_kernel = spec.cpu_kernel is not None and _extension.has_kernel(spec.cpu_kernel, "CPU")
        return ("extension" if has_cpu_kernel else "reference"), None, None
    reason = triton_import_error()
    if reason is not None:
        return "", f"astrea.ops.{op} on {device_type} needs Triton: {reason}", "triton missing"
    if on_cpu and not triton_interpreter_enabled():
        return ("", f"astrea.ops.{op}: the Triton backend runs on CPU tensors only under the Triton "
                    "interpreter; set TRITON_INTERPRET=1 before triton is imported, or use a CUDA tensor",
                "needs TRITON_INTERPRET=1")
    if device_type not in ("cpu", "cuda"):
        return "", f"astrea.ops.{op}: no Triton kernel for {device_type} tensors", f"no {device_type} kernel"
    return "triton", None, None


@dataclasses.dataclass(frozen=True)
class Implementations:
    """The implementations of one computation of an op, called by the name that
    :meth:`OpSpec.choose` gave at the forward call (the registered ops take it as their
    ``impl`` argument, and backward ops get the forward's). ``extension`` names the ``_C``
    op (``torch.ops.astrea.<extension>``), is a function calling it, or is None where
    ``_C`` has none."""

    op: str
    triton: Callable | None
    reference: Callable
    extension: str | Callable | None = None
    torch: Callable | None = None

    def __call__(self, impl: str, *args):
        if impl == "extension" and isinstance(self.extension, str):
            return getattr(torch.ops.astrea, self.extension)(*args)
        if impl == "extension" and self.extension is not None:
            return self.extension(*args)
        if impl in ("triton", "torch") and getattr(self, impl) is not None or impl == "reference":
            return getattr(self, impl)(*args)
        offered = [name for name in IMPLEMENTATIONS if name == "reference" or getattr(self, name) is not None]
        raise ValueError(f"astrea::{self.op}: impl must be one of {', '.join(offered)}; got {impl!r}")
