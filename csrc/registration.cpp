// Op schemas of the maep_fast library and the (empty) Python module maep_fast._C.
//
// Importing maep_fast._C loads this shared object, whose static initializers
// run the TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations; the module itself
// exposes nothing. No pybind11, no torch/extension.h: plain Python C API.
//
// This is the ONLY TORCH_LIBRARY(maep_fast, ...) block; other sources add
// schemas with TORCH_LIBRARY_FRAGMENT(maep_fast, m) and kernels with
// TORCH_LIBRARY_IMPL(maep_fast, <CPU|CUDA>, m).
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(maep_fast, m) {
  // Fused PGD / purification step; step_size and eps are per-sample [B]
  // tensors in the compute dtype (float32, float64 for float64 inputs).
  m.def(
      "pgd_step(Tensor x, Tensor grad, Tensor x0, Tensor step_size, Tensor eps, str norm, int direction, "
      "float clamp_min, float clamp_max) -> Tensor");
  m.def(
      "pgd_step_(Tensor(a!) x, Tensor grad, Tensor x0, Tensor step_size, Tensor eps, str norm, int direction, "
      "float clamp_min, float clamp_max) -> ()");
}

namespace {
PyModuleDef maep_fast_c_module = {
    PyModuleDef_HEAD_INIT,
    "maep_fast._C",
    "Native maep_fast operators; importing this module registers torch.ops.maep_fast.*",
    -1,
    nullptr,
};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&maep_fast_c_module); }
