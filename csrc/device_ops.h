// The ops of torch.ops.mgpo.*, written once over a device's three stages.
//
// A device (cpu/ops_cpu.cpp, cuda/ops_cuda.cu) provides a struct with
//   static at::Tensor reduce(const CheckedPlan&);                       pass 1 -> float64 sums
//   static at::Tensor scalar(const CheckedPlan&, const at::Tensor& sums);  scalar stage -> scal, global state
//   static void update(const CheckedPlan&, const at::Tensor& scal);      pass 2
// and its device type as `static constexpr c10::DeviceType kType`, and registers them with
// register_device_ops<Device>(m) in its TORCH_LIBRARY_IMPL block.  Every op builds the plan first (make_plan checks
// all arguments), so nothing is modified by a call that is refused.  The same entry points are also recorded per
// device type (device_entry) for a KeptPlan (host_path.cpp), which calls them without the dispatcher.
#pragma once
#include <torch/library.h>

#include "step_plan.h"

namespace mgpo {

template <typename Device>
struct DeviceOps {
  // The fused step: pass 1, scalar stage, pass 2. Returns the sums.
  static at::Tensor step(MGPO_PLAN_PARAMS) {
    const CheckedPlan plan = make_plan(MGPO_PLAN_ARGS);
    at::Tensor sums = Device::reduce(plan);
    Device::update(plan, Device::scalar(plan, sums));
    return sums;
  }
  // Pass 1 alone (a reduce_hook then runs on the sums before finish_step).
  static at::Tensor reduce_sums(MGPO_PLAN_PARAMS) {
    return Device::reduce(make_plan(MGPO_PLAN_ARGS, PlanUse::kReduce));
  }
  // The scalar stage and pass 2 on sums from reduce_sums (after the hook).
  static void finish_step(MGPO_PLAN_PARAMS, const at::Tensor& sums) {
    const CheckedPlan plan = make_plan(MGPO_PLAN_ARGS);
    check_sums(plan, sums);
    Device::update(plan, Device::scalar(plan, sums));
  }
  // The apply pass of theta at rest (apply) or eval()'s removal: pass 2 with no gradient, p = (p - restore*m) + apply*m.
  static void perturb(at::TensorList params, at::TensorList exp_avgs, at::TensorList masters,
                      at::IntArrayRef master_index, const at::Tensor& coef, bool apply) {
    const CheckedPlan plan = make_perturb_plan(params, exp_avgs, masters, master_index);
    TORCH_CHECK(coef.numel() == 1 && coef.device() == plan.device, "mgpo: coef must be a one-element tensor on ",
                plan.device, ", got ", coef.sizes(), " on ", coef.device());
    at::Tensor scal = at::zeros({kScalSize}, at::TensorOptions().dtype(at::kFloat).device(plan.device));
    scal.select(0, kScalC).fill_(1.0);
    scal.select(0, apply ? kScalApply : kScalRestore).copy_(coef.reshape({}));  // on the device: no host sync
    // coef == 0 (no step yet, m = 0, rho = 0): the pass would write p unchanged; the skip flag makes the update
    // pass return at once (a skip with nothing to restore), decided on the device
    scal.select(0, kScalSkip).copy_(coef.reshape({}).eq(0));
    Device::update(plan, scal);
  }
};

// A device's step entry points, as a caller that holds the plan's lists itself calls them.
struct DeviceEntry {
  at::Tensor (*step)(MGPO_PLAN_PARAMS);
  at::Tensor (*reduce_sums)(MGPO_PLAN_PARAMS);
  void (*finish_step)(MGPO_PLAN_PARAMS, const at::Tensor& sums);
  void (*perturb)(at::TensorList params, at::TensorList exp_avgs, at::TensorList masters,
                  at::IntArrayRef master_index, const at::Tensor& coef, bool apply);
};
void set_device_entry(c10::DeviceType type, DeviceEntry entry);  // host_path.cpp
const DeviceEntry* device_entry(c10::DeviceType type);           // nullptr: no kernels for that device type

template <typename Device>
void register_device_ops(torch::Library& m) {
  set_device_entry(Device::kType, DeviceEntry{&DeviceOps<Device>::step, &DeviceOps<Device>::reduce_sums,
                                              &DeviceOps<Device>::finish_step, &DeviceOps<Device>::perturb});
  m.impl("step", &DeviceOps<Device>::step);
  m.impl("reduce_sums", &DeviceOps<Device>::reduce_sums);
  m.impl("finish_step", &DeviceOps<Device>::finish_step);
  m.impl("perturb", &DeviceOps<Device>::perturb);
}

}  // namespace mgpo
