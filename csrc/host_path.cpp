// The optimizer's per-step host path in C++ (mgpo_kernels/_host_cache.py, backends/plan.py), one translation unit:
//
// - the host cache's reads: `grads_of`, `same_items`, `dict_is`, `values_are`.  After a step's streaming passes
//   the Python objects of 448 parameters, their gradients and their state are out of cache; Python's own loops
//   (map, attrgetter) run a few hundred instructions per object, so the CPU waits for one object's misses at a
//   time, where these short loops compare pointers and overlap the misses of several objects.  With Python
//   loops instead, the apply + step of 448 tiny tensors took 0.52 ms instead of 0.35 (warm) and each of apply and
//   step 0.1 ms more cold (benchmarks/results/2026-12-07-cpu-host-overhead-before-house.txt).
// - `KeptPlan`: a step plan whose persistent tensors (parameters, moments, masters, step counts, the global state)
//   cross from Python into C++ once, not at every call.  Each call of an op converts every tensor list of the plan
//   from Python objects (7 lists of 448 tensors for LLaMA-2-7B's LoRA tensors), which with the caches cold costs
//   about as much as the checks and the scalar stage together.  A KeptPlan's step takes only what can change
//   between steps (the gradients, the hyper-parameter table, tensor lrs, GradScaler's inputs), its perturb only
//   the coefficient, and both run the device's own op entry points (device_ops.h), so make_plan checks
//   everything at every call as the ops do: a parameter whose `.data` was reassigned is seen there.  Whether the
//   held state tensors are still the optimizer's is the caller's to know (backends/plan.py makes a new KeptPlan
//   whenever its lists change).  Eager only: a compiled graph records the torch.ops.mgpo.* ops.
// No <torch/extension.h> (its C++ frontend doubles the compile time): pybind.h has the at::Tensor casters.
#include <torch/csrc/autograd/python_variable.h>  // Python.h first; THPVariable_*
#include <torch/csrc/utils/pybind.h>  // pybind11 + the at::Tensor casters, without torch/all.h's C++ frontend
#include <ATen/record_function.h>

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

namespace py = pybind11;

// ------------------------------------------------------------------------------------------ host cache reads
// [p.grad for p in params] for plain tensors (torch.Tensor, nn.Parameter: their grad is the autograd field).
py::list grads_of(const py::list& params) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  py::list out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(params.ptr(), i);
    TORCH_CHECK(THPVariable_Check(o), "mgpo: grads_of: item ", i, " is not a tensor");
    const at::Tensor& g = THPVariable_Unpack(o).grad();
    PyObject* w = g.defined() ? THPVariable_Wrap(g) : (Py_INCREF(Py_None), Py_None);
    if (w == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), i, w);  // steals the reference
  }
  return out;
}

// a[i] is b[i] for every i (and the same length).
bool same_items(const py::list& a, const py::list& b) {
  const Py_ssize_t n = PyList_GET_SIZE(a.ptr());
  if (PyList_GET_SIZE(b.ptr()) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i)
    if (PyList_GET_ITEM(a.ptr(), i) != PyList_GET_ITEM(b.ptr(), i)) return false;
  return true;
}

// d holds exactly keys[i] -> values[i], in this order (the same objects).
bool dict_is(const py::dict& d, const py::list& keys, const py::list& values) {
  const Py_ssize_t n = PyList_GET_SIZE(keys.ptr());
  if (PyDict_Size(d.ptr()) != n || PyList_GET_SIZE(values.ptr()) != n) return false;
  Py_ssize_t pos = 0, i = 0;
  PyObject *k, *v;
  while (PyDict_Next(d.ptr(), &pos, &k, &v)) {
    if (k != PyList_GET_ITEM(keys.ptr(), i) || v != PyList_GET_ITEM(values.ptr(), i)) return false;
    ++i;
  }
  return i == n;
}

// dicts[i].get(key) is expected[i] for every i; False if an item is not a dict.
bool values_are(const py::list& dicts, const py::str& key, const py::list& expected) {
  const Py_ssize_t n = PyList_GET_SIZE(dicts.ptr());
  if (PyList_GET_SIZE(expected.ptr()) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyList_GET_ITEM(dicts.ptr(), i);
    if (!PyDict_Check(d)) return false;
    PyObject* v = PyDict_GetItemWithError(d, key.ptr());  // borrowed
    if (v == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      v = Py_None;
    }
    if (v != PyList_GET_ITEM(expected.ptr(), i)) return false;
  }
  return true;
}

// ------------------------------------------------------------------------------------------ KeptPlan
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

  void perturb(const at::Tensor& coef, bool apply) const {
    pybind11::gil_scoped_release no_gil;
    RECORD_FUNCTION("mgpo::perturb (KeptPlan)", c10::ArrayRef<const c10::IValue>{});  // in profiler traces
    entry_->perturb(params_, exp_avgs_, masters_, master_index_, coef, apply);
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

void bind_host_path(pybind11::module_& m) {
  m.def("grads_of", &grads_of, "[p.grad for p in params], for a list of plain tensors (not subclasses)",
        py::arg("params"));
  m.def("same_items", &same_items, "a[i] is b[i] for every i of two lists of the same length", py::arg("a"),
        py::arg("b"));
  m.def("dict_is", &dict_is, "d holds exactly keys[i] -> values[i] in this order (identity)", py::arg("d"),
        py::arg("keys"), py::arg("values"));
  m.def("values_are", &values_are, "dicts[i].get(key) is expected[i] for every i", py::arg("dicts"), py::arg("key"),
        py::arg("expected"));
  py::class_<KeptPlan>(m, "KeptPlan",
                       "The persistent part of a step plan held in C++ (csrc/host_path.cpp): the op arguments "
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
      .def("perturb", &KeptPlan::perturb, "torch.ops.mgpo.perturb on the held lists", py::arg("coef"),
           py::arg("apply"))
      .def("__len__", &KeptPlan::size);
}

}  // namespace mgpo
