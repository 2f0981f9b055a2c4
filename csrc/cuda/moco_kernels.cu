#include "cuda/moco_kernels.cuh"

#include <climits>
#include <utility>

#include "cuda/moco_device.cuh"

namespace astrea::cuda {
namespace {

using namespace detail;

// Calls fn(element, family) with a value of the element type and the tile family that
// serves it, so that fn can be a generic lambda.
template <typename Fn>
cudaError_t dispatch(ElementType type, Fn&& fn) {
  switch (type) {
    case ElementType::kFloat32:
      return fn(float{}, FmaFamily{});
    case ElementType::kFloat16:
      return fn(__half{}, TensorCoreFamily{});
    case ElementType::kBFloat16:
      return fn(__nv_bfloat16{}, TensorCoreFamily{});
  }
  return cudaErrorInvalidValue;
}

Plan make_plan(int64_t n, int64_t num_keys, int rows_per_block, int keys_per_tile) {
  int device = 0;
  int sms = 1;  // if the query fails the plan is merely less parallel
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return plan_for(n, num_keys, rows_per_block, keys_per_tile, sms);
}

template <typename Tile>
Plan make_plan(int64_t n, int64_t num_keys) {
  return make_plan(n, num_keys, Tile::kRows, Tile::kKeys);
}

// Launches a tile kernel with `bytes` of dynamic shared memory on `blocks` blocks, raising
// the kernel's limit past the default 48 KiB. cudaErrorInvalidValue when this GPU has less
// shared memory per block (static + dynamic) or the grid is too large.
template <typename... Params, typename... Args>
cudaError_t launch_tiles(void (*kernel)(Params...), int64_t blocks, size_t bytes, cudaStream_t stream,
                         Args&&... args) {
  int device = 0;
  int max_bytes = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaFuncAttributes attributes;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  if (attributes.sharedSizeBytes + bytes > static_cast<size_t>(max_bytes) || blocks > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

unsigned warp_row_blocks(int64_t n) { return static_cast<unsigned>((n + kWarps - 1) / kWarps); }

}  // namespace

cudaError_t moco_logits(ElementType type, const void* q, const void* k, const void* queue, int64_t n,
                        int64_t num_keys, int64_t dim, float inv_temperature, float* logits,
                        cudaStream_t stream) {
  return dispatch(type, [&](auto element, auto family) {
    using T = decltype(element);
    using Tile = typename decltype(family)::template Forward<T>;
    const int64_t tiles = (num_keys + Tile::kKeys - 1) / Tile::kKeys;
    const int64_t blocks = (n + Tile::kRows - 1) / Tile::kRows * tiles;
    return launch_tiles(logits_kernel<Tile, T>, blocks, storage_bytes<typename Tile::Storage>(), stream,
                        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(queue), n,
                        num_keys, dim, inv_temperature, tiles, logits);
  });
}

int64_t moco_infonce_workspace_size(ElementType type, int64_t n, int64_t num_keys, int64_t dim) {
  int64_t size = 0;
  dispatch(type, [&](auto element, auto family) {
    using T = decltype(element);
    using Family = decltype(family);
    const Plan forward = make_plan<typename Family::template Forward<T>>(n, num_keys);
    const Plan backward = make_plan<typename Family::template Backward<T>>(n, num_keys);
    size = std::max(2 * forward.splits * n, backward.splits * n * dim);
    return cudaSuccess;
  });
  return size;
}

cudaError_t moco_infonce_forward(ElementType type, const void* q, const void* k, const void* queue,
                                 int64_t n, int64_t num_keys, int64_t dim, float inv_temperature,
                                 float* loss, float* lse, float* workspace, cudaStream_t stream) {
  return dispatch(type, [&](auto element, auto family) {
    using T = decltype(element);
    using Tile = typename decltype(family)::template Forward<T>;
    const Plan plan = make_plan<Tile>(n, num_keys);
    float* part_max = workspace;
    float* part_sum = workspace + plan.splits * n;
    cudaError_t err = launch_tiles(lse_partial_kernel<Tile, T>, plan.blocks(),
                                   storage_bytes<typename Tile::Storage>(), stream, static_cast<const T*>(q),
                                   static_cast<const T*>(queue), n, num_keys, dim, inv_temperature, plan,
                                   part_max, part_sum);
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
  return dispatch(type, [&](auto element, auto family) {
    using T = decltype(element);
    using Tile = typename decltype(family)::template Backward<T>;
    const Plan plan = make_plan<Tile>(n, num_keys);
    cudaError_t err = launch_tiles(grad_partial_kernel<Tile, T>, plan.blocks(), grad_partial_bytes<Tile>(dim),
                                   stream, grad_loss,
                                   static_cast<const T*>(q), static_cast<const T*>(queue), lse, n, num_keys,
                                   dim, inv_temperature, plan, workspace);
    if (err != cudaSuccess) return err;
    grad_finalize_kernel<T><<<warp_row_blocks(n), kThreads, 0, stream>>>(
        grad_loss, static_cast<const T*>(q), static_cast<const T*>(k), lse, n, dim, inv_temperature, plan.splits,
        workspace, static_cast<T*>(grad_q), static_cast<T*>(grad_k));
    return cudaGetLastError();
  });
}

}  // namespace astrea::cuda
