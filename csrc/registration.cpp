// Operator schemas of the astrea library. Kernels register themselves per device in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA); fake (meta) implementations and
// autograd formulas are registered from Python in astrea/ops/.
#include <Python.h>

#include <torch/library.h>

// An importable module object with no Python API: importing astrea._C runs the
// static TORCH_LIBRARY registrations below (pattern of pytorch/extension-cpp).
// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(astrea, m) {
  // Ring-buffer write of `keys` into `queue` starting at row ptr[0], wrapping around;
  // advances ptr by keys.size(0) modulo queue.size(0). Reads ptr on the device that
  // holds it, so a CUDA enqueue never synchronises with the host.
  m.def("queue_enqueue_(Tensor(a!) queue, Tensor(b!) ptr, Tensor keys) -> ()");
  // CPU kernels of Triton ops (astrea/ops/dispatch.py, combine.py): the same semantics as
  // the Python custom ops astrea::moe_dispatch, permute, permute_backward, weighted_combine
  // and weighted_combine_backward, which call them on CPU tensors.
  m.def("moe_dispatch_cpu(Tensor indices, int num_experts) "
        "-> (Tensor sorted_token_ids, Tensor expert_offsets, Tensor inverse_positions)");
  m.def("permute_cpu(Tensor x, Tensor sorted_token_ids) -> Tensor");
  m.def("permute_backward_cpu(Tensor grad_out, Tensor inverse_positions) -> Tensor");
  m.def("weighted_combine_cpu(Tensor expert_out, Tensor weights, Tensor indices, Tensor inverse_positions, "
        "Tensor? expert_scale, int num_experts) -> Tensor");
  m.def("weighted_combine_backward_cpu(Tensor grad_out, Tensor expert_out, Tensor weights, Tensor indices, "
        "Tensor inverse_positions, Tensor? expert_scale, int num_experts) "
        "-> (Tensor grad_expert_out, Tensor grad_weights, Tensor grad_expert_scale)");
  // The dense weighted combine on CPU tensors (the Python ops astrea::dense_weighted_combine and
  // dense_combine_backward run it under the auto backend): out[b] = sum_e coef[b, e] * experts[e][b]
  // in expert order in fp32 (float64 for float64), experts with a zero coefficient skipped;
  // the backward gives coef[b, e] * grad[b] per expert (or no tensors) and d coef [B, E] in
  // coef's dtype (or an empty tensor).
  m.def("dense_combine_cpu(Tensor[] experts, Tensor coef) -> Tensor");
  m.def("dense_combine_backward_cpu(Tensor grad, Tensor[] experts, Tensor coef, bool expert_grad, bool coef_grad) "
        "-> (Tensor[] grad_experts, Tensor grad_coef)");
  // The stochastic residual on CPU tensors (the Python ops astrea::stochastic_residual and
  // stochastic_residual_backward run it under the auto backend): base + m * branch / p, or
  // m * branch / p without a base, in the branch's shape and dtype; the mask is the Triton
  // kernel's Philox draw keyed by (seed, offset + unit), bit for bit.
  m.def("stochastic_residual_cpu(Tensor? base, Tensor branch, float p, int seed, int offset, str granularity, "
        "bool training) -> Tensor");
  // MoCo logits [N, 1 + K] in fp32 (float64 for float64 inputs): column 0 is q.k / T,
  // column 1 + j is q.queue[j] / T.
  m.def("moco_logits(Tensor q, Tensor k, Tensor queue, float temperature) -> Tensor");
  // Per-row InfoNCE loss (label 0) over those logits and the row log-sum-exp, computed
  // tile by tile over the queue; no [N, K] tensor is ever allocated.
  m.def("moco_infonce(Tensor q, Tensor k, Tensor queue, float temperature) "
        "-> (Tensor loss, Tensor lse)");
  // Gradients of sum(grad_loss * loss) w.r.t. q and k, recomputing the logits tiles from
  // the saved lse; the queue is a buffer and gets no gradient.
  m.def("moco_infonce_backward(Tensor grad_loss, Tensor q, Tensor k, Tensor queue, Tensor lse, "
        "float temperature) -> (Tensor grad_q, Tensor grad_k)");
  // Fused MoE router on CPU tensors (the Python op astrea::router_topk runs it under the
  // auto backend): top-k of softmax or sigmoid scores with an optional selection bias;
  // weights [N, k], indices [N, k] int32, counts [E] int32, prob_sums [E], lse [N], all
  // floating outputs fp32 (float64 for float64 logits).
  m.def("router_topk_cpu(Tensor logits, int k, str scoring, bool renormalize, Tensor? bias) "
        "-> (Tensor weights, Tensor indices, Tensor counts, Tensor prob_sums, Tensor lse)");
  // grad_logits (logits' dtype, contiguous) of sum(grad_weights * weights) +
  // sum(grad_prob_sums * prob_sums) + sum(grad_lse * lse), by the closed form of
  // kernels/router.py.
  m.def("router_topk_backward_cpu(Tensor logits, Tensor indices, Tensor lse, Tensor grad_weights, "
        "Tensor grad_prob_sums, Tensor grad_lse, str scoring, bool renormalize) -> Tensor");
}
