// TensorWatch (tensor_watch.h): a fused module's bound calls stay valid while none of its parameters and buffers was
// edited in place (its version counter moved), had requires_grad flipped, or had its storage swapped (`p.data = t`,
// torch.utils.swap_tensors: another data pointer). Checked before every call, so in one C++ loop rather than ~20
// Python attribute reads. AttrWatch does the same for the module attributes the bound calls were decided on.
#include "tensor_watch.h"

#include <torch/csrc/autograd/python_variable.h>

#include <utility>

namespace resnet_fused {

TensorWatch::TensorWatch(std::vector<pybind11::object> tensors) : tensors_(std::move(tensors)) {
  for (const pybind11::object& t : tensors_) {
    TORCH_CHECK(THPVariable_Check(t.ptr()), "TensorWatch: tensors must be torch.Tensor objects");
    const at::Tensor& tensor = THPVariable_Unpack(t.ptr());
    storages_.push_back(tensor.has_storage() ? tensor.storage() : c10::Storage());
    state_.push_back(read(tensor));
  }
}

bool TensorWatch::is_current() const {
  for (size_t i = 0; i < tensors_.size(); ++i)
    if (read(THPVariable_Unpack(tensors_[i].ptr())) != state_[i]) return false;
  return true;
}

TensorWatch::State TensorWatch::read(const at::Tensor& t) {
  return {static_cast<int64_t>(t._version()), t.requires_grad(), t.has_storage() ? t.const_data_ptr() : nullptr};
}

AttrWatch::AttrWatch(const std::vector<pybind11::object>& modules, const std::vector<std::vector<std::string>>& names) {
  TORCH_CHECK(modules.size() == names.size(), "AttrWatch: one list of attribute names per module");
  for (size_t i = 0; i < modules.size(); ++i)
    for (const auto& name : names[i]) {
      pybind11::str key(name);
      watched_.push_back({modules[i], key, modules[i].attr(key)});  // raises for a missing attribute
    }
}

bool AttrWatch::is_current() const {
  for (const auto& w : watched_) {
    PyObject* now = PyObject_GetAttr(w.module.ptr(), w.name.ptr());
    if (now == nullptr) {
      PyErr_Clear();
      return false;
    }
    const int same = PyObject_RichCompareBool(now, w.value.ptr(), Py_EQ);
    Py_DECREF(now);
    if (same != 1) {
      if (same < 0) PyErr_Clear();
      return false;
    }
  }
  return true;
}

void register_tensor_watch(pybind11::module& m) {
  pybind11::class_<TensorWatch>(m, "TensorWatch",
                                "The versions, requires_grad flags and data pointers of some tensors, recorded at "
                                "construction; is_current() is False once any of them changed.")
      .def(pybind11::init<std::vector<pybind11::object>>(), pybind11::arg("tensors"))
      .def("is_current", &TensorWatch::is_current);
  pybind11::class_<AttrWatch>(m, "AttrWatch",
                              "Some attributes of some modules (names[i] of modules[i]), read at construction; "
                              "is_current() is False once any of them compares unequal or is gone.")
      .def(pybind11::init<const std::vector<pybind11::object>&, const std::vector<std::vector<std::string>>&>(),
           pybind11::arg("modules"), pybind11::arg("names"))
      .def("is_current", &AttrWatch::is_current);
}

}  // namespace resnet_fused
