// Argument checks shared by the CPU and CUDA bindings. The Python wrappers in
// astrea/ops validate first with friendlier messages; these keep direct
// torch.ops.astrea.* calls from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <utility>
#include <vector>

#include <cstdint>
#include <optional>
#include <vector>

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

// logits [N, E] floating, 1 <= k <= E, scoring softmax or sigmoid, optional bias [E] floating
// on the logits' device.
inline void check_router_topk_args(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "router_topk: logits must be 2-D [N, E], got ", logits.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "router_topk: logits must be floating, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(k >= 1 && k <= logits.size(1), "router_topk: k must be in [1, ", logits.size(1), "], got ", k);
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid",
                    "router_topk: scoring must be 'softmax' or 'sigmoid', got '", scoring, "'");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == logits.size(1), "router_topk: bias must be [",
                      logits.size(1), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "router_topk: bias must be floating, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == logits.device(), "router_topk: bias must be on the logits' device ",
                      logits.device(), ", got ", bias->device());
  }
}

// The forward's saved indices [N, k] int32 and lse [N], and the incoming gradients
// grad_weights [N, k], grad_prob_sums [E], grad_lse [N], all fp32 (float64 for float64
// logits), on the logits' device.
inline void check_router_topk_backward_args(const at::Tensor& logits, const at::Tensor& indices,
                                            const at::Tensor& lse, const at::Tensor& grad_weights,
                                            const at::Tensor& grad_prob_sums, const at::Tensor& grad_lse,
                                            c10::string_view scoring) {
  const char* op = "router_topk_backward";
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D [N, E], got ", logits.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid", op,
                    ": scoring must be 'softmax' or 'sigmoid', got '", scoring, "'");
  const int64_t rows = logits.size(0);
  TORCH_CHECK_VALUE(indices.dim() == 2 && indices.size(0) == rows && indices.size(1) >= 1 &&
                        indices.size(1) <= logits.size(1),
                    op, ": indices must be [", rows, ", k] with 1 <= k <= ", logits.size(1), ", got ",
                    indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, op, ": indices must be int32, got ", indices.scalar_type());
  const auto expected = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::pair<const char*, const at::Tensor*> values[] = {
      {"lse", &lse}, {"grad_weights", &grad_weights}, {"grad_prob_sums", &grad_prob_sums}, {"grad_lse", &grad_lse}};
  const std::vector<int64_t> shapes[] = {{rows}, {rows, indices.size(1)}, {logits.size(1)}, {rows}};
  for (size_t i = 0; i < 4; ++i) {
    const auto& [name, tensor] = values[i];
    TORCH_CHECK_VALUE(tensor->sizes() == at::IntArrayRef(shapes[i]), op, ": ", name, " must have shape ",
                      at::IntArrayRef(shapes[i]), ", got ", tensor->sizes());
    TORCH_CHECK_TYPE(tensor->scalar_type() == expected, op, ": ", name, " must be ", expected, ", got ",
                     tensor->scalar_type());
  }
  for (const at::Tensor* tensor : {&indices, &lse, &grad_weights, &grad_prob_sums, &grad_lse}) {
    TORCH_CHECK_VALUE(tensor->device() == logits.device(), op, ": every input must be on the logits' device ",
                      logits.device(), ", got ", tensor->device());
  }
}

// indices [N, k] int32 on CPU; 1 <= num_experts. The range of the values is checked by the
// kernel in its histogram pass.
inline void check_moe_dispatch_args(const at::Tensor& indices, int64_t num_experts) {
  TORCH_CHECK_VALUE(indices.dim() == 2, "moe_dispatch: indices must be 2-D [N, k], got shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, "moe_dispatch: indices must be int32, got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= 8192, "moe_dispatch: num_experts must be in [1, 8192], got ",
                    num_experts);
  TORCH_CHECK_VALUE(indices.numel() <= INT32_MAX, "moe_dispatch: indices has N*k = ", indices.numel(),
                    " slots; at most ", INT32_MAX, " are supported");
}

