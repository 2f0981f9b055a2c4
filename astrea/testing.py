"""Measurement helpers shared by astrea's tests and benchmarks (and usable by its users)."""

from __future__ import annotations

from typing import Any, Callable


def peak_cpu_memory_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU memory torch allocates while ``fn`` runs, net of what it frees
    (from ``torch.profiler``'s allocation events, replayed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Self usage: an op's cpu_memory_usage includes its children's allocations.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak
