#include "cuda/moco_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace astrea::cuda {
namespace {

constexpr int kThreads = 256;      // 16 x 16 threads compute a score tile
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kTileKeys = 64;      // queue rows per score tile
constexpr int kTileDepth = 32;     // features per shared-memory stage
constexpr int kForwardRows = 64;   // q rows per block: logits and loss
constexpr int kBackwardRows = 32;  // q rows per block: gradient (its accumulator is rows x dim)
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

__device__ __forceinline__ int64_t min_index(int64_t a, int64_t b) { return a < b ? a : b; }

template <int Rows>
struct TileStorage {
  float rows[Rows][kTileDepth + 1];  // +1: the column reads of the inner loop hit distinct banks
  float keys[kTileKeys][kTileDepth + 1];
  float scores[Rows][kTileKeys];
};

// scores[r][c] = (q[row0 + r] . queue[key0 + c]) * inv_t, 0 past the last row or key.
// Each of the 16 x 16 threads accumulates (Rows / 16) x 4 scores in registers while
// stages of kTileDepth features go through shared memory. Ends synchronised.
template <typename T, int Rows>
__device__ void score_tile(const T* __restrict__ q, int64_t row0, int64_t n, const T* __restrict__ queue,
                           int64_t key0, int64_t num_keys, int64_t dim, float inv_t, TileStorage<Rows>& s) {
  constexpr int kRowsPerThread = Rows / 16;
  constexpr int kKeysPerThread = kTileKeys / 16;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  float acc[kRowsPerThread][kKeysPerThread] = {};
  for (int64_t d0 = 0; d0 < dim; d0 += kTileDepth) {
    for (int e = threadIdx.x; e < Rows * kTileDepth; e += kThreads) {
      const int64_t row = row0 + e / kTileDepth;
      const int64_t col = d0 + e % kTileDepth;
      s.rows[e / kTileDepth][e % kTileDepth] = (row < n && col < dim) ? to_float(q[row * dim + col]) : 0.f;
    }
    for (int e = threadIdx.x; e < kTileKeys * kTileDepth; e += kThreads) {
      const int64_t key = key0 + e / kTileDepth;
      const int64_t col = d0 + e % kTileDepth;
      s.keys[e / kTileDepth][e % kTileDepth] =
          (key < num_keys && col < dim) ? to_float(queue[key * dim + col]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int d = 0; d < kTileDepth; ++d) {
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

// Dot product of two dim-vectors by one warp; every lane gets the result.
template <typename T>
__device__ float warp_dot(const T* __restrict__ a, const T* __restrict__ b, int64_t dim) {
  float sum = 0.f;
  for (int64_t d = threadIdx.x % 32; d < dim; d += 32) sum += to_float(a[d]) * to_float(b[d]);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    logits_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ queue, int64_t n,
                  int64_t num_keys, int64_t dim, float inv_t, float* __restrict__ logits) {
  __shared__ TileStorage<kForwardRows> s;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kForwardRows;
  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kTileKeys;
  const int64_t stride = num_keys + 1;
  score_tile<T, kForwardRows>(q, row0, n, queue, key0, num_keys, dim, inv_t, s);
  for (int e = threadIdx.x; e < kForwardRows * kTileKeys; e += kThreads) {
    const int64_t row = row0 + e / kTileKeys;
    const int64_t key = key0 + e % kTileKeys;
    if (row < n && key < num_keys) logits[row * stride + 1 + key] = s.scores[e / kTileKeys][e % kTileKeys];
  }
  // The blocks of the first key tile also write the positive column, one warp per row.
  if (blockIdx.x == 0) {
    for (int r = threadIdx.x / 32; r < kForwardRows; r += kWarpsPerBlock) {
      const int64_t row = row0 + r;
      if (row >= n) break;
      const float dot = warp_dot(q + row * dim, k + row * dim, dim);
      if (threadIdx.x % 32 == 0) logits[row * stride] = dot * inv_t;
    }
  }
}

// How the n x num_keys work is cut: blocks of q rows crossed with `splits` ranges of
// queue tiles, so that small batches still fill the GPU; every split is non-empty.
struct Plan {
  int64_t row_blocks, tiles, splits, tiles_per_split;
};

Plan make_plan(int64_t n, int64_t num_keys, int rows_per_block) {
  int device = 0;
  int sms = 1;  // if the query fails the plan is merely less parallel
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  Plan p;
  p.row_blocks = (n + rows_per_block - 1) / rows_per_block;
  p.tiles = (num_keys + kTileKeys - 1) / kTileKeys;
  const int64_t wanted_blocks = 2 * static_cast<int64_t>(sms);
  p.splits = std::clamp<int64_t>((wanted_blocks + p.row_blocks - 1) / p.row_blocks, 1, p.tiles);
  p.tiles_per_split = (p.tiles + p.splits - 1) / p.splits;
  p.splits = (p.tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

// Running (max, sum of exp) of each row over one split's queue tiles: 4 threads per
// row, each scanning 16 keys of the tile, combined by shuffles.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    lse_partial_kernel(const T* __restrict__ q, const T* __restrict__ queue, int64_t n, int64_t num_keys,
                       int64_t dim, float inv_t, Plan plan, float* __restrict__ part_max,
                       float* __restrict__ part_sum) {
  constexpr int kThreadsPerRow = kThreads / kForwardRows;
  constexpr int kKeysPerThread = kTileKeys / kThreadsPerRow;
  static_assert(kThreadsPerRow == 4, "the shuffles below combine 4 lanes");
  __shared__ TileStorage<kForwardRows> s;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kForwardRows;
  const int64_t split = blockIdx.x;
  const int r = threadIdx.x / kThreadsPerRow;
  const int first_key = threadIdx.x % kThreadsPerRow * kKeysPerThread;
  float run_max = -INFINITY;
  float run_sum = 0.f;
  const int64_t tile_end = min_index(plan.tiles, (split + 1) * plan.tiles_per_split);
  for (int64_t tile = split * plan.tiles_per_split; tile < tile_end; ++tile) {
    const int64_t key0 = tile * kTileKeys;
    const int64_t count = min_index(kTileKeys, num_keys - key0);
    score_tile<T, kForwardRows>(q, row0, n, queue, key0, num_keys, dim, inv_t, s);
    float tile_max = -INFINITY;
    for (int c = first_key; c < first_key + kKeysPerThread && c < count; ++c) tile_max = fmaxf(tile_max, s.scores[r][c]);
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
    const float new_max = fmaxf(run_max, tile_max);
    float tile_sum = 0.f;
    for (int c = first_key; c < first_key + kKeysPerThread && c < count; ++c) tile_sum += __expf(s.scores[r][c] - new_max);
    tile_sum += __shfl_xor_sync(kFullMask, tile_sum, 1);
    tile_sum += __shfl_xor_sync(kFullMask, tile_sum, 2);
    run_sum = run_sum * __expf(run_max - new_max) + tile_sum;
    run_max = new_max;
  }
  const int64_t row = row0 + r;
  if (first_key == 0 && row < n) {
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
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
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

// One split's queue part of grad_q: sum_j coef_i * p_ij * queue_j over the split's
// tiles, accumulated in shared memory (rows x dim fp32, dynamic) and written to part_grad.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    grad_partial_kernel(const float* __restrict__ grad_loss, const T* __restrict__ q,
                        const T* __restrict__ queue, const float* __restrict__ lse, int64_t n,
                        int64_t num_keys, int64_t dim, float inv_t, Plan plan,
                        float* __restrict__ part_grad) {
  __shared__ TileStorage<kBackwardRows> s;
  __shared__ float row_lse[kBackwardRows];
  __shared__ float row_coef[kBackwardRows];
  extern __shared__ float grad_acc[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kBackwardRows;
  const int64_t split = blockIdx.x;
  const int64_t acc_size = kBackwardRows * dim;
  for (int64_t e = threadIdx.x; e < acc_size; e += kThreads) grad_acc[e] = 0.f;
  if (threadIdx.x < kBackwardRows) {
    const int64_t row = row0 + threadIdx.x;
    row_lse[threadIdx.x] = row < n ? lse[row] : 0.f;
    row_coef[threadIdx.x] = row < n ? grad_loss[row] * inv_t : 0.f;
  }
  __syncthreads();
  const int64_t tile_end = min_index(plan.tiles, (split + 1) * plan.tiles_per_split);
  for (int64_t tile = split * plan.tiles_per_split; tile < tile_end; ++tile) {
    const int64_t key0 = tile * kTileKeys;
    const int64_t count = min_index(kTileKeys, num_keys - key0);
    score_tile<T, kBackwardRows>(q, row0, n, queue, key0, num_keys, dim, inv_t, s);
    for (int e = threadIdx.x; e < kBackwardRows * kTileKeys; e += kThreads) {
      const int r = e / kTileKeys;
      const int c = e % kTileKeys;
      s.scores[r][c] = c < count ? row_coef[r] * __expf(s.scores[r][c] - row_lse[r]) : 0.f;
    }
    __syncthreads();
    // Consecutive threads take consecutive features: the queue reads are coalesced.
    for (int64_t e = threadIdx.x; e < acc_size; e += kThreads) {
      const int64_t r = e / dim;
      const int64_t d = e % dim;
      float acc = grad_acc[e];
      for (int64_t c = 0; c < count; ++c) acc += s.scores[r][c] * to_float(queue[(key0 + c) * dim + d]);
      grad_acc[e] = acc;
    }
    __syncthreads();
  }
  for (int64_t e = threadIdx.x; e < acc_size; e += kThreads) {
    const int64_t row = row0 + e / dim;
    if (row < n) part_grad[(split * n + row) * dim + e % dim] = grad_acc[e];
  }
}

// grad_q = splits' sum + (p_0 - 1) coef k, grad_k = (p_0 - 1) coef q: one warp per row.
template <typename T>
__global__ void grad_finalize_kernel(const float* __restrict__ grad_loss, const T* __restrict__ q,
                                     const T* __restrict__ k, const float* __restrict__ lse, int64_t n,
                                     int64_t dim, float inv_t, int64_t splits,
                                     const float* __restrict__ part_grad, T* __restrict__ grad_q,
                                     T* __restrict__ grad_k) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
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

// Calls fn with a value of the element type, so that fn can be a generic lambda.
template <typename Fn>
cudaError_t dispatch(ElementType type, Fn&& fn) {
  switch (type) {
    case ElementType::kFloat32:
      return fn(float{});
    case ElementType::kFloat16:
      return fn(__half{});
    case ElementType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

unsigned warp_row_blocks(int64_t n) { return static_cast<unsigned>((n + kWarpsPerBlock - 1) / kWarpsPerBlock); }

}  // namespace

cudaError_t moco_logits(ElementType type, const void* q, const void* k, const void* queue, int64_t n,
                        int64_t num_keys, int64_t dim, float inv_temperature, float* logits,
                        cudaStream_t stream) {
  return dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>((num_keys + kTileKeys - 1) / kTileKeys),
                    static_cast<unsigned>((n + kForwardRows - 1) / kForwardRows));
    logits_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                     static_cast<const T*>(queue), n, num_keys, dim,
                                                     inv_temperature, logits);
    return cudaGetLastError();
  });
}

int64_t moco_infonce_workspace_size(int64_t n, int64_t num_keys, int64_t dim) {
  const Plan forward = make_plan(n, num_keys, kForwardRows);
  const Plan backward = make_plan(n, num_keys, kBackwardRows);
  return std::max(2 * forward.splits * n, backward.splits * n * dim);
}

cudaError_t moco_infonce_forward(ElementType type, const void* q, const void* k, const void* queue,
                                 int64_t n, int64_t num_keys, int64_t dim, float inv_temperature,
                                 float* loss, float* lse, float* workspace, cudaStream_t stream) {
  return dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    const Plan plan = make_plan(n, num_keys, kForwardRows);
    float* part_max = workspace;
    float* part_sum = workspace + plan.splits * n;
    const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(plan.row_blocks));
    lse_partial_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(q), static_cast<const T*>(queue),
                                                          n, num_keys, dim, inv_temperature, plan, part_max,
                                                          part_sum);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    lse_finalize_kernel<T><<<warp_row_blocks(n), kThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), n, dim, inv_temperature, plan.splits, part_max,
        part_sum, loss, lse);
    return cudaGetLastError();
  });
}

cudaError_t moco_infonce_backward(ElementType type, const float* grad_loss, const void* q,
                                  const void* k, const void* queue, const float* lse, int64_t n,
                                  int64_t num_keys, int64_t dim, float inv_temperature,
                                  void* grad_q, void* grad_k, float* workspace, cudaStream_t stream) {
  return dispatch(type, [&](auto tag) {
    using T = decltype(tag);
    const Plan plan = make_plan(n, num_keys, kBackwardRows);
    const size_t accumulator_bytes = sizeof(float) * kBackwardRows * static_cast<size_t>(dim);
    int device = 0;
    int max_bytes = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    cudaFuncAttributes attributes;
    cudaError_t err = cudaFuncGetAttributes(&attributes, grad_partial_kernel<T>);
    if (err != cudaSuccess) return err;
    if (attributes.sharedSizeBytes + accumulator_bytes > static_cast<size_t>(max_bytes)) return cudaErrorInvalidValue;
    err = cudaFuncSetAttribute(grad_partial_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(accumulator_bytes));
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(plan.row_blocks));
    grad_partial_kernel<T><<<grid, kThreads, accumulator_bytes, stream>>>(
        grad_loss, static_cast<const T*>(q), static_cast<const T*>(queue), lse, n, num_keys, dim,
        inv_temperature, plan, workspace);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    grad_finalize_kernel<T><<<warp_row_blocks(n), kThreads, 0, stream>>>(
        grad_loss, static_cast<const T*>(q), static_cast<const T*>(k), lse, n, dim, inv_temperature, plan.splits,
        workspace, static_cast<T*>(grad_q), static_cast<T*>(grad_k));
    return cudaGetLastError();
  });
}

}  // namespace astrea::cuda
