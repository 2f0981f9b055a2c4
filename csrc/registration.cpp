// The astrea library (TORCH_LIBRARY: one per namespace and process) with the schemas of the
// ops that have both a CPU and a CUDA kernel, registered per device in csrc/cpu/*.cpp and
// csrc/cuda/*.cpp. A CPU-only kernel of a Triton op (moe.cpp, dense_combine.cpp, residual.cpp,
// router.cpp in csrc/cpu/) defines its schemas in a TORCH_LIBRARY_FRAGMENT beside its
// TORCH_LIBRARY_IMPL, so that changing such an op touches one file; the dispatcher takes the
// library, fragments and kernels in any static-initialisation order. Fake (meta)
// implementations and autograd formulas are registered from Python in astrea/ops/.
#include <Python.h>

#include <torch/library.h>

// An importable module object with no Python API: importing astrea._C runs the
// static registrations of every file in it (pattern of pytorch/extension-cpp).
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
}
