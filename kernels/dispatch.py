"""Token dispatch for MoE: a stable counting sort of the (token, slot) rows by expert, and
the permute that gathers token features into that expert-contiguous layout.

Rows are the flattened routing slots ``r = t * k + j`` of ``indices[N, k]``. The sort is
histogram -> exclusive scan -> scatter, without ``torch.sort`` and without atomics:

1. ``_dispatch_histogram_kernel``: each program counts its block of rows per bucket.
2. ``_dispatch_scan_kernel`` (one program): expert offsets from the bucket totals, and
   for every (block, bucket) the first output row of that block's rows of that bucket.
3. ``_dispatch_scatter_kernel``: each program sorts its block by (bucket, row) in
   registers; a row's output position is its (block, bucket) start plus its rank in the
   block's run of that bucket. Rows keep their order inside an expert, so the result is
   deterministic and tokens ascend inside each expert.

Out-of-range experts (negative or >= E) are never used as an address: such rows go to an
extra last bucket E, placed after ``expert_offsets[E]``, which therefore falls short of
``N * k`` (the flag callers can read; no expert processes those rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows per program of the histogram and scatter kernels (the scatter sorts a block in registers).
DISPATCH_BLOCK = 1024
# On CPU tensors (the Triton interpreter) a sort costs time per element and stage: smaller blocks.
INTERPRETER_DISPATCH_BLOCK = 128
# Tile of the single-program scan over the [num_blocks, E + 1] counts.
SCAN_BLOCK_B = 32
SCAN_BLOCK_E = 64
# Buckets counted per pass of the histogram kernel.
HISTOGRAM_BINS = 1024
# Tokens x features per program of the permute.
PERMUTE_BLOCK_T = 8
PERMUTE_BLOCK_D = 256


@triton.jit
def _bucket_of(indices_ptr, rows, in_range, num_experts):
    """Expert of each row, or num_experts for an out-of-range expert."""
    expert = tl.load(indices_ptr + rows, mask=in_range, other=0)
    return tl.where((expert >= 0) & (expert < num_experts), expert, num_experts)


@triton.jit
def _dispatch_histogram_kernel(indices_ptr, counts_ptr, num_rows, num_experts,
                               BLOCK: tl.constexpr, BINS: tl.constexpr):
    block = tl.program_id(0)
    rows = block * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < num_rows
    bucket = _bucket_of(indices_ptr, rows, in_range, num_experts)
    # BINS buckets at a time: a histogram of every bucket at once (E + 1 up to 8193 bins)
    # would hold more counts per thread than registers do and spill to the stack.
    for first in range(0, num_experts + 1, BINS):
        bins = first + tl.arange(0, BINS)
        in_chunk = in_range & (bucket >= first) & (bucket < first + BINS)
        counts = tl.histogram(bucket - first, BINS, mask=in_chunk)
        tl.store(counts_ptr + block * (num_experts + 1) + bins, counts, mask=bins <= num_experts)


# num_blocks unspecialised: its divisibility-16 variant spills on sm_80, and the value
# varies with N, so specialising would only multiply compiles.
@triton.jit(do_not_specialize=["num_blocks"])
def _dispatch_scan_kernel(counts_ptr, block_starts_ptr, offsets_ptr, num_blocks, num_buckets,
                          BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    # Pass 1: bucket totals -> exclusive scan over buckets = expert offsets (int64).
    carry = tl.zeros((), dtype=tl.int64)
    for e0 in range(0, num_buckets, BLOCK_E):
        buckets = e0 + tl.arange(0, BLOCK_E)
        totals = tl.zeros((BLOCK_E,), dtype=tl.int64)
        for b0 in range(0, num_blocks, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)
            mask = (blocks[:, None] < num_blocks) & (buckets[None, :] < num_buckets)
            tile = tl.load(counts_ptr + blocks[:, None] * num_buckets + buckets[None, :], mask=mask, other=0)
            totals += tl.sum(tile.to(tl.int64), axis=0)
        tl.store(offsets_ptr + buckets, carry + tl.cumsum(totals, axis=0) - totals, mask=buckets < num_buckets)
        carry += tl.sum(totals, axis=0)
    # Pass 2: start of (block, bucket) = expert offset + rows of that bucket in earlier blocks.
    for e0 in range(0, num_buckets, BLOCK_E):
        buckets = e0 + tl.arange(0, BLOCK_E)
        running = tl.load(offsets_ptr + buckets, mask=buckets < num_buckets, other=0)
        for b0 in range(0, num_blocks, BLOCK_B):
            blocks = b0 + tl.arange(0, BLOCK_B)
            mask = (blocks[:, None] < num_blocks) & (buckets[None, :] < num_buckets)
            where = blocks[:, None] * num_buckets + buckets[None, :]
            tile = tl.load(counts_ptr + where, mask=mask, other=0).to(tl.int64)
            starts = running[None, :] + tl.cumsum(tile, axis=0) - tile
            tl.store(block_starts_ptr + where, starts.to(tl.int32), mask=mask)
            running += tl.sum(tile, axis=0)


@triton.jit
def _same_run_start(bucket_a, start_a, bucket_b, start_b):
    """Combine of the scan that finds where each run of equal buckets starts (buckets sorted)."""
    return bucket_b, tl.where(bucket_a == bucket_b, start_a, start_b)


@triton.jit
def _dispatch_scatter_kernel(indices_ptr, block_starts_ptr, sorted_token_ids_ptr, inverse_positions_ptr,
                             num_rows, num_experts, top_k, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    rows = block * BLOCK + lanes
    in_range = rows < num_rows
    bucket = _bucket_of(indices_ptr, rows, in_range, num_experts)
    bucket = tl.where(in_range, bucket, num_experts + 1)  # past-the-end lanes sort last
    # Unique keys: sorting them orders the block by bucket, then by row (stable).
    keys = tl.sort(bucket * BLOCK + lanes)
    sorted_bucket = keys // BLOCK
    sorted_rows = block * BLOCK + keys % BLOCK
    _, run_start = tl.associative_scan((sorted_bucket, lanes), 0, _same_run_start)
    valid = sorted_bucket <= num_experts
    start = tl.load(block_starts_ptr + block * (num_experts + 1) + sorted_bucket, mask=valid, other=0)
    position = start + lanes - run_start
    tl.store(inverse_positions_ptr + sorted_rows, position, mask=valid)
    tl.store(sorted_token_ids_ptr + position, sorted_rows // top_k, mask=valid)


@triton.jit
def _permute_kernel(x_ptr, inverse_positions_ptr, out_ptr, num_tokens, dim, top_k, stride_xt, stride_xd,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < num_tokens
    mask = token_ok[:, None] & (cols[None, :] < dim)
    # Each token row is read once and written to its k slots; int64 row offsets: N*k*D may pass 2^31.
    x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_xt + cols[None, :] * stride_xd, mask=mask)
    for j in range(top_k):
        position = tl.load(inverse_positions_ptr + tokens * top_k + j, mask=token_ok, other=0)
        tl.store(out_ptr + position.to(tl.int64)[:, None] * dim + cols[None, :], x, mask=mask)


def dispatch_forward(indices: torch.Tensor, num_experts: int, interpreter: bool | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable counting sort of ``indices[N, k]`` (int32) by expert: ``sorted_token_ids[N*k]``
    (int32), ``expert_offsets[E+1]`` (int64), ``inverse_positions[N, k]`` (int32).
    ``interpreter`` (default: whether ``indices`` are off CUDA) picks the block size."""
    indices = indices.contiguous()
    num_tokens, top_k = indices.shape
    num_rows = num_tokens * top_k
    device = indices.device
    sorted_token_ids = torch.empty(num_rows, dtype=torch.int32, device=device)
    inverse_positions = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    if num_rows == 0:
        return sorted_token_ids, offsets, inverse_positions
    if interpreter is None:
        interpreter = device.type != "cuda"
    block = INTERPRETER_DISPATCH_BLOCK if interpreter else DISPATCH_BLOCK
    num_blocks = triton.cdiv(num_rows, block)
    num_buckets = num_experts + 1
    counts = torch.empty(num_blocks, num_buckets, dtype=torch.int32, device=device)
    block_starts = torch.empty_like(counts)
    _dispatch_histogram_kernel[(num_blocks,)](indices, counts, num_rows, num_experts, BLOCK=block,
                                              BINS=min(triton.next_power_of_2(num_buckets), HISTOGRAM_BINS))
    _dispatch_scan_kernel[(1,)](counts, block_starts, offsets, num_blocks, num_buckets,
                                BLOCK_B=SCAN_BLOCK_B, BLOCK_E=SCAN_BLOCK_E)
    _dispatch_scatter_kernel[(num_blocks,)](indices, block_starts, sorted_token_ids, inverse_positions,
                                            num_rows, num_experts, top_k, BLOCK=block)
    # offsets[E], the start of the out-of-range bucket, is the end of the last expert.
    return sorted_token_ids, offsets, inverse_positions


