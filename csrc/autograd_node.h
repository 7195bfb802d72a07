// Pieces shared by the hand-written autograd Nodes of maep_fast's differentiable ops
// (patch_recon_loss_autograd.cpp, masked_patch_attention_cpu.cpp).
//
// The ops record their graph the way torch's generated VariableType code does: one Node
// subclass with SavedVariable and plain members, next edges from the inputs, history on the
// output. Recording through a torch::autograd::Function instead (CppNode + AutogradContext +
// saved_data hash map + _wrap_outputs) costs about one more torch.add of host time per call
// on a small tensor, more than the ops' host-cost budget (a few torch.adds per call) allows.
//
// torch < 2.13 holds Nodes in std::shared_ptr (made with torch::autograd::deleteNode, which
// frees long chains without recursing), torch >= 2.13 in c10::intrusive_ptr.
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/version.h>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace maep_fast {

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
using NodeHolder = c10::intrusive_ptr<torch::autograd::Node>;
template <class N>
c10::intrusive_ptr<N> make_node() {
  return c10::make_intrusive<N>();
}
#else
using NodeHolder = std::shared_ptr<torch::autograd::Node>;
template <class N>
std::shared_ptr<N> make_node() {
  return std::shared_ptr<N>(new N(), torch::autograd::deleteNode);
}
#endif
static_assert(std::is_same_v<NodeHolder, decltype(torch::autograd::Edge::function)>,
              "this torch holds autograd Nodes differently: update make_node");

// Compiled autograd (torch._dynamo.compiled_autograd) runs a Node's backward as a pure
// function of (grads, packed arguments), bound to the compiler once per process under
// `name` and proxied into the compiled graph, as torch's generated Nodes do.
inline torch::autograd::variable_list compiled_apply_functional(
    torch::autograd::SwapSavedVariables& saved, const std::string& name, bool& bound,
    torch::autograd::functional_apply_t fn, const std::vector<at::TypePtr>& schema,
    const torch::autograd::PackedArgs& args, const torch::autograd::edge_list& next_edges,
    const torch::autograd::variable_list& grads) {
  const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
  if (!bound) {
    bound = true;
    py->bind_function(saved.get_py_compiler(), name, std::move(fn), schema);
  }
  const auto output_metadata =
      torch::dynamo::autograd::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          torch::dynamo::autograd::get_input_metadata(next_edges));
  return py->call_function(saved.get_py_compiler(), "apply_functional", name, grads, args.vec(), output_metadata);
}

}  // namespace maep_fast
