"""Runs every astrea._C CUDA kernel once at small, odd sizes, for compute-sanitizer:

    compute-sanitizer --tool memcheck  --error-exitcode 1 python scripts/cuda_sanitizer_check.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python scripts/cuda_sanitizer_check.py

Inputs are made on the CPU and copied over, so the only device kernels are astrea's (and
torch's reductions of the results). Sizes cross the tile boundaries of csrc/cuda/moco_tiles.h
(fragments of 16, tiles of 32 / 64 / 128 rows and keys, 64-feature stages) without being
multiples of them. Exits non-zero when a result is not finite. ``--device cpu`` runs the
same calls on the CPU kernels (the test suite does, so the script cannot rot unseen)."""

from __future__ import annotations

import argparse
import sys

import torch

import astrea.ops as ops

# (N, K, D): rows, queue keys, features.
SHAPES = ((1, 1, 8), (33, 130, 72), (130, 257, 130))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> None:
    n, k, d = shape
    generator = torch.Generator().manual_seed(n * k + d)

    def unit_rows(rows: int) -> torch.Tensor:
        x = torch.randn(rows, d, generator=generator)
        return (x / x.norm(dim=1, keepdim=True)).to(dtype).to(device)

    q, key, queue = unit_rows(n).requires_grad_(), unit_rows(n), unit_rows(k)
    logits = ops.moco_logits(q, key, queue, 0.1)
    loss = ops.moco_infonce(q, key, queue, 0.1)
    (logits.float().mean() + loss).backward()
    ptr = torch.zeros(1, dtype=torch.int64).to(device)
    ops.queue_enqueue_(queue.detach(), ptr, unit_rows(min(n, k)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    finite = bool(torch.isfinite(logits).all() and torch.isfinite(loss) and torch.isfinite(q.grad).all())
    print(f"{dtype} N={n} K={k} D={d}: {'ok' if finite else 'NOT FINITE'}", flush=True)
    if not finite:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_sanitizer_check: no CUDA device")
    for dtype in DTYPES:
        for shape in SHAPES:
            check(shape, dtype, device)


if __name__ == "__main__":
    main()
