#include "cuda/queue_kernels.cuh"

namespace astrea::cuda {
namespace {

constexpr int kThreads = 256;

// One grid-stride loop over count * words_per_row words; Word is a 4- or 2-byte
// integer so that every dtype is a plain bit copy.
template <typename Word>
__global__ void enqueue_rows_kernel(const char* __restrict__ keys, int64_t keys_row_stride_bytes,
                                    Word* __restrict__ queue, int64_t capacity,
                                    int64_t words_per_row, int64_t count,
                                    const int64_t* __restrict__ ptr) {
  const int64_t start = *ptr;
  const int64_t total = count * words_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / words_per_row;
    const int64_t col = i - row * words_per_row;
    const Word* src = reinterpret_cast<const Word*>(keys + row * keys_row_stride_bytes);
    const int64_t dst_row = (start + row) % capacity;
    queue[dst_row * words_per_row + col] = src[col];
  }
}

// A second launch, so that every copy above has read the old *ptr before it moves.
__global__ void advance_ptr_kernel(int64_t* ptr, int64_t count, int64_t capacity) {
  *ptr = (*ptr + count) % capacity;
}

template <typename Word>
void launch_rows(const void* keys, int64_t keys_row_stride_bytes, void* queue, int64_t capacity,
                 int64_t row_bytes, int64_t count, const int64_t* ptr, cudaStream_t stream) {
  const int64_t words_per_row = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t total = count * words_per_row;
  const int64_t wanted_blocks = (total + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted_blocks < 65535 ? wanted_blocks : 65535);
  enqueue_rows_kernel<Word><<<blocks, kThreads, 0, stream>>>(
      static_cast<const char*>(keys), keys_row_stride_bytes, static_cast<Word*>(queue), capacity,
      words_per_row, count, ptr);
}

}  // namespace

cudaError_t queue_enqueue(const void* keys, int64_t keys_row_stride_bytes, void* queue,
                          int64_t capacity, int64_t row_bytes, int64_t count, int64_t* ptr,
                          cudaStream_t stream) {
  if (count > 0 && row_bytes > 0) {
    if (row_bytes % 4 == 0 && keys_row_stride_bytes % 4 == 0) {
      launch_rows<uint32_t>(keys, keys_row_stride_bytes, queue, capacity, row_bytes, count, ptr,
                            stream);
    } else {
      launch_rows<uint16_t>(keys, keys_row_stride_bytes, queue, capacity, row_bytes, count, ptr,
                            stream);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  advance_ptr_kernel<<<1, 1, 0, stream>>>(ptr, count, capacity);
  return cudaGetLastError();
}

}  // namespace astrea::cuda
