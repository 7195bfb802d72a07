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
  // The same with one step_size / eps for every sample, as numbers: the eager loops' call
  // (nothing allocated or copied per call for them).
  m.def(
      "pgd_step.scalar(Tensor x, Tensor grad, Tensor x0, float step_size, float eps, str norm, int direction, "
      "float clamp_min, float clamp_max) -> Tensor");
  m.def(
      "pgd_step_.scalar(Tensor(a!) x, Tensor grad, Tensor x0, float step_size, float eps, str norm, "
      "int direction, float clamp_min, float clamp_max) -> ()");

  // Patch reconstruction loss; contract: maep_fast/ops/patch_recon_loss.py (module docstring).
  // pred and imgs share one dtype here (the Python entry point promotes). Differentiable w.r.t.
  // pred and imgs (C++ autograd node, patch_recon_loss_autograd.cpp) through
  // patch_recon_loss_backward -> (grad_pred, grad_imgs).
  m.def(
      "patch_recon_loss(Tensor pred, Tensor imgs, Tensor? mask, int patch_size, bool norm_pix, int p, "
      "str reduction) -> Tensor");
  m.def(
      "patch_recon_loss_backward(Tensor grad_out, Tensor pred, Tensor imgs, Tensor? mask, int patch_size, "
      "bool norm_pix, int p, str reduction) -> (Tensor, Tensor)");

  // Attention over visible patches; contract: maep_fast/ops/masked_patch_attention.py.
  // masked_patch_attention is the public differentiable op (out only): CPU / CUDA
  // kernels, and a hand-written C++ autograd node at the Autograd key that runs
  // masked_patch_attention_fwd -> (out, lse), saves lse (per-row logsumexp, fp32;
  // fp64 for fp64 inputs; 0 for hidden query rows) and backpropagates through
  // masked_patch_attention_bwd. _fwd is also differentiable on its own (autograd
  // registered in maep_fast/ops/_native_ops.py).
  m.def("masked_patch_attention(Tensor q, Tensor k, Tensor v, Tensor? keep, float scale) -> Tensor");
  m.def(
      "masked_patch_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? keep, float scale) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "masked_patch_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? keep, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
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
