// Device code of the momentum-queue contrast kernels: the score tiles (FMA and tensor
// cores) and the kernels written once against them. Torch-free. Included by
// moco_kernels.cu, which launches the kernels, and by tests/cpp/moco_kernels_emulated.cpp,
// which defines ASTREA_CUDA_EMULATION and the CUDA builtins these kernels use (threads,
// barriers, shuffles, fp16 / bf16, wmma) on CPU threads, and so runs this very code on the
// host against a float64 reference.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#ifndef ASTREA_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include "cuda/moco_tiles.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the MoCo tensor-core kernels need sm_80 or newer (bf16 wmma)"
#endif

namespace astrea::cuda::detail {

namespace wmma = nvcuda::wmma;

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__host__ __device__ __forceinline__ int64_t min_index(int64_t a, int64_t b) { return a < b ? a : b; }

// --- score tiles ---------------------------------------------------------------------
//
// A tile type computes one kRows x kKeys tile of scores in shared memory and, in backward,
// accumulates the tile's probabilities times the queue rows into the gradient. The kernels
// further down are written once against this interface:
//   Storage                    shared-memory layout (dynamic shared memory, 128-B aligned)
//   kRows, kKeys, kScorePitch  tile shape; Storage::scores is float[kRows][kScorePitch]
//   score(q, row0, n, queue, key0, num_keys, dim, inv_t, s)
//       s.scores[r][c] = (q[row0 + r] . queue[key0 + c]) * inv_t with fp32 accumulation, 0 for
//       rows >= n or keys >= num_keys. Starts by overwriting the staging buffers, has a
//       __syncthreads before it writes s.scores (so callers may read the previous tile's
//       scores until they call it) and ends synchronised.
//   grad_pitch(dim)            floats per row of the fp32 gradient accumulator
//   accumulate(s, queue, key0, count, num_keys, dim, grad, pitch)
//       grad[r][d] += sum_c s.scores[r][c] * queue[key0 + c][d] for the probabilities the
//       kernel left in s.scores (0 for keys >= count). Ends synchronised.

// FMA tiles: fp32 products accumulated in fp32 registers. Serves fp32 inputs, whose
// products must stay fp32 (tensor cores would round them to TF32).
template <typename T, int Rows>
struct FmaTile {
  static constexpr int kRows = Rows;
  static constexpr int kKeys = 64;
  static constexpr int kDepth = 32;  // features per shared-memory stage
  static constexpr int kScorePitch = kKeys + 4;  // row reductions: rows 4 banks apart
  static_assert(kThreads == 256 && Rows % 16 == 0, "16 x 16 threads compute a score tile");

  struct Storage {
    float rows[Rows][kDepth + 1];  // +1: the column reads of the inner loop hit distinct banks
    float keys[kKeys][kDepth + 1];
    float scores[Rows][kScorePitch];
  };

  __host__ __device__ static int64_t grad_pitch(int64_t dim) { return dim; }

