// Autograd of maep_fast::patch_recon_loss at the Autograd key (any backend: CPU, CUDA,
// Meta / fake for torch.compile): forward runs the backend kernel below autograd and
// saves (pred, imgs, mask); backward runs patch_recon_loss_backward -> (d pred, d imgs).
// The mask is data (which patches count) and gets no gradient.
//
// In C++ rather than torch.library.register_autograd in Python: a Python autograd
// kernel runs Python on every call, with or without gradients (about 4 us on a tiny
// CPU tensor, three times a torch.add); here a call that needs no gradient goes straight
// to the kernel.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

namespace maep_fast {
namespace {

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

constexpr c10::string_view kReductions[] = {"mean", "sum", "per_sample", "none"};

int64_t reduction_index(c10::string_view reduction) {
  for (int64_t i = 0; i < 4; ++i) {
    if (kReductions[i] == reduction) return i;
  }
  TORCH_CHECK(false, "maep_fast::patch_recon_loss: reduction must be 'mean', 'sum', 'per_sample' or 'none', got '",
              std::string(reduction), "'");
}

class PatchReconLossFunction : public torch::autograd::Function<PatchReconLossFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& imgs,
                            const c10::optional<at::Tensor>& mask, int64_t patch_size, bool norm_pix, int64_t p,
                            c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor loss = fwd_op().call(pred, imgs, mask, patch_size, norm_pix, p, reduction);
    const bool has_mask = mask.has_value() && mask->defined();
    ctx->save_for_backward({pred, imgs, has_mask ? *mask : at::Tensor()});
    // One saved entry (each costs a hash-map insert per call): the schema's small arguments packed,
    // the reduction as its index in kReductions.
    ctx->saved_data["args"] =
        c10::IValue(std::vector<int64_t>{patch_size, norm_pix, p, has_mask, reduction_index(reduction)});
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto args = ctx->saved_data["args"].toIntVector();  // patch_size, norm_pix, p, has_mask
    const c10::optional<at::Tensor> mask = args[3] ? c10::optional<at::Tensor>(saved[2]) : c10::nullopt;
    at::Tensor go = grads[0];
    if (!go.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                               at::Tensor()};
    auto [gp, gi] = bwd_op().call(go.contiguous(), saved[0], saved[1], mask, args[0], args[1] != 0, args[2],
                                  kReductions[args[4]]);
    return {ctx->needs_input_grad(0) ? gp : at::Tensor(), ctx->needs_input_grad(1) ? gi : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor patch_recon_loss_autograd(const at::Tensor& pred, const at::Tensor& imgs,
                                     const c10::optional<at::Tensor>& mask, int64_t patch_size, bool norm_pix,
                                     int64_t p, c10::string_view reduction) {
  if (!at::GradMode::is_enabled() || !(pred.requires_grad() || imgs.requires_grad())) {
    // No graph to record: skip the autograd Function's node and context.
    at::AutoDispatchBelowADInplaceOrView guard;
    return fwd_op().call(pred, imgs, mask, patch_size, norm_pix, p, reduction);
  }
  return PatchReconLossFunction::apply(pred, imgs, mask, patch_size, norm_pix, p, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(maep_fast, Autograd, m) { m.impl("patch_recon_loss", &patch_recon_loss_autograd); }

}  // namespace maep_fast
