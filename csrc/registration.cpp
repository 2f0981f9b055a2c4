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
}