  // Each of the 16 x 16 threads accumulates (Rows / 16) x 4 scores in registers while
  // stages of kDepth features go through shared memory.
  __device__ static void score(const T* __restrict__ q, int64_t row0, int64_t n, const T* __restrict__ queue,
                               int64_t key0, int64_t num_keys, int64_t dim, float inv_t, Storage& s) {
    constexpr int kRowsPerThread = Rows / 16;
    constexpr int kKeysPerThread = kKeys / 16;
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    float acc[kRowsPerThread][kKeysPerThread] = {};
    for (int64_t d0 = 0; d0 < dim; d0 += kDepth) {
      for (int e = threadIdx.x; e < Rows * kDepth; e += kThreads) {
        const int64_t row = row0 + e / kDepth;
        const int64_t col = d0 + e % kDepth;
        s.rows[e / kDepth][e % kDepth] = (row < n && col < dim) ? to_float(q[row * dim + col]) : 0.f;
      }
      for (int e = threadIdx.x; e < kKeys * kDepth; e += kThreads) {
        const int64_t key = key0 + e / kDepth;
        const int64_t col = d0 + e % kDepth;
        s.keys[e / kDepth][e % kDepth] = (key < num_keys && col < dim) ? to_float(queue[key * dim + col]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int d = 0; d < kDepth; ++d) {
        float a[kRowsPerThread];
        float b[kKeysPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) a[i] = s.rows[ty + 16 * i][d];
#pragma unroll
        for (int j = 0; j < kKeysPerThread; ++j) b[j] = s.keys[tx + 16 * j][d];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int j = 0; j < kKeysPerThread; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < kKeysPerThread; ++j) s.scores[ty + 16 * i][tx + 16 * j] = acc[i][j] * inv_t;
    }
    __syncthreads();
  }

  // Consecutive threads take consecutive features: the queue reads are coalesced.
  __device__ static void accumulate(Storage& s, const T* __restrict__ queue, int64_t key0, int64_t count,
                                    int64_t /*num_keys*/, int64_t dim, float* grad, int64_t pitch) {
    for (int64_t e = threadIdx.x; e < Rows * dim; e += kThreads) {
      const int64_t r = e / dim;
      const int64_t d = e % dim;
      float acc = grad[r * pitch + d];
      for (int64_t c = 0; c < count; ++c) acc += s.scores[r][c] * to_float(queue[(key0 + c) * dim + d]);
      grad[r * pitch + d] = acc;
    }
    __syncthreads();
  }
};

// Tensor-core tiles for fp16 / bf16 inputs: wmma 16 x 16 x 16 fragments with fp32
// accumulators, on the shared-memory layout of moco_tiles.h. kWithGradient: the backward
// tile, which also accumulates the gradient (and keeps the probabilities for it).
template <typename T, typename Layout, bool kWithGradient>
struct TensorCoreTile : Layout {
  using Layout::kDepth;
  using Layout::kGradFrags;
  using Layout::kKeys;
  using Layout::kProbPitch;
  using Layout::kRows;
  using Layout::kScorePitch;
  using Layout::kStagePitch;
  using Layout::kVector;

  using RowsFragment = wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, T, wmma::row_major>;
  using KeysTransposedFragment = wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, wmma::col_major>;
  using KeysFragment = wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, wmma::row_major>;
  using Accumulator = wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float>;

  struct StagedRows {
    alignas(32) T rows[kRows][kStagePitch];
  };
  // With a gradient, the probabilities replace the staged rows once a tile's scores are done.
  union StagedRowsOrProbabilities {
    alignas(32) T rows[kRows][kStagePitch];
    alignas(32) T probs[kRows][kProbPitch];
  };
  struct Storage {
    std::conditional_t<kWithGradient, StagedRowsOrProbabilities, StagedRows> stage;
    alignas(32) T keys[kKeys][kStagePitch];
    alignas(32) float scores[kRows][kScorePitch];
  };

  // dst[r][c] = src[first + r][d0 + c] for r < Count, c < kDepth; 0 past row `limit` or
  // feature `dim`, so that padded rows and features add nothing to the products.
  template <int Count>
  __device__ static void load_stage(const T* __restrict__ src, int64_t first, int64_t limit, int64_t d0,
                                    int64_t dim, T (*dst)[kStagePitch]) {
    // 16-byte loads when every row starts 16-byte aligned; a vector then lies wholly
    // inside or wholly past the row (d0 and the vector offset are multiples of kVector).
    const bool vector = dim % kVector == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
    for (int g = threadIdx.x; g < Count * Layout::kStageGroups; g += kThreads) {
      const int r = Layout::stage_row(g);
      const int c = Layout::stage_col(g);
      const int64_t row = first + r;
      const int64_t col = d0 + c;
      T* out = &dst[r][c];
      if (vector) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row < limit && col < dim) v = *reinterpret_cast<const uint4*>(src + row * dim + col);
        *reinterpret_cast<uint4*>(out) = v;
      } else {
#pragma unroll
        for (int i = 0; i < kVector; ++i) {
          out[i] = (row < limit && col + i < dim) ? src[row * dim + col + i] : from_float<T>(0.f);
        }
      }
    }
  }

