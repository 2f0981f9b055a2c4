"""Loading of the compiled extension ``astrea._C``; ``import astrea`` never needs it."""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import torch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the astrea source tree"


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None once ``astrea._C`` is loaded (its ops registered), else why it could not be."""
    try:
        importlib.import_module("astrea._C")
    except Exception as exc:  # ImportError, or OSError for an ABI mismatch with the torch in use
        return f"{type(exc).__name__}: {exc}"
    return None


def available() -> bool:
    return load_error() is None


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``_C`` registered a kernel for ``astrea::op`` under ``dispatch_key`` (CPU, CUDA);
    False too when no library defines the op (a ``_C`` built before it existed). Cached: the
    registrations are fixed once ``_C`` has loaded, and the backend asks on every op call."""
    if not available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"astrea::{op}", dispatch_key)
    except RuntimeError:  # the operator does not exist
        return False


def register_fake(op: str, fake) -> None:
    """Registers the fake (meta) function of the ``_C`` op ``astrea::op`` when the loaded ``_C``
    defines it, so that torch.compile and opcheck can trace direct calls of it."""
    if has_kernel(op, "CPU"):
        torch.library.register_fake(f"astrea::{op}", fake)


def missing_kernel(op: str, extension_op: str, device_type: str) -> tuple[str, str] | None:
    """None when ``_C`` runs ``astrea::extension_op`` (the kernel of ``astrea.ops.op``) on
    ``device_type`` tensors, else (what is missing and how to get it, a few words)."""
    reason = load_error()
    if reason is not None:
        return (f"astrea.ops.{op} needs the compiled extension astrea._C, which did not load ({reason}); {BUILD_HINT}",
                "astrea._C not loaded")
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None or not has_kernel(extension_op, key):
        why = build_info().get("cuda_reason", "unknown") if key == "CUDA" else "no kernel for this device"
        return (f"astrea.ops.{op}: astrea._C has no {device_type} kernel ({why}); "
                f"for CUDA, rebuild with `FORCE_CUDA=1 pip install --no-build-isolation -e .`",
                f"astrea._C has no {device_type} kernel")
    return None


def build_info() -> dict:
    """What setup.py recorded when it built ``_C`` (torch version, CUDA, arch list)."""
    path = Path(__file__).with_name("_build_info.json")
    if not path.exists():
        return {}
    return json.loads(path.read_text())