// A 2-D floating [rows, D] tensor.
inline void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D [rows, D], got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                   t.scalar_type());
}

inline void check_int32(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

// x [N, D] floating, sorted_token_ids [M] int32.
inline void check_permute_args(const at::Tensor& x, const at::Tensor& sorted_token_ids) {
  check_rows("permute", "x", x);
  check_int32("permute", "sorted_token_ids", sorted_token_ids, 1);
}

// grad_out [N*k, D] floating, inverse_positions [N, k] int32.
inline void check_permute_backward_args(const at::Tensor& grad_out, const at::Tensor& inverse_positions) {
  check_rows("permute_backward", "grad_out", grad_out);
  check_int32("permute_backward", "inverse_positions", inverse_positions, 2);
}

// Every one of the `count` row numbers lies in [0, rows): the kernels use them as addresses.
inline void check_row_ids(const char* op, const char* name, const int32_t* ids, int64_t count, int64_t rows) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < rows, op, ": ", name, " must lie in [0, ", rows, "); got ", ids[i],
                      " at flat index ", i);
  }
}

// expert_out [N*k, D] floating; weights, indices (int32) and inverse_positions (int32) [N, k];
// expert_scale [E] floating or absent.
inline void check_weighted_combine_args(const char* op, const at::Tensor& expert_out, const at::Tensor& weights,
                                        const at::Tensor& indices, const at::Tensor& inverse_positions,
                                        const std::optional<at::Tensor>& expert_scale, int64_t num_experts) {
  check_rows(op, "expert_out", expert_out);
  check_int32(op, "indices", indices, 2);
  TORCH_CHECK_VALUE(weights.sizes() == indices.sizes() && inverse_positions.sizes() == indices.sizes(), op,
                    ": weights and inverse_positions must have the shape of indices ", indices.sizes(), ", got ",
                    weights.sizes(), " and ", inverse_positions.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), op, ": weights must be a floating tensor, got ",
                   weights.scalar_type());
  check_int32(op, "inverse_positions", inverse_positions, 2);
  TORCH_CHECK_VALUE(expert_out.size(0) == indices.numel(), op, ": expert_out must have N*k = ", indices.numel(),
                    " rows, got ", expert_out.size(0));
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  if (expert_scale.has_value()) {
    TORCH_CHECK_VALUE(expert_scale->dim() == 1 && expert_scale->size(0) == num_experts, op,
                      ": expert_scale must be [", num_experts, "], got ", expert_scale->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(expert_scale->scalar_type()), op,
                     ": expert_scale must be a floating tensor, got ", expert_scale->scalar_type());
  }
}

// grad_out [N, D] of expert_out's dtype.
inline void check_combine_grad(const at::Tensor& grad_out, const at::Tensor& expert_out, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == indices.size(0) &&
                        grad_out.size(1) == expert_out.size(1),
                    "weighted_combine_backward: grad_out must be [", indices.size(0), ", ", expert_out.size(1),
                    "], got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == expert_out.scalar_type(),
                   "weighted_combine_backward: grad_out must have expert_out's dtype ", expert_out.scalar_type(),
                   ", got ", grad_out.scalar_type());
}

// Each of the `count` row numbers in [0, count) appears once, so every row has one writer.
inline void check_permutation(const char* op, const char* name, const int32_t* ids, int64_t count) {
  std::vector<char> seen(count, 0);
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < count && !seen[ids[i]], op, ": ", name,
                      " must be a permutation of [0, ", count, "); got ", ids[i], " at flat index ", i);
    seen[ids[i]] = 1;
  }
}