  __device__ static void score(const T* __restrict__ q, int64_t row0, int64_t n, const T* __restrict__ queue,
                               int64_t key0, int64_t num_keys, int64_t dim, float inv_t, Storage& s) {
    const int warp = threadIdx.x / 32;
    Accumulator acc[Layout::kFragRows][Layout::kFragCols];
#pragma unroll
    for (int i = 0; i < Layout::kFragRows; ++i) {
#pragma unroll
      for (int j = 0; j < Layout::kFragCols; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    }
    for (int64_t d0 = 0; d0 < dim; d0 += kDepth) {
      load_stage<kRows>(q, row0, n, d0, dim, s.stage.rows);
      load_stage<kKeys>(queue, key0, num_keys, d0, dim, s.keys);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kDepth; k += kFragment) {
        if (d0 + k >= dim) break;  // the rest of the stage is zero padding
        KeysTransposedFragment keys[Layout::kFragCols];
#pragma unroll
        for (int j = 0; j < Layout::kFragCols; ++j) {
          wmma::load_matrix_sync(keys[j], &s.keys[Layout::score_key(warp, j)][k], kStagePitch);
        }
#pragma unroll
        for (int i = 0; i < Layout::kFragRows; ++i) {
          RowsFragment rows;
          wmma::load_matrix_sync(rows, &s.stage.rows[Layout::score_row(warp, i)][k], kStagePitch);
#pragma unroll
          for (int j = 0; j < Layout::kFragCols; ++j) wmma::mma_sync(acc[i][j], rows, keys[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < Layout::kFragRows; ++i) {
#pragma unroll
      for (int j = 0; j < Layout::kFragCols; ++j) {
        // An elementwise scale is independent of the (unspecified) fragment layout.
#pragma unroll
        for (int e = 0; e < acc[i][j].num_elements; ++e) acc[i][j].x[e] *= inv_t;
        wmma::store_matrix_sync(&s.scores[Layout::score_row(warp, i)][Layout::score_key(warp, j)], acc[i][j],
                                kScorePitch, wmma::mem_row_major);
      }
    }
    __syncthreads();
  }

  // The probabilities are rounded to T for the second product (relative error <= 2^-9 in
  // bf16, 2^-12 in fp16, below 6e-5 fp16 is subnormal); the products and their sums are
  // fp32. They lie in [0, 1]: the row's gradient coefficient is applied afterwards in fp32.
  __device__ static void accumulate(Storage& s, const T* __restrict__ queue, int64_t key0, int64_t count,
                                    int64_t num_keys, int64_t dim, float* grad, int64_t pitch) {
    for (int e = threadIdx.x; e < kRows * kKeys; e += kThreads) {
      s.stage.probs[e / kKeys][e % kKeys] = from_float<T>(s.scores[e / kKeys][e % kKeys]);
    }
    const int warp = threadIdx.x / 32;
    for (int64_t d0 = 0; d0 < dim; d0 += kDepth) {
      load_stage<kKeys>(queue, key0, num_keys, d0, dim, s.keys);
      __syncthreads();  // also publishes probs (first stage)
      for (int f = warp; f < kGradFrags; f += kWarps) {
        const int64_t col = d0 + Layout::grad_col(f);
        if (col >= dim) continue;  // a fragment wholly in the padding
        float* out = grad + Layout::grad_row(f) * pitch + col;
        Accumulator acc;
        wmma::load_matrix_sync(acc, out, static_cast<unsigned>(pitch), wmma::mem_row_major);
#pragma unroll
        for (int c = 0; c < kKeys; c += kFragment) {
          if (c >= count) break;  // probabilities past the last key are zero
          RowsFragment probs;
          KeysFragment keys;
          wmma::load_matrix_sync(probs, &s.stage.probs[Layout::grad_row(f)][c], kProbPitch);
          wmma::load_matrix_sync(keys, &s.keys[c][Layout::grad_col(f)], kStagePitch);
          wmma::mma_sync(acc, probs, keys, acc);
        }
        wmma::store_matrix_sync(out, acc, static_cast<unsigned>(pitch), wmma::mem_row_major);
      }
      __syncthreads();
    }
  }
};

// The tiles of each element type: fp32 keeps FMA tiles (no silent TF32), fp16 and bf16
// use tensor cores.
struct FmaFamily {
  template <typename T>
  using Forward = FmaTile<T, 64>;
  template <typename T>
  using Backward = FmaTile<T, 32>;  // short: its accumulator is rows x D fp32 in shared memory
};
struct TensorCoreFamily {
  template <typename T>
  using Forward = TensorCoreTile<T, ForwardTensorCoreLayout, false>;
  template <typename T>
  using Backward = TensorCoreTile<T, BackwardTensorCoreLayout, true>;
};

// Every tile kernel keeps its Storage at the start of dynamic shared memory (the
// tensor-core tiles pass the 48 KiB static limit), the gradient accumulator after it.
template <typename Storage>
__host__ __device__ constexpr size_t storage_bytes() {
  return (sizeof(Storage) + 127) / 128 * 128;
}

__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(128) unsigned char shared_memory[];
  return shared_memory;
}

// Dot product of two dim-vectors by one warp; every lane gets the result.
template <typename T>
__device__ float warp_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t dim) {
  float sum = 0.f;
  for (int64_t d = threadIdx.x % 32; d < dim; d += 32) sum += to_float(a[d]) * to_float(b[d]);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  return sum;
}

// One block per (block of q rows, queue tile), block index = row block * tiles + tile.
template <typename Tile, typename T>
__global__ void __launch_bounds__(kThreads, 2)
    logits_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ queue, int64_t n,
                  int64_t num_keys, int64_t dim, float inv_t, int64_t tiles, float* __restrict__ logits) {
  auto& s = *reinterpret_cast<typename Tile::Storage*>(dynamic_shared_memory());
  const int64_t block = blockIdx.x;
  const int64_t tile = block % tiles;
  const int64_t row0 = block / tiles * Tile::kRows;
  const int64_t key0 = tile * Tile::kKeys;
  const int64_t stride = num_keys + 1;
  Tile::score(q, row0, n, queue, key0, num_keys, dim, inv_t, s);
  for (int e = threadIdx.x; e < Tile::kRows * Tile::kKeys; e += kThreads) {
    const int64_t row = row0 + e / Tile::kKeys;
    const int64_t key = key0 + e % Tile::kKeys;
    if (row < n && key < num_keys) logits[row * stride + 1 + key] = s.scores[e / Tile::kKeys][e % Tile::kKeys];
  }
  // The blocks of the first key tile also write the positive column, one warp per row.
  if (tile == 0) {
    for (int r = threadIdx.x / 32; r < Tile::kRows; r += kWarps) {
      const int64_t row = row0 + r;
      if (row >= n) break;
      const float dot = warp_dot(q + row * dim, k + row * dim, dim);
      if (threadIdx.x % 32 == 0) logits[row * stride] = dot * inv_t;
    }
  }
}

// How the n x num_keys work is cut: blocks of q rows crossed with `splits` ranges of
// queue tiles, so that small batches still fill the GPU (about 2 blocks per SM); every
// split is non-empty. Block index = row block * splits + split.
struct Plan {
  int64_t row_blocks, tiles, splits, tiles_per_split;
  __host__ __device__ int64_t blocks() const { return row_blocks * splits; }
};

inline Plan plan_for(int64_t n, int64_t num_keys, int rows_per_block, int keys_per_tile, int sms) {
  Plan p;
  p.row_blocks = (n + rows_per_block - 1) / rows_per_block;
  p.tiles = (num_keys + keys_per_tile - 1) / keys_per_tile;
  const int64_t wanted_blocks = 2 * static_cast<int64_t>(sms);
  p.splits = std::clamp<int64_t>((wanted_blocks + p.row_blocks - 1) / p.row_blocks, 1, p.tiles);
  p.tiles_per_split = (p.tiles + p.splits - 1) / p.splits;
  p.splits = (p.tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

template <typename Tile>
Plan plan_for(int64_t n, int64_t num_keys, int sms) {
  return plan_for(n, num_keys, Tile::kRows, Tile::kKeys, sms);
}

// Running (max, sum of exp) of each row over one split's queue tiles: kThreads / kRows
// consecutive threads per row, each scanning every (kThreads / kRows)-th key of the tile
// (interleaved: with the padded score pitch, a warp's reads spread over the banks),
// combined by shuffles.
template <typename Tile, typename T>
__global__ void __launch_bounds__(kThreads, 2)
    lse_partial_kernel(const T* __restrict__ q, const T* __restrict__ queue, int64_t n, int64_t num_keys,
                       int64_t dim, float inv_t, Plan plan, float* __restrict__ part_max,
                       float* __restrict__ part_sum) {
  constexpr int kThreadsPerRow = kThreads / Tile::kRows;
  static_assert(kThreads % Tile::kRows == 0 && kThreadsPerRow <= 32 &&
                    (kThreadsPerRow & (kThreadsPerRow - 1)) == 0,
                "a row's threads form a power-of-two group inside one warp");
  auto& s = *reinterpret_cast<typename Tile::Storage*>(dynamic_shared_memory());
  const int64_t block = blockIdx.x;
  const int64_t split = block % plan.splits;
  const int64_t row0 = block / plan.splits * Tile::kRows;
  const int r = threadIdx.x / kThreadsPerRow;
  const int lane = threadIdx.x % kThreadsPerRow;
  float run_max = -INFINITY;
  float run_sum = 0.f;
  const int64_t tile_end = min_index(plan.tiles, (split + 1) * plan.tiles_per_split);
  for (int64_t tile = split * plan.tiles_per_split; tile < tile_end; ++tile) {
    const int64_t key0 = tile * Tile::kKeys;
    const int count = static_cast<int>(min_index(Tile::kKeys, num_keys - key0));
    Tile::score(q, row0, n, queue, key0, num_keys, dim, inv_t, s);
    float tile_max = -INFINITY;
    for (int c = lane; c < count; c += kThreadsPerRow) tile_max = fmaxf(tile_max, s.scores[r][c]);
    for (int offset = 1; offset < kThreadsPerRow; offset *= 2) {
      tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, offset));
    }
    const float new_max = fmaxf(run_max, tile_max);
    float tile_sum = 0.f;
    for (int c = lane; c < count; c += kThreadsPerRow) tile_sum += __expf(s.scores[r][c] - new_max);
    for (int offset = 1; offset < kThreadsPerRow; offset *= 2) {
      tile_sum += __shfl_xor_sync(kFullMask, tile_sum, offset);
    }
    run_sum = run_sum * __expf(run_max - new_max) + tile_sum;
    run_max = new_max;
  }
  const int64_t row = row0 + r;
  if (lane == 0 && row < n) {
    part_max[split * n + row] = run_max;
    part_sum[split * n + row] = run_sum;
  }
}

// Merges the splits' statistics with the positive logit: one warp per row.
template <typename T>
__global__ void lse_finalize_kernel(const T* __restrict__ q, const T* __restrict__ k, int64_t n, int64_t dim,
                                    float inv_t, int64_t splits, const float* __restrict__ part_max,
                                    const float* __restrict__ part_sum, float* __restrict__ loss,
                                    float* __restrict__ lse) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= n) return;
  const float positive = warp_dot(q + row * dim, k + row * dim, dim) * inv_t;
  if (threadIdx.x % 32 != 0) return;
  float max = positive;
  for (int64_t s = 0; s < splits; ++s) max = fmaxf(max, part_max[s * n + row]);
  float sum = __expf(positive - max);
  for (int64_t s = 0; s < splits; ++s) sum += part_sum[s * n + row] * __expf(part_max[s * n + row] - max);
  lse[row] = max + __logf(sum);
  loss[row] = lse[row] - positive;
}

// Dynamic shared memory of grad_partial_kernel: the tile storage, the gradient
// accumulator (kRows x grad_pitch(dim) fp32, 128-B aligned like the storage), then each
// row's lse and gradient coefficient.
template <typename Tile>
size_t grad_partial_bytes(int64_t dim) {
  return storage_bytes<typename Tile::Storage>() +
         sizeof(float) * Tile::kRows * (static_cast<size_t>(Tile::grad_pitch(dim)) + 2);
}

// One split's queue part of grad_q: coef_i * sum_j p_ij * queue_j over the split's tiles,
// with coef_i = grad_loss_i / T; the sum is accumulated in shared memory and written to
// part_grad.
template <typename Tile, typename T>
__global__ void __launch_bounds__(kThreads, 2)
    grad_partial_kernel(const float* __restrict__ grad_loss, const T* __restrict__ q,
                        const T* __restrict__ queue, const float* __restrict__ lse, int64_t n,
                        int64_t num_keys, int64_t dim, float inv_t, Plan plan,
                        float* __restrict__ part_grad) {
  using Storage = typename Tile::Storage;
  const int64_t pitch = Tile::grad_pitch(dim);
  auto& s = *reinterpret_cast<Storage*>(dynamic_shared_memory());
  float* grad_acc = reinterpret_cast<float*>(dynamic_shared_memory() + storage_bytes<Storage>());
  float* row_lse = grad_acc + Tile::kRows * pitch;
  float* row_coef = row_lse + Tile::kRows;
  const int64_t block = blockIdx.x;
  const int64_t split = block % plan.splits;
  const int64_t row0 = block / plan.splits * Tile::kRows;
  for (int64_t e = threadIdx.x; e < Tile::kRows * pitch; e += kThreads) grad_acc[e] = 0.f;
  if (threadIdx.x < Tile::kRows) {
    const int64_t row = row0 + threadIdx.x;
    row_lse[threadIdx.x] = row < n ? lse[row] : 0.f;
    row_coef[threadIdx.x] = row < n ? grad_loss[row] * inv_t : 0.f;
  }
  __syncthreads();
  const int64_t tile_end = min_index(plan.tiles, (split + 1) * plan.tiles_per_split);
  for (int64_t tile = split * plan.tiles_per_split; tile < tile_end; ++tile) {
    const int64_t key0 = tile * Tile::kKeys;
    const int64_t count = min_index(Tile::kKeys, num_keys - key0);
    Tile::score(q, row0, n, queue, key0, num_keys, dim, inv_t, s);
    for (int e = threadIdx.x; e < Tile::kRows * Tile::kKeys; e += kThreads) {
      const int r = e / Tile::kKeys;
      const int c = e % Tile::kKeys;
      s.scores[r][c] = c < count ? __expf(s.scores[r][c] - row_lse[r]) : 0.f;
    }
    __syncthreads();
    Tile::accumulate(s, queue, key0, count, num_keys, dim, grad_acc, pitch);
  }
  for (int64_t e = threadIdx.x; e < Tile::kRows * dim; e += kThreads) {
    const int64_t r = e / dim;
    const int64_t row = row0 + r;
    if (row < n) part_grad[(split * n + row) * dim + e % dim] = row_coef[r] * grad_acc[r * pitch + e % dim];
  }
}

// grad_q = splits' sum + (p_0 - 1) coef k, grad_k = (p_0 - 1) coef q: one warp per row.
template <typename T>
__global__ void grad_finalize_kernel(const float* __restrict__ grad_loss, const T* __restrict__ q,
                                     const T* __restrict__ k, const float* __restrict__ lse, int64_t n,
                                     int64_t dim, float inv_t, int64_t splits,
                                     const float* __restrict__ part_grad, T* __restrict__ grad_q,
                                     T* __restrict__ grad_k) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= n) return;
  const float positive = warp_dot(q + row * dim, k + row * dim, dim) * inv_t;
  const float pos_weight = grad_loss[row] * inv_t * (__expf(positive - lse[row]) - 1.f);
  for (int64_t d = threadIdx.x % 32; d < dim; d += 32) {
    float total = pos_weight * to_float(k[row * dim + d]);
    for (int64_t s = 0; s < splits; ++s) total += part_grad[(s * n + row) * dim + d];
    grad_q[row * dim + d] = from_float<T>(total);
    grad_k[row * dim + d] = from_float<T>(pos_weight * to_float(q[row * dim + d]));
  }
}

}  // namespace astrea::cuda::detail
