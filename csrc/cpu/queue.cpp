#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace astrea {
namespace {

void queue_enqueue_cpu(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  check_queue_enqueue_args(queue, ptr, keys);
  const int64_t capacity = queue.size(0);
  const int64_t count = keys.size(0);
  int64_t* ptr_data = ptr.data_ptr<int64_t>();
  const int64_t start = *ptr_data;
  TORCH_CHECK_VALUE(start >= 0 && start < capacity, "queue_enqueue_: ptr[0] = ", start,
                    " is outside [0, ", capacity, ")");
  const int64_t head = std::min(count, capacity - start);
  queue.narrow(0, start, head).copy_(keys.narrow(0, 0, head));
  if (count > head) {
    queue.narrow(0, 0, count - head).copy_(keys.narrow(0, head, count - head));
  }
  *ptr_data = (start + count) % capacity;
}

}  // namespace

TORCH_LIBRARY_IMPL(astrea, CPU, m) { m.impl("queue_enqueue_", &queue_enqueue_cpu); }

}  // namespace astrea
