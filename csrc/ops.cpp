// torch.ops.mgpo.*: schemas (the kernels register in cpu/ops_cpu.cpp and cuda/ops_cuda.cu; the fake/meta
// implementations are registered from Python in mgpo_kernels/backends/cpp.py), plus a small Python module
// mgpo_kernels._C with build information.
//
// One MGPO step = reduce_sums -> (reduce_hook on the float64 sums) -> scalar_stage -> update.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace mgpo {
namespace cpu {
const char* current_isa_name();
std::vector<std::string> available_isas();
void set_isa(const std::string& name);
}  // namespace cpu
}  // namespace mgpo

TORCH_LIBRARY(mgpo, m) {
  // Pass 1: float64 sums of base.py's layout, [|g|^2, <m,g>, |m|^2, |m|^2 without grad] per group, from
  // deterministic per-chunk partials. Tensors are listed group by group (group_index non-decreasing).
  m.def("reduce_sums(Tensor?[] grads, Tensor[] exp_avgs, int[] group_index, int num_groups) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Scalar stage (one block on CUDA): returns scal = float32 [c, restore, apply, skip] and, unless the step
  // is skipped, updates gstate (step, gbar, coef) and increments the step counts of the tensors with a
  // gradient; a skipped step increments only gstate.skipped.
  m.def(
      "scalar_stage(Tensor sums, float[] beta1s, Tensor(a!) gstep, Tensor(b!) gbar, Tensor(c!) coef, "
      "Tensor(d!) skipped, Tensor(e!)[] steps, Tensor? grad_scale, Tensor? found_inf, float rho, float ema_beta, "
      "bool adaptive_norm, float sign, float? max_grad_norm, bool perturbed, float gbar_floor=0.0) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Pass 2: restore, AdamW, re-perturb; writes params, masters, exp_avgs, exp_avg_sqs (nothing when skip).
  // masters holds only the fp32 master copies (of bf16/fp16 params): master_index[i] is the position of
  // tensor i's master in it, or -1 (a mutable list may not contain None under torch.compile's functionalization).
  // Per-group hyper-parameters (lr: float, or a one-element tensor read on the device when given).
  m.def(
      "update(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] masters, int[] master_index, Tensor[] steps, Tensor scal, int[] group_index, float[] lrs, "
      "Tensor?[] lr_tensors, float[] beta1s, float[] beta2s, float[] epss, float[] weight_decays) -> ()",
      {at::Tag::pt2_compliant_tag});
  // The three stages in one call (no reduce_hook), the common case: the tensor lists cross from Python once.
  // Returns the sums (as reduce_sums). All arguments are checked before anything is modified.
  m.def(
      "step(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] masters, int[] master_index, Tensor(e!)[] steps, int[] group_index, float[] lrs, "
      "Tensor?[] lr_tensors, float[] beta1s, float[] beta2s, float[] epss, float[] weight_decays, Tensor(f!) gstep, "
      "Tensor(g!) gbar, Tensor(h!) coef, Tensor(i!) skipped, Tensor? grad_scale, Tensor? found_inf, float rho, "
      "float ema_beta, bool adaptive_norm, float sign, float? max_grad_norm, bool perturbed, float gbar_floor=0.0) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The checks of `step`, alone: run before scalar_stage when a reduce_hook splits the step into three calls.
  m.def(
      "check_step(Tensor[] params, Tensor?[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, Tensor[] masters, "
      "int[] master_index, Tensor[] steps) -> ()",
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
}
