// CUDA bindings of the momentum-queue contrast ops: argument checks, contiguous
// operands, outputs and workspace from the caching allocator, stream; the kernels are
// in the torch-free moco_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/moco_kernels.cuh"

namespace astrea {
namespace {

// The element type also picks the kernels' arithmetic (moco_kernels.cuh): float32 runs
// fp32 FMA tiles (never TF32), float16 and bfloat16 run tensor-core tiles.
cuda::ElementType element_type(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::ElementType::kFloat32;
    case at::kHalf:
      return cuda::ElementType::kFloat16;
    case at::kBFloat16:
      return cuda::ElementType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": CUDA inputs must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

at::Tensor moco_logits_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue,
                            double temperature) {
  check_moco_args("moco_logits", q, k, queue, temperature);
  const cuda::ElementType type = element_type("moco_logits", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), queuec = queue.contiguous();
  at::Tensor logits = at::empty({q.size(0), 1 + queue.size(0)}, q.options().dtype(at::kFloat));
  check_launch("moco_logits",
               cuda::moco_logits(type, qc.const_data_ptr(), kc.const_data_ptr(), queuec.const_data_ptr(),
                                 q.size(0), queue.size(0), q.size(1), static_cast<float>(1.0 / temperature),
                                 logits.data_ptr<float>(), at::cuda::getCurrentCUDAStream()));
  return logits;
}

at::Tensor workspace_for(cuda::ElementType type, const at::Tensor& q, const at::Tensor& queue) {
  return at::empty({cuda::moco_infonce_workspace_size(type, q.size(0), queue.size(0), q.size(1))},
                   q.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> moco_infonce_cuda(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& queue, double temperature) {
  check_moco_args("moco_infonce", q, k, queue, temperature);
  const cuda::ElementType type = element_type("moco_infonce", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), queuec = queue.contiguous();
  at::Tensor loss = at::empty({q.size(0)}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty_like(loss);
  at::Tensor workspace = workspace_for(type, q, queue);
  check_launch("moco_infonce",
               cuda::moco_infonce_forward(type, qc.const_data_ptr(), kc.const_data_ptr(), queuec.const_data_ptr(),
                                          q.size(0), queue.size(0), q.size(1), static_cast<float>(1.0 / temperature),
                                          loss.data_ptr<float>(), lse.data_ptr<float>(), workspace.data_ptr<float>(),
                                          at::cuda::getCurrentCUDAStream()));
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> moco_infonce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& q,
                                                              const at::Tensor& k, const at::Tensor& queue,
                                                              const at::Tensor& lse, double temperature) {
  check_moco_args("moco_infonce_backward", q, k, queue, temperature);
  check_moco_row_vector("grad_loss", grad_loss, q);
  check_moco_row_vector("lse", lse, q);
  const cuda::ElementType type = element_type("moco_infonce_backward", q);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), queuec = queue.contiguous();
  const at::Tensor gc = grad_loss.contiguous(), lsec = lse.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor workspace = workspace_for(type, q, queue);
  const cudaError_t err = cuda::moco_infonce_backward(
      type, gc.const_data_ptr<float>(), qc.const_data_ptr(), kc.const_data_ptr(), queuec.const_data_ptr(),
      lsec.const_data_ptr<float>(), q.size(0), queue.size(0), q.size(1), static_cast<float>(1.0 / temperature),
      grad_q.data_ptr(), grad_k.data_ptr(), workspace.data_ptr<float>(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK_VALUE(err != cudaErrorInvalidValue, "moco_infonce_backward: D = ", q.size(1),
                    " is too large for the shared-memory gradient accumulator of this GPU");
  check_launch("moco_infonce_backward", err);
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(astrea, CUDA, m) {
  m.impl("moco_infonce", &moco_infonce_cuda);
  m.impl("moco_infonce_backward", &moco_infonce_backward_cuda);
  m.impl("moco_logits", &moco_logits_cuda);
}

}  // namespace astrea
