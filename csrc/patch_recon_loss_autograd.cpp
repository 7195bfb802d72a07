// Autograd of maep_fast::patch_recon_loss at the Autograd key (any backend: CPU, CUDA,
// Meta / fake for torch.compile): forward runs the backend kernel below autograd and,
// when a gradient is to be recorded, a PatchReconLossBackward node saves (pred, imgs,
// mask); its backward runs patch_recon_loss_backward -> (d pred, d imgs). The mask is
// data (which patches count) and gets no gradient.
//
// In C++ rather than torch.library.register_autograd in Python: a Python autograd
// kernel runs Python on every call, with or without gradients (about 4 us on a tiny
// CPU tensor, three times a torch.add); here a call that needs no gradient goes straight
// to the kernel, and one that does builds one node (autograd_node.h).
#include "autograd_node.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <mutex>
#include <string>

namespace maep_fast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using FwdFn = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, bool,
                         int64_t, c10::string_view);
using BwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const c10::optional<at::Tensor>&, int64_t, bool, int64_t,
                                                 c10::string_view);

const c10::TypedOperatorHandle<FwdFn>& fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("maep_fast::patch_recon_loss", "").typed<FwdFn>();
  return op;
}
const c10::TypedOperatorHandle<BwdFn>& bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("maep_fast::patch_recon_loss_backward", "").typed<BwdFn>();
  return op;
}

// (d pred, d imgs), each only where needed; shared by the node and its compiled-autograd form.
variable_list prl_backward(const at::Tensor& grad, bool need_pred, bool need_imgs, const at::Tensor& pred,
                           const at::Tensor& imgs, const c10::optional<at::Tensor>& mask, int64_t patch_size,
                           bool norm_pix, int64_t p, const std::string& reduction) {
  if (!grad.defined() || !(need_pred || need_imgs)) return {at::Tensor(), at::Tensor()};
  auto [gp, gi] = bwd_op().call(grad.contiguous(), pred, imgs, mask, patch_size, norm_pix, p, reduction);
  return {need_pred ? gp : at::Tensor(), need_imgs ? gi : at::Tensor()};
}

variable_list prl_backward_packed(const variable_list& grads, const std::vector<c10::IValue>& args) {
  torch::autograd::PackedArgs r(args);
  const auto need_pred = r.unpack<bool>();
  const auto need_imgs = r.unpack<bool>();
  const auto pred = r.unpack<at::Tensor>();
  const auto imgs = r.unpack<at::Tensor>();
  const auto mask = r.unpack<std::optional<at::Tensor>>();
  const auto patch_size = r.unpack<int64_t>();
  const auto norm_pix = r.unpack<bool>();
  const auto p = r.unpack<int64_t>();
  const auto reduction = r.unpack<std::string>();
  return prl_backward(grads[0], need_pred, need_imgs, pred, imgs, mask, patch_size, norm_pix, p, reduction);
}

struct PatchReconLossBackward : torch::autograd::Node {
  SavedVariable pred_, imgs_, mask_;
  bool has_mask = false;
  int64_t patch_size = 0;
  bool norm_pix = false;
  int64_t p = 0;
  std::string reduction;

  std::string name() const override { return "PatchReconLossBackward"; }

  c10::optional<at::Tensor> mask() const {
    return has_mask ? c10::optional<at::Tensor>(mask_.unpack()) : c10::nullopt;
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return prl_backward(grads[0], task_should_compute_output(0), task_should_compute_output(1), pred_.unpack(),
                        imgs_.unpack(), mask(), patch_size, norm_pix, p, reduction);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    pred_.reset_data();
    imgs_.reset_data();
    mask_.reset_data();
  }

  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    args.collect(pred_, false);
    args.collect(imgs_, false);
    args.collect(mask_, false);
    args.collect(has_mask);
    args.collect(patch_size);
    args.collect(norm_pix);
    args.collect(p);
    args.collect(reduction);
  }

  variable_list apply_with_saved(const variable_list& grads, torch::autograd::SwapSavedVariables& saved) override {
    using torch::dynamo::autograd::IValuePacker;
    saved.before(pred_);
    saved.before(imgs_);
    saved.before(mask_);
    torch::autograd::PackedArgs args;
    args.pack(task_should_compute_output(0));
    args.pack(task_should_compute_output(1));
    args.pack(pred_.unpack());
    args.pack(imgs_.unpack());
    args.pack(mask());
    args.pack(patch_size);
    args.pack(norm_pix);
    args.pack(p);
    args.pack(reduction);
    static bool bound = false;
    auto result = compiled_apply_functional(
        saved, "maep_fast_" + name(), bound, prl_backward_packed,
        {IValuePacker<bool>::packed_type(), IValuePacker<bool>::packed_type(), IValuePacker<at::Tensor>::packed_type(),
         IValuePacker<at::Tensor>::packed_type(), IValuePacker<std::optional<at::Tensor>>::packed_type(),
         IValuePacker<int64_t>::packed_type(), IValuePacker<bool>::packed_type(),
         IValuePacker<int64_t>::packed_type(), IValuePacker<std::string>::packed_type()},
        args, next_edges(), grads);
    saved.after(pred_);
    saved.after(imgs_);
    saved.after(mask_);
    return result;
  }
};

at::Tensor patch_recon_loss_autograd(const at::Tensor& pred, const at::Tensor& imgs,
                                     const c10::optional<at::Tensor>& mask, int64_t patch_size, bool norm_pix,
                                     int64_t p, c10::string_view reduction) {
  const bool record = at::GradMode::is_enabled() && (pred.requires_grad() || imgs.requires_grad());
  at::Tensor loss;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    loss = fwd_op().call(pred, imgs, mask, patch_size, norm_pix, p, reduction);
  }
  if (!record) return loss;
  TORCH_CHECK_NOT_IMPLEMENTED(!(pred._fw_grad(0).defined() || imgs._fw_grad(0).defined()),
                              "maep_fast::patch_recon_loss: forward-mode AD is not implemented");
  auto node = make_node<PatchReconLossBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(pred, imgs));
  node->pred_ = SavedVariable(pred, false);
  node->imgs_ = SavedVariable(imgs, false);
  node->has_mask = mask.has_value() && mask->defined();
  if (node->has_mask) node->mask_ = SavedVariable(*mask, false);
  node->patch_size = patch_size;
  node->norm_pix = norm_pix;
  node->p = p;
  node->reduction = std::string(reduction);
  torch::autograd::set_history(loss, node);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(maep_fast, Autograd, m) { m.impl("patch_recon_loss", &patch_recon_loss_autograd); }

}  // namespace maep_fast
