// Helpers of the optimizer's per-step host cache (mgpo_kernels/_host_cache.py): the checks that the cached tensor
// lists are still current, and the gradients, in C++ loops.
//
// After a step's streaming passes the Python objects of 448 parameters, their gradients and their state are out of
// cache. Python's own loops (map, attrgetter) run a few hundred instructions per object, so the CPU waits for one
// object's cache misses at a time; these loops compare pointers without touching the objects where that is enough
// (identity) and are short enough for the misses of several objects to overlap.
// Python.h (first), THPVariable_*, then plain pybind11: not <torch/extension.h>, whose C++ frontend (torch/all.h)
// made this 83-line file the slowest of the build.
#include <torch/csrc/autograd/python_variable.h>
#include <pybind11/pybind11.h>

namespace mgpo {
namespace {

namespace py = pybind11;

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

}  // namespace

void bind_host_cache(py::module_& m) {
  m.def("grads_of", &grads_of, "[p.grad for p in params], for a list of plain tensors (not subclasses)",
        py::arg("params"));
  m.def("same_items", &same_items, "a[i] is b[i] for every i of two lists of the same length", py::arg("a"),
        py::arg("b"));
  m.def("dict_is", &dict_is, "d holds exactly keys[i] -> values[i] in this order (identity)", py::arg("d"),
        py::arg("keys"), py::arg("values"));
  m.def("values_are", &values_are, "dicts[i].get(key) is expected[i] for every i", py::arg("dicts"), py::arg("key"),
        py::arg("expected"));
}

}  // namespace mgpo
