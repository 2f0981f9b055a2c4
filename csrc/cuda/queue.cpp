// CUDA binding of queue_enqueue_: argument checks, dtype cast, stream; the kernel is in
// the torch-free queue_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/queue_kernels.cuh"

namespace astrea {
namespace {

void queue_enqueue_cuda(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  check_queue_enqueue_args(queue, ptr, keys);
  const c10::cuda::CUDAGuard guard(queue.device());
  // Rows must be contiguous for the row copy; casting here keeps the kernel a bit copy.
  const at::Tensor rows = keys.to(queue.scalar_type()).contiguous();
  const int64_t row_bytes = queue.size(1) * queue.element_size();
  const cudaError_t err = cuda::queue_enqueue(
      rows.const_data_ptr(), row_bytes, queue.data_ptr(), queue.size(0), row_bytes,
      rows.size(0), ptr.data_ptr<int64_t>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "queue_enqueue_: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(astrea, CUDA, m) { m.impl("queue_enqueue_", &queue_enqueue_cuda); }

}  // namespace astrea
