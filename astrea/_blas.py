"""Matrix products on CPU tensors whose sums do not depend on the thread count.

torch's CPU BLAS (MKL in the x86-64 wheels) splits a long reduction — the K of an
``[M, K] @ [K, N]`` product with a small ``M x N`` output, as in a gradient that sums over
tokens or queue keys — over its threads, so the last bits of the result change with
``torch.get_num_threads()``. Inside :func:`single_thread_blas` the calling thread's MKL
runs on one thread (``MKL_Set_Num_Threads_Local``), so such a product sums in one order on
any thread count. Where torch's BLAS is not MKL the block changes nothing and
:func:`fixed_order_available` is False. The C++ kernels use the same switch
(``csrc/cpu/blas.h``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from typing import Iterator

import torch


@functools.lru_cache(maxsize=None)
def _set_local_threads():
    """MKL's ``MKL_Set_Num_Threads_Local`` from the libtorch_cpu torch loaded, or None."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        function = ctypes.CDLL(path).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
    return function


def fixed_order_available() -> bool:
    """Whether :func:`single_thread_blas` really fixes the order (torch's BLAS is MKL)."""
    return _set_local_threads() is not None


@contextlib.contextmanager
def single_thread_blas() -> Iterator[None]:
    """BLAS calls of this thread inside the block run on one thread (see the module docstring)."""
    set_local = _set_local_threads()
    if set_local is None:
        yield
        return
    previous = set_local(1)  # 0: the thread followed the global setting
    try:
        yield
    finally:
        set_local(previous)
