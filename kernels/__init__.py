"""Triton kernels of astrea, installed as ``astrea.kernels`` (never a top-level ``kernels``
module, a name another PyPI package owns). Kernels only: ``@triton.jit`` functions and
their launch configuration; validation, autograd and dispatch live in :mod:`astrea.ops`.

Each kernel module lists example launches of its launchers in ``AOT_CASES``, from which
the test suite derives and compiles every kernel for sm_80 and sm_90 without a GPU (see
:mod:`astrea.kernels.aot`).
"""
