// mgpo_kernels._C.KeptPlan: a step plan whose persistent tensors (parameters, moments, masters, step counts, the
// global state) cross from Python into C++ once, not at every step.
//
// Each call of an op converts every tensor list of the plan from Python objects (7 lists of 448 tensors for
// LLaMA-2-7B's LoRA tensors), which after a step's streaming passes, with the caches cold, costs about as much as
// the checks and the scalar stage together.  A KeptPlan holds those lists as C++ tensors; a step passes only what
// can change between steps (the gradients, the hyper-parameter table, tensor lrs, GradScaler's inputs) and runs
// the device's own op entry points (device_ops.h), so make_plan checks everything at every step as before: a
// parameter whose `.data` was reassigned is seen there.  Whether the held state tensors are still the optimizer's
// is the caller's to know (mgpo_kernels/backends/plan.py builds a new KeptPlan when its lists change).
// Eager only: a compiled graph records the torch.ops.mgpo.* ops.
#include <ATen/record_function.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 + the at::Tensor casters, without torch/all.h's C++ frontend

#include <array>
#include <optional>
#include <vector>

#include "device_ops.h"

namespace mgpo {

static std::array<DeviceEntry, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> g_entries{};

void set_device_entry(c10::DeviceType type, DeviceEntry entry) { g_entries.at(static_cast<size_t>(type)) = entry; }

const DeviceEntry* device_entry(c10::DeviceType type) {
  const DeviceEntry& e = g_entries.at(static_cast<size_t>(type));
  return e.step != nullptr ? &e : nullptr;
}

namespace {

using OptTensors = std::vector<std::optional<at::Tensor>>;

OptTensorList to_list(const OptTensors& v) {
  OptTensorList out;
  out.reserve(v.size());
  for (const auto& t : v) out.push_back(t);
  return out;
}

class KeptPlan {
 public:
  KeptPlan(std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
           std::vector<at::Tensor> masters, std::vector<int64_t> master_index, std::vector<at::Tensor> steps,
           std::vector<int64_t> group_sizes, std::vector<at::Tensor> gstate)
      : params_(std::move(params)),
        exp_avgs_(std::move(exp_avgs)),
        exp_avg_sqs_(std::move(exp_avg_sqs)),
        masters_(std::move(masters)),
        master_index_(std::move(master_index)),
        steps_(std::move(steps)),
        group_sizes_(std::move(group_sizes)),
        gstate_(std::move(gstate)) {
    TORCH_CHECK(!params_.empty(), "mgpo: a KeptPlan needs at least one tensor");
    const c10::DeviceType type = params_[0].device().type();
    entry_ = device_entry(type);
    TORCH_CHECK(entry_ != nullptr, "mgpo: this build of mgpo_kernels._C has no kernels for ", type, " tensors");
  }

  at::Tensor step(const OptTensors& grads, const at::Tensor& hyper, const OptTensors& lr_tensors,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) const {
    const OptTensorList g = to_list(grads), lr = to_list(lr_tensors);
    pybind11::gil_scoped_release no_gil;
    RECORD_FUNCTION("mgpo::step (KeptPlan)", c10::ArrayRef<const c10::IValue>{});  // in profiler traces
    return entry_->step(params_, g, exp_avgs_, exp_avg_sqs_, masters_, master_index_, steps_, group_sizes_, hyper,
                        lr, gstate_, grad_scale, found_inf);
  }

  at::Tensor reduce_sums(const OptTensors& grads, const at::Tensor& hyper, const OptTensors& lr_tensors,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) const {
    const OptTensorList g = to_list(grads), lr = to_list(lr_tensors);
    pybind11::gil_scoped_release no_gil;
    RECORD_FUNCTION("mgpo::reduce_sums (KeptPlan)", c10::ArrayRef<const c10::IValue>{});  // in profiler traces
    return entry_->reduce_sums(params_, g, exp_avgs_, exp_avg_sqs_, masters_, master_index_, steps_, group_sizes_,
                               hyper, lr, gstate_, grad_scale, found_inf);
  }

  void finish_step(const OptTensors& grads, const at::Tensor& hyper, const OptTensors& lr_tensors,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                   const at::Tensor& sums) const {
    const OptTensorList g = to_list(grads), lr = to_list(lr_tensors);
    pybind11::gil_scoped_release no_gil;
    RECORD_FUNCTION("mgpo::finish_step (KeptPlan)", c10::ArrayRef<const c10::IValue>{});  // in profiler traces
    entry_->finish_step(params_, g, exp_avgs_, exp_avg_sqs_, masters_, master_index_, steps_, group_sizes_, hyper,
                        lr, gstate_, grad_scale, found_inf, sums);
  }

  size_t size() const { return params_.size(); }

 private:
  std::vector<at::Tensor> params_, exp_avgs_, exp_avg_sqs_, masters_;
  std::vector<int64_t> master_index_;
  std::vector<at::Tensor> steps_;
  std::vector<int64_t> group_sizes_;
  std::vector<at::Tensor> gstate_;
  const DeviceEntry* entry_ = nullptr;
};

}  // namespace

void bind_kept_plan(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<KeptPlan>(m, "KeptPlan",
                       "The persistent part of a step plan held in C++ (csrc/kept_plan.cpp): the op arguments "
                       "params, exp_avgs, exp_avg_sqs, masters, master_index, steps, group_sizes, gstate")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>, std::vector<int64_t>,
                    std::vector<at::Tensor>>(),
           py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("masters"),
           py::arg("master_index"), py::arg("steps"), py::arg("group_sizes"), py::arg("gstate"))
      .def("step", &KeptPlan::step, "torch.ops.mgpo.step on the held lists and these per-step arguments",
           py::arg("grads"), py::arg("hyper"), py::arg("lr_tensors"), py::arg("grad_scale"), py::arg("found_inf"))
      .def("reduce_sums", &KeptPlan::reduce_sums, "torch.ops.mgpo.reduce_sums on the held lists", py::arg("grads"),
           py::arg("hyper"), py::arg("lr_tensors"), py::arg("grad_scale"), py::arg("found_inf"))
      .def("finish_step", &KeptPlan::finish_step, "torch.ops.mgpo.finish_step on the held lists", py::arg("grads"),
           py::arg("hyper"), py::arg("lr_tensors"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("sums"))
      .def("__len__", &KeptPlan::size);
}

}  // namespace mgpo
