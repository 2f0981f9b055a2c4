"""Expert parallelism: tokens per second of an :class:`~astrea.distributed.ExpertParallelMoE` on
2 ranks (each holding half the experts, token rows exchanged by ``all_to_all_single``) against one
process holding every expert (:class:`~astrea.nn.SparseMoE` on :class:`~astrea.nn.GroupedExperts`)
over the same global batch, forward and forward+backward, with the bytes exchanged per token.

Provider ``astrea`` is the single process with all the machine's threads, ``astrea_1_thread`` the
same with one thread (on a busy machine torch's threads wait for each other: the two can differ
by more than the thread count suggests); ``expert_parallel_2`` is
2 gloo ranks of one thread each on the CPU, nccl ranks on 2 GPUs: this process is rank 0 and times
the step, a spawned process is rank 1 and runs the same steps in lockstep (a 1-element broadcast
before each round, outside the timing, tells it to go on). Each step's time on rank 0 includes
waiting for rank 1 at the exchanges, so it is the step time of the pair. ``extra_info`` records
``tokens_per_s`` (global tokens / median step) and ``exchanged_bytes_per_token``: the bytes
rank 0 sent to the other rank, rows there and back in the forward, and again in the backward, plus
the row counts, per token of rank 0.
"""

from __future__ import annotations

import socket
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.harness import DEVICE, ON_GPU, environment, sync
from astrea.distributed import ExpertParallelMoE
from astrea.nn import GroupedExperts, SparseMoE, TopKRouter

if ON_GPU:
    CASES = [dict(tokens=8192, hidden=2048, intermediate=768, experts=128, top_k=8, dtype=torch.bfloat16)]
else:
    CASES = [dict(tokens=1024, hidden=512, intermediate=1024, experts=8, top_k=2, dtype=torch.float32),
             dict(tokens=1024, hidden=512, intermediate=256, experts=64, top_k=8, dtype=torch.float32)]
MODES = ("forward", "forward_backward")
PROVIDERS = ("astrea", "astrea_1_thread", "expert_parallel_2")
EP_SIZE = 2
ROUNDS, WARMUP_ROUNDS = (20, 3) if ON_GPU else (8, 2)
RANK_TIMEOUT_S = 300.0


def case_id(case: dict) -> str:
    return (f"N{case['tokens']}-H{case['hidden']}-I{case['intermediate']}-E{case['experts']}-k{case['top_k']}-"
            f"{str(case['dtype'])[6:]}")


def _moe(case: dict, device: torch.device) -> SparseMoE:
    """The unsharded layer, identical in every process (seed 0)."""
    torch.manual_seed(0)
    router = TopKRouter(case["hidden"], case["experts"], case["top_k"])
    experts = GroupedExperts(case["experts"], case["hidden"], case["intermediate"])
    return SparseMoE(experts, router).to(device, case["dtype"])


def _inputs(case: dict, device: torch.device, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch ``[tokens, hidden]`` and its upstream gradient (the same in every process)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case["tokens"], case["hidden"], generator=generator)
    grad = torch.randn(case["tokens"], case["hidden"], generator=generator)
    x = x.to(device, case["dtype"]).requires_grad_(backward)
    return x, grad.to(device, case["dtype"])


def _step_fn(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, backward: bool):
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        if backward:
            torch.autograd.grad(layer(x), [x, *params], grad)
        else:
            with torch.no_grad():
                layer(x)
        sync()

    return step


def _ep_step(case: dict, rank: int, backward: bool) -> tuple:
    """This rank's EP layer and the step on its half of the global batch."""
    device = torch.device("cuda", rank) if ON_GPU else torch.device("cpu")
    layer = ExpertParallelMoE.from_sparse_moe(_moe(case, device), dist.group.WORLD)
    x, grad = (t.tensor_split(EP_SIZE)[rank] for t in _inputs(case, device, backward))
    return layer, _step_fn(layer, x.detach().requires_grad_(backward), grad, backward)


def _go_on(value: int) -> int:
    """Rank 0's ``value`` on both ranks: 1 to run one more step, 0 to stop."""
    flag = torch.tensor([value], device=DEVICE)
    dist.broadcast(flag, src=0)
    return int(flag)


def _one_more_step() -> None:
    _go_on(1)


def _init(rank: int, port: int) -> None:
    if ON_GPU:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("nccl" if ON_GPU else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=EP_SIZE)


def _follower(index: int, port: int, case: dict, backward: bool) -> None:
    """Rank 1 (``index`` 0 of the spawned processes): runs the step each time rank 0 says go on."""
    _init(1, port)
    try:
        _, step = _ep_step(case, 1, backward)
        while _go_on(0):
            step()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _record(benchmark, case: dict, provider: str, mode: str, threads: int, **extra) -> None:
    info = benchmark.extra_info
    info.update(environment())
    info.update(op="expert_parallel_moe", provider=provider, mode=mode, threads_per_process=threads,
                processes=EP_SIZE if provider == "expert_parallel_2" else 1, **case, **extra)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # --benchmark-disable: ran once, nothing timed
        median = statistics.median(stats.stats.data)
        info.update(median_s=median, tokens_per_s=case["tokens"] / median,
                    timing="pytest-benchmark median (perf_counter), device synchronised")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_expert_parallel_moe(benchmark, provider, mode, case):
    backward = mode == "forward_backward"
    threads = torch.get_num_threads()
    if provider != "expert_parallel_2":
        if provider == "astrea_1_thread":
            if ON_GPU:
                pytest.skip("the thread count matters on the CPU only")
            torch.set_num_threads(1)
        try:
            layer = _moe(case, DEVICE)
            step = _step_fn(layer, *_inputs(case, DEVICE, backward), backward)
            benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
            _record(benchmark, case, provider, mode, torch.get_num_threads())
        finally:
            torch.set_num_threads(threads)
        return
    if ON_GPU and torch.cuda.device_count() < EP_SIZE:
        pytest.skip(f"expert parallelism on GPUs needs {EP_SIZE} of them; {torch.cuda.device_count()} here")
    port = _free_port()
    follower = mp.start_processes(_follower, args=(port, case, backward), nprocs=1, join=False,
                                  start_method="spawn")
    try:
        _init(0, port)
        layer, step = _ep_step(case, 0, backward)
        benchmark.pedantic(step, setup=_one_more_step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
        _go_on(0)
        element = torch.finfo(case["dtype"]).bits // 8
        rows_bytes = layer.rows_sent * case["hidden"] * element * 2 * (2 if backward else 1)
        counts_bytes = case["experts"] * 8 * (EP_SIZE - 1) // EP_SIZE  # int64 counts for the other rank
        exchanged = (rows_bytes + counts_bytes) / (case["tokens"] // EP_SIZE)
        _record(benchmark, case, provider, mode, 1 if not ON_GPU else threads, exchanged_bytes_per_token=exchanged,
                rows_sent_per_step=layer.rows_sent)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        if not follower.join(timeout=RANK_TIMEOUT_S):
            for process in follower.processes:
                process.kill()
            pytest.fail(f"rank 1 did not finish within {RANK_TIMEOUT_S} s")
