// torch.ops.mgpo.*: schemas (the kernels register in cpu/ops_cpu.cpp and cuda/ops_cuda.cu through
// device_ops.h; the fake implementations are registered from Python in mgpo_kernels/backends/cpp.py), plus a
// small Python module mgpo_kernels._C with build information, the hyper-parameter table's layout and the host
// path's helpers (host_path.cpp: KeptPlan and the host cache's reads).
//
// One MGPO step = pass 1 -> (reduce_hook on the float64 sums) -> scalar stage -> pass 2.
#include <pybind11/pybind11.h>  // Python.h first
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "step_plan.h"

namespace mgpo {
namespace cpu {
const char* current_isa_name();
std::vector<std::string> available_isas();
void set_isa(const std::string& name);
}  // namespace cpu
void bind_host_path(pybind11::module_& m);  // host_path.cpp
}  // namespace mgpo

// The step plan's arguments (csrc/step_plan.h; mgpo_kernels/backends/plan.py builds them), with the alias
// annotations of the tensors an op writes when `mutable_` is set.
static std::string plan_args(bool mutable_) {
  const auto w = [&](const char* tag) { return mutable_ ? std::string("(") + tag + "!)" : std::string(); };
  return "Tensor" + w("a") + "[] params, Tensor?[] grads, Tensor" + w("b") + "[] exp_avgs, Tensor" + w("c") +
         "[] exp_avg_sqs, Tensor" + w("d") + "[] masters, int[] master_index, Tensor" + w("e") +
         "[] steps, int[] group_sizes, Tensor hyper, Tensor?[] lr_tensors, Tensor" + w("f") +
         "[] gstate, Tensor? grad_scale, Tensor? found_inf";
}

TORCH_LIBRARY(mgpo, m) {
  // The fused step: pass 1 (float64 sums, base.py's layout, from deterministic per-chunk partials), the scalar
  // stage (clip/unscale factor, gbar, the new coefficient, the skip flag; updates gstate and the step counts of
  // the tensors with a gradient, or only gstate.skipped), pass 2 (restore, AdamW: theta at rest). Returns the sums.
  m.def(("step(" + plan_args(true) + ") -> Tensor").c_str(), {at::Tag::pt2_compliant_tag});
  // The same step in two calls, for a reduce_hook (an all-reduce) on the sums in between.
  m.def(("reduce_sums(" + plan_args(false) + ") -> Tensor").c_str(), {at::Tag::pt2_compliant_tag});
  m.def(("finish_step(" + plan_args(true) + ", Tensor sums) -> ()").c_str(), {at::Tag::pt2_compliant_tag});
  // The apply pass of the training forward: p = theta + coef*m (apply); eval()'s removal: theta. The step's math.
  m.def("perturb(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] masters, int[] master_index, Tensor coef, "
        "bool apply) -> ()",
        {at::Tag::pt2_compliant_tag});
}

#ifdef MGPO_WITH_CUDA
static constexpr bool kCudaBuilt = true;
#else
static constexpr bool kCudaBuilt = false;
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MGPO fused kernels (torch.ops.mgpo.*)";
  m.attr("cuda_built") = kCudaBuilt;
  m.def("cpu_isa", []() { return std::string(mgpo::cpu::current_isa_name()); },
        "Instruction set of the CPU kernels in use (MGPO_CPU_ISA=base|avx2|avx512 picks one at load time)");
  m.def("available_cpu_isas", &mgpo::cpu::available_isas, "Instruction sets this CPU can run");
  m.def("set_cpu_isa", &mgpo::cpu::set_isa, "Switch the CPU kernels' instruction set (tests and benchmarks)");
  m.attr("HYPER_OPTION_COUNT") = (int)mgpo::kHyperOptions;
  m.attr("HYPER_GROUP_COUNT") = (int)mgpo::kHyperPerGroup;
  mgpo::bind_host_path(m);
}
