"""Measurement helpers shared by astrea's tests and benchmarks (and usable by its users)."""

from __future__ import annotations

from typing import Any, Callable


def peak_cpu_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU memory torch allocates while ``fn`` runs, net of what it frees: the
    profiler's raw allocation and free records, replayed in time order. (Its per-op
    ``cpu_memory_usage`` cannot be replayed: an op's figure includes its children's and
    nets the frees inside it at the op's start.)"""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                     if event.name() == "[memory]" and event.device_type() == DeviceType.CPU)
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak
