// Ring-buffer enqueue on the GPU. Torch-free (raw pointers, sizes, stream) so that it
// compiles with plain nvcc on machines without a CUDA build of torch.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace astrea::cuda {

// Copies `count` rows of `row_bytes` bytes from `keys` (rows `keys_row_stride_bytes`
// apart) into `queue` (contiguous, `capacity` rows) starting at row *ptr, wrapping
// around, then sets *ptr = (*ptr + count) % capacity. `ptr` is device memory: the
// start row is read on the device, so the host never waits. Both element buffers must
// be 4-byte aligned when row_bytes is a multiple of 4 (the fast path), else 2-byte.
cudaError_t queue_enqueue(const void* keys, int64_t keys_row_stride_bytes, void* queue,
                          int64_t capacity, int64_t row_bytes, int64_t count, int64_t* ptr,
                          cudaStream_t stream);

}  // namespace astrea::cuda
