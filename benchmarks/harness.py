"""Shared benchmark machinery: providers, device ceilings, timing and the numbers every
result records in ``extra_info``.

An op benchmark parametrises over :data:`PROVIDERS` and calls :func:`run` with a
function per provider, a factory of fresh random inputs, and the bytes and FLOPs the op
must move and do. :func:`run` warms up outside the timing, synchronises the device
inside every timed call, rotates among several input sets when one set would sit in
cache, and records device, versions, shapes, achieved GB/s and TFLOP/s against the
device's measured bandwidth and matmul peak, and peak memory.
"""

from __future__ import annotations

import functools
import itertools
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import torch

from astrea.testing import peak_cpu_memory_bytes

PROVIDERS = ("astrea", "eager", "compile")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# Input sets are rotated until together they exceed this many bytes (a generous L2).
CACHE_BYTES = 128 * 2**20 if ON_GPU else 64 * 2**20
MAX_INPUT_SETS = 8


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def environment() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.processor() or platform.machine()}, "
                                                           f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def measured_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (bytes read + bytes written)."""
    numel = (1 << 28) if ON_GPU else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), repeats=20 if ON_GPU else 5)
    return 2 * src.numel() * src.element_size() / seconds


@functools.lru_cache(maxsize=None)
def measured_matmul_flops() -> float:
    """FLOP/s of a large matmul: bf16 on the GPU (tensor cores), fp32 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if ON_GPU else (1024, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    seconds = _median_seconds(lambda: a @ b, repeats=20 if ON_GPU else 5)
    return 2 * n**3 / seconds


def peak_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before it."""
    sync()
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    return peak_cpu_memory_bytes(fn)


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of ``fn``, one compiled object per function."""
    return torch.compile(fn)


def provider_fn(provider: str, astrea_fn: Callable, eager_fn: Callable) -> Callable:
    """The function a provider times: astrea's op, the eager PyTorch composite, or its compile."""
    return {"astrea": astrea_fn, "eager": eager_fn, "compile": compiled(eager_fn)}[provider]


def _input_bytes(args: Sequence[Any]) -> int:
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def run(
    benchmark,
    fn: Callable[..., Any],
    make_inputs: Callable[[], Sequence[Any]],
    *,
    bytes_moved: int,
    flops: int = 0,
    info: dict[str, Any],
) -> None:
    """Times ``fn(*make_inputs())`` and records the result's figures in ``benchmark.extra_info``.

    ``bytes_moved``: the fewest bytes the op must move (each input read once, each output
    written once). ``flops``: its floating-point operations (0 for pure data movement).
    ``info``: the shape, dtype and provider labels of this case.
    """
    first = make_inputs()
    per_set = max(1, _input_bytes(first))
    n_sets = min(MAX_INPUT_SETS, max(1, -(-CACHE_BYTES // per_set)))
    sets = [first] + [make_inputs() for _ in range(n_sets - 1)]
    # Warm-up, compilation and autotuning stay out of the timing: on the GPU each set once (a
    # kernel may autotune on its first launch for a layout); the CPU compiles for the shapes,
    # which all sets share, so one call does.
    for args in sets if ON_GPU else sets[:1]:
        fn(*args)
    sync()
    peak = peak_memory_bytes(lambda: fn(*sets[0]))
    cycle = itertools.cycle(sets)

    def timed_call():
        out = fn(*next(cycle))
        sync()
        return out

    benchmark(timed_call)

    extra = benchmark.extra_info
    extra.update(environment())
    extra.update(info)
    extra.update(bytes_moved=bytes_moved, flops=flops, peak_memory_bytes=peak, input_sets=n_sets)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    if ON_GPU:
        # Device time from CUDA events over many back-to-back launches (L2 flushed between
        # them): the host-side launch and sync cost in pytest-benchmark's figure would
        # dominate small kernels.
        from triton.testing import do_bench

        seconds = do_bench(lambda: fn(*next(cycle)), return_mode="median") * 1e-3
        extra.update(timing="triton.testing.do_bench median (CUDA events)", host_median_s=stats.stats.median)
    else:
        seconds = stats.stats.median
        extra.update(timing="pytest-benchmark median (perf_counter)")
    bandwidth = measured_bandwidth()
    extra.update(
        median_s=seconds,
        gbps=bytes_moved / seconds / 1e9,
        pct_bandwidth=100 * bytes_moved / seconds / bandwidth,
        measured_bandwidth_gbps=bandwidth / 1e9,
    )
    if flops:
        peak_flops = measured_matmul_flops()
        extra.update(tflops=flops / seconds / 1e12, pct_matmul_peak=100 * flops / seconds / peak_flops,
                     measured_matmul_tflops=peak_flops / 1e12)
