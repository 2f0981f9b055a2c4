// Momentum-queue contrast kernels on the GPU. Torch-free (raw pointers, sizes, stream)
// so that they compile with plain nvcc on machines without a CUDA build of torch.
//
// q and k are [n, dim], queue is [num_keys, dim], all contiguous and of one element
// type; logits are (q . key) / T with fp32 accumulation. Tiles of q rows x queue rows
// are computed through shared memory; the fused loss keeps only per-row statistics.
//
// The element type picks how a tile of q . queue^T is computed (nothing else differs):
//   kFloat32             FMA tiles: fp32 products and sums on the CUDA cores. Tensor cores
//                        would round the inputs to TF32, which fp32 callers do not expect.
//   kFloat16, kBFloat16  tensor-core tiles (nvcuda::wmma 16x16x16, fp32 accumulators; sm_80+).
//                        The inputs are exact in the products; in backward the softmax
//                        probabilities (in [0, 1]) are rounded to the input type for the
//                        second product, probabilities . queue, whose sums stay fp32.
// Positive logits q_i . k_i and the O(n * dim) epilogues use fp32 on the CUDA cores for
// every type. Tile geometry: moco_tiles.h; tiles and kernels: moco_device.cuh (this file's
// functions, in moco_kernels.cu, only plan and launch them).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace astrea::cuda {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

// logits [n, 1 + num_keys] fp32: column 0 the positive q_i . k_i / T, then q_i . queue_j / T.
cudaError_t moco_logits(ElementType type, const void* q, const void* k, const void* queue, int64_t n,
                        int64_t num_keys, int64_t dim, float inv_temperature, float* logits,
                        cudaStream_t stream);

// Number of fp32 values of the workspace that moco_infonce_forward and
// moco_infonce_backward need for these sizes (O(n * dim), never O(n * num_keys)).
int64_t moco_infonce_workspace_size(ElementType type, int64_t n, int64_t num_keys, int64_t dim);

// loss [n] and lse [n] fp32: lse_i = logsumexp of row i's logits, loss_i = lse_i - positive_i.
cudaError_t moco_infonce_forward(ElementType type, const void* q, const void* k, const void* queue,
                                 int64_t n, int64_t num_keys, int64_t dim, float inv_temperature,
                                 float* loss, float* lse, float* workspace, cudaStream_t stream);

// Gradients of sum_i grad_loss_i * loss_i, recomputing the logits tiles from lse:
//   grad_q_i = grad_loss_i / T * (sum_j p_ij queue_j + (p_i0 - 1) k_i)
//   grad_k_i = grad_loss_i / T * (p_i0 - 1) q_i
// grad_q and grad_k are [n, dim] of the input element type. Fails with
// cudaErrorInvalidValue when dim is too large for the shared-memory accumulator.
cudaError_t moco_infonce_backward(ElementType type, const float* grad_loss, const void* q,
                                  const void* k, const void* queue, const float* lse, int64_t n,
                                  int64_t num_keys, int64_t dim, float inv_temperature,
                                  void* grad_q, void* grad_k, float* workspace, cudaStream_t stream);

}  // namespace astrea::cuda