// branch [B, ..., D] floating (at least 2-D), base absent or of branch's shape, dtype and
// device; p in (0, 1]; seed, offset >= 0; granularity "token" or "sample".
inline void check_stochastic_residual_args(const std::optional<at::Tensor>& base, const at::Tensor& branch,
                                           double keep_p, int64_t seed, int64_t offset,
                                           c10::string_view granularity) {
  const char* op = "stochastic_residual";
  TORCH_CHECK_VALUE(branch.dim() >= 2, op, ": the branch must be [B, ..., D] (at least 2-D), got shape ",
                    branch.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(branch.scalar_type()), op, ": the branch must be a floating tensor, got ",
                   branch.scalar_type());
  if (base.has_value()) {
    TORCH_CHECK_VALUE(base->sizes() == branch.sizes(), op, ": the base must have the branch's shape ",
                      branch.sizes(), ", got ", base->sizes());
    TORCH_CHECK_TYPE(base->scalar_type() == branch.scalar_type(), op, ": the base must have the branch's dtype ",
                     branch.scalar_type(), ", got ", base->scalar_type());
    TORCH_CHECK_VALUE(base->device() == branch.device(), op, ": base and branch must be on one device, got ",
                      base->device(), " and ", branch.device());
  }
  TORCH_CHECK_VALUE(keep_p > 0.0 && keep_p <= 1.0, op, ": p (the keep probability) must be in (0, 1], got ",
                    keep_p);
  TORCH_CHECK_VALUE(seed >= 0 && offset >= 0, op, ": seed and offset must be >= 0, got ", seed, " and ", offset);
  TORCH_CHECK_VALUE(granularity == "token" || granularity == "sample", op,
                    ": granularity must be 'token' or 'sample', got '", granularity, "'");
}

// experts: 1 or more tensors [B, ..., D] of one shape and floating dtype on one device;
// coef [B, E] floating on that device.
inline void check_dense_combine_args(const char* op, at::TensorList experts, const at::Tensor& coef) {
  TORCH_CHECK_VALUE(!experts.empty(), op, ": experts must hold at least one tensor, got none");
  const at::Tensor& first = experts[0];
  TORCH_CHECK_VALUE(first.dim() >= 2, op, ": experts[0] must be [B, ..., D] (at least 2-D), got shape ",
                    first.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(first.scalar_type()), op, ": experts must be floating, got ",
                   first.scalar_type());
  for (size_t e = 1; e < experts.size(); ++e) {
    TORCH_CHECK_VALUE(experts[e].sizes() == first.sizes(), op, ": experts[", e, "] must have the shape of experts[0] ",
                      first.sizes(), ", got ", experts[e].sizes());
    TORCH_CHECK_TYPE(experts[e].scalar_type() == first.scalar_type(), op, ": experts[", e,
                     "] must have the dtype of experts[0] ", first.scalar_type(), ", got ", experts[e].scalar_type());
    TORCH_CHECK_VALUE(experts[e].device() == first.device(), op, ": experts[", e, "] must be on ", first.device(),
                      ", got ", experts[e].device());
  }
  const int64_t num_experts = static_cast<int64_t>(experts.size());
  TORCH_CHECK_VALUE(coef.dim() == 2 && coef.size(0) == first.size(0) && coef.size(1) == num_experts, op,
                    ": coef must be [B, E] = [", first.size(0), ", ", num_experts, "], got ", coef.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(coef.scalar_type()), op, ": coef must be floating, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.device() == first.device(), op, ": coef must be on ", first.device(), ", got ",
                    coef.device());
}

// The incoming gradient of the dense combine: the experts' shape, dtype and device.
inline void check_dense_combine_grad(const at::Tensor& grad, const at::Tensor& expert) {
  TORCH_CHECK_VALUE(grad.sizes() == expert.sizes(), "dense_combine_backward_cpu: grad must have the experts' shape ",
                    expert.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == expert.scalar_type(),
                   "dense_combine_backward_cpu: grad must have the experts' dtype ", expert.scalar_type(), ", got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == expert.device(), "dense_combine_backward_cpu: grad must be on ",
                    expert.device(), ", got ", grad.device());
}

}  // namespace astrea
