// The step plan: what every op of torch.ops.mgpo.* takes, checked once and turned into the raw pointers and
// per-group values that the CPU and CUDA stages use (a CheckedPlan: they check nothing of it again).
//
// The op arguments (schemas in ops.cpp; built in Python by mgpo_kernels/backends/plan.py):
//   params, grads?, exp_avgs, exp_avg_sqs   the tensors of all groups, group by group
//   masters, master_index                   fp32 master copies of bf16/fp16 params; master_index[i] is the
//                                           position of tensor i's master in masters, or -1
//   steps                                   per-tensor AdamW step counts (one float32 each, on the device)
//   group_sizes                             tensors per group (the group of tensor i follows from it)
//   hyper                                   float64 CPU table, layout below
//   lr_tensors?                             per group: a tensor lr read on the device at every step, or None
//   gstate                                  [step, gbar, coef (float32), skipped (int64)], on the device
//   grad_scale?, found_inf?                 GradScaler's inputs
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <optional>
#include <vector>

#include "mgpo_math.h"
#include "plan_tensor.h"

namespace mgpo {

using OptTensorList = c10::List<std::optional<at::Tensor>>;

// Layout of `hyper`: kHyperOptions optimizer-wide values, then kHyperPerGroup values per group
// (mgpo_kernels/backends/plan.py writes it; a test compares the two layouts).
enum HyperOption {
  kHypRho = 0,
  kHypEmaBeta,
  kHypAdaptiveNorm,    // 0 or 1
  kHypSign,            // +1 "momentum", -1 "-momentum"
  kHypHasMaxGradNorm,  // 0 or 1
  kHypMaxGradNorm,
  kHypPerturbed,       // 0 or 1: the parameters hold theta + coef*m on entry (the forward applied eps)
  kHypGbarFloor,       // 0: the paper's unbounded formula
  kHyperOptions
};
enum HyperGroup { kHypLr = 0, kHypBeta1, kHypBeta2, kHypEps, kHypWeightDecay, kHyperPerGroup };

// Plain data: the CUDA update kernel takes a table of these by value.
struct PlanGroup {
  const float* lr_ptr;  // a tensor lr on the plan's device, read by the kernels at every step
  double beta1, beta2, eps, weight_decay;
  float lr;             // used when lr_ptr is nullptr
  float pad;
};

// The step plan after make_plan's checks: raw pointers and per-group values, what the stages run on.
struct CheckedPlan {
  at::Device device{at::kCPU};
  std::vector<PlanTensor> tensors;  // every tensor, group by group
  std::vector<PlanGroup> groups;
  std::vector<double> beta1s;       // per group, as the scalar stage takes them
  std::vector<float*> steps_with_grad;
  ScalarConfig cfg;
  float* gstep = nullptr;
  float* gbar = nullptr;
  float* coef = nullptr;
  int64_t* skipped = nullptr;
  const float* grad_scale = nullptr;  // nullptr when absent
  const float* found_inf = nullptr;
  std::vector<at::Tensor> keep_alive;  // copies the pointers above point into (scalars as float32 on the device,
                                       // gradients in their parameter's layout)
};

// The op arguments above, in schema order: one list for make_plan and every op's C++ signature (device_ops.h).
#define MGPO_PLAN_PARAMS                                                                                    \
  at::TensorList params, const OptTensorList &grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,   \
      at::TensorList masters, at::IntArrayRef master_index, at::TensorList steps, at::IntArrayRef group_sizes, \
      const at::Tensor &hyper, const OptTensorList &lr_tensors, at::TensorList gstate,                       \
      const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf
#define MGPO_PLAN_ARGS                                                                                        \
  params, grads, exp_avgs, exp_avg_sqs, masters, master_index, steps, group_sizes, hyper, lr_tensors, gstate, \
      grad_scale, found_inf

// What a plan is for: the whole step (every tensor the three stages touch is checked and in the plan), or pass 1
// alone (reduce_sums, which modifies nothing: only the gradients and first moments it reads are checked; the
// finish_step that follows checks everything before it writes).
enum class PlanUse { kStep, kReduce };

// Checks everything the stages of `use` will touch (so that an error leaves parameters, state and the global
// state as they were) and fills the plan.
CheckedPlan make_plan(MGPO_PLAN_PARAMS, PlanUse use = PlanUse::kStep);

// The plan of the apply pass (and eval()'s removal): p = (p - restore*m) + apply*m over params with no gradients.
CheckedPlan make_perturb_plan(at::TensorList params, at::TensorList exp_avgs, at::TensorList masters,
                           at::IntArrayRef master_index);

// `sums` as the reduce stage returns it: float64, contiguous, 4 per group, on the plan's device.
void check_sums(const CheckedPlan& plan, const at::Tensor& sums);

}  // namespace mgpo
