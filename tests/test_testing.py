"""astrea.testing: the measurement helpers the tests and benchmarks rely on."""

import torch

from astrea.testing import peak_cpu_memory_bytes

MIB = 1 << 20


def test_peak_counts_an_allocation_made_inside_nested_ops_once():
    x = torch.randn(MIB // 4)  # 1 MiB of fp32
    # to -> _to_copy -> empty_strided: three profiler events for one 2 MiB float64 buffer.
    assert peak_cpu_memory_bytes(lambda: x.to(torch.float64)) == 2 * MIB


def test_peak_nets_out_what_is_freed():
    def two_buffers_one_at_a_time():
        first = torch.empty(2 * MIB, dtype=torch.uint8)
        del first
        second = torch.empty(3 * MIB, dtype=torch.uint8)
        del second

    def two_buffers_together():
        first = torch.empty(2 * MIB, dtype=torch.uint8)
        second = torch.empty(3 * MIB, dtype=torch.uint8)
        del first, second

    assert peak_cpu_memory_bytes(two_buffers_one_at_a_time) == 3 * MIB
    assert peak_cpu_memory_bytes(two_buffers_together) == 5 * MIB


def test_peak_replays_frees_made_inside_an_op_at_their_time():
    # The temporaries of an op are freed inside it; the peak is while they are alive.
    x = torch.randn(256, 1024)  # 1 MiB
    peak = peak_cpu_memory_bytes(lambda: torch.nn.functional.cross_entropy(x, torch.zeros(256, dtype=torch.long)))
    assert peak >= MIB  # log_softmax's [256, 1024] output is alive before the reduction frees it
