// Argument checks shared by the CPU and CUDA bindings (csrc/cpu/*.cpp, csrc/cuda/*.cpp); an op
// whose only C++ kernel is a CPU one keeps its checks in that kernel's file. The Python wrappers
// in astrea/ops validate first with friendlier messages; these keep direct torch.ops.astrea.*
// calls from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace astrea {

inline void check_queue_enqueue_args(const at::Tensor& queue, const at::Tensor& ptr,
                                     const at::Tensor& keys) {
  TORCH_CHECK_VALUE(queue.dim() == 2, "queue_enqueue_: queue must be 2-D [K, D], got ",
                    queue.dim(), "-D");
  TORCH_CHECK_VALUE(queue.size(0) > 0, "queue_enqueue_: queue must have K > 0 rows");
  TORCH_CHECK_VALUE(queue.is_contiguous(), "queue_enqueue_: queue must be contiguous");
  TORCH_CHECK_TYPE(ptr.scalar_type() == at::kLong && ptr.numel() == 1,
                   "queue_enqueue_: ptr must be a 1-element int64 tensor, got ",
                   ptr.scalar_type(), " with ", ptr.numel(), " elements");
  TORCH_CHECK_VALUE(keys.dim() == 2 && keys.size(1) == queue.size(1),
                    "queue_enqueue_: keys must be [B, ", queue.size(1), "], got ", keys.sizes());
  TORCH_CHECK_VALUE(keys.size(0) <= queue.size(0), "queue_enqueue_: ", keys.size(0),
                    " keys do not fit in a queue of ", queue.size(0), " rows");
  TORCH_CHECK_VALUE(keys.device() == queue.device() && ptr.device() == queue.device(),
                    "queue_enqueue_: queue, ptr and keys must be on one device, got ",
                    queue.device(), ", ", ptr.device(), ", ", keys.device());
}

// q [N, D], k [N, D], queue [K, D] (N, D, K > 0) of one floating dtype on one device, T > 0.
inline void check_moco_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& queue, double temperature) {
  TORCH_CHECK_VALUE(q.dim() == 2 && q.size(0) > 0 && q.size(1) > 0, op,
                    ": q must be [N > 0, D > 0], got ", q.sizes());
  TORCH_CHECK_VALUE(queue.dim() == 2 && queue.size(0) > 0 && queue.size(1) == q.size(1), op,
                    ": queue must be [K > 0, ", q.size(1), "], got ", queue.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), ", got ",
                    k.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()) && k.scalar_type() == q.scalar_type() &&
                       queue.scalar_type() == q.scalar_type(),
                   op, ": q, k and queue must share one floating dtype, got ", q.scalar_type(),
                   ", ", k.scalar_type(), ", ", queue.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && queue.device() == q.device(), op,
                    ": q, k and queue must be on one device, got ", q.device(), ", ", k.device(),
                    ", ", queue.device());
  TORCH_CHECK_VALUE(temperature > 0, op, ": temperature must be > 0, got ", temperature);
}

// The saved row statistics and incoming gradient of moco_infonce_backward: fp32 [N]
// (float64 for float64 inputs).
inline void check_moco_row_vector(const char* name, const at::Tensor& v, const at::Tensor& q) {
  const auto expected = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == q.size(0), "moco_infonce_backward: ", name,
                    " must be [", q.size(0), "], got ", v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == expected && v.device() == q.device(),
                   "moco_infonce_backward: ", name, " must be ", expected, " on ", q.device(),
                   ", got ", v.scalar_type(), " on ", v.device());
}

}  // namespace astrea
