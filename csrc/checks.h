// Argument checks shared by the CPU and CUDA bindings. The Python wrappers in
// astrea/ops validate first with friendlier messages; these keep direct
// torch.ops.astrea.* calls from reading out of bounds.
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

}  // namespace astrea