def permute_forward(x: torch.Tensor, inverse_positions: torch.Tensor) -> torch.Tensor:
    """``out[inverse_positions[t, j]] = x[t]``: the rows of ``x[N, D]`` in expert order."""
    inverse_positions = inverse_positions.contiguous()
    num_tokens, top_k = inverse_positions.shape
    dim = x.shape[1]
    out = torch.empty(num_tokens * top_k, dim, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(num_tokens, PERMUTE_BLOCK_T), triton.cdiv(dim, PERMUTE_BLOCK_D))
    _permute_kernel[grid](x, inverse_positions, out, num_tokens, dim, top_k, x.stride(0), x.stride(1),
                          BLOCK_T=PERMUTE_BLOCK_T, BLOCK_D=PERMUTE_BLOCK_D)
    return out


def permute_backward(grad_out: torch.Tensor, inverse_positions: torch.Tensor) -> torch.Tensor:
    """``grad_x[t] = sum_j grad_out[inverse_positions[t, j]]``: each token row summed by one program."""
    from astrea.kernels.combine import combine_forward

    return combine_forward(grad_out, inverse_positions)


# Routing slots of the example launches: 4096 tokens, top-8.
_AOT_TOKENS, _AOT_TOP_K = 4096, 8


def _example_indices() -> torch.Tensor:
    return torch.empty(_AOT_TOKENS, _AOT_TOP_K, dtype=torch.int32)


AOT_CASES = {
    "dispatch.forward_e64": lambda: dispatch_forward(_example_indices(), 64, interpreter=False),
    "dispatch.forward_e8192": lambda: dispatch_forward(_example_indices(), 8192, interpreter=False),
    "dispatch.permute_fp32": lambda: permute_forward(torch.empty(_AOT_TOKENS, 4096), _example_indices()),
    "dispatch.permute_bf16":
        lambda: permute_forward(torch.empty(_AOT_TOKENS, 4096, dtype=torch.bfloat16), _example_indices()),
}
