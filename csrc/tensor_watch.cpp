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
  // Called after the convs have filled the caches: each tensor's reads miss (its Python object, TensorImpl, version
  // counter, autograd meta, storage). Touching every TensorImpl first lets those misses overlap across tensors.
  for (const auto& t : tensors_) __builtin_prefetch(THPVariable_Unpack(t.ptr()).unsafeGetTensorImpl());
  for (size_t i = 0; i < tensors_.size(); ++i)
    if (read(THPVariable_Unpack(tensors_[i].ptr())) != state_[i]) return false;
  return true;
}

TensorWatch::State TensorWatch::read(const at::Tensor& t) {
  return {static_cast<int64_t>(t._version()), t.requires_grad(), t.has_storage() ? t.const_data_ptr() : nullptr};
}

namespace {

// The object `name` names in `dict` (borrowed; nullptr: none, error cleared).
PyObject* dict_item(PyObject* dict, PyObject* name) {
  if (dict == nullptr || !PyDict_Check(dict)) return nullptr;
  PyObject* item = PyDict_GetItemWithError(dict, name);
  if (item == nullptr) PyErr_Clear();
  return item;
}

// The instance's __dict__ (a new reference; nullptr: none, error cleared).
PyObject* instance_dict(PyObject* obj) {
  PyObject* dict = PyObject_GenericGetDict(obj, nullptr);
  if (dict == nullptr) PyErr_Clear();
  return dict;
}

bool is_data_descriptor(PyObject* attr) { return attr != nullptr && Py_TYPE(attr)->tp_descr_set != nullptr; }

// Whether getattr on instances of `type` looks in the class and the instance's __dict__ the standard way (then in
// __getattr__, as nn.Module's), not through an overridden __getattribute__.
bool standard_getattribute(PyTypeObject* type) {
  static PyObject* name = PyUnicode_InternFromString("__getattribute__");
  return _PyType_Lookup(type, name) == _PyType_Lookup(&PyBaseObject_Type, name);
}

bool version_tag_valid(PyTypeObject* type) {
#ifdef Py_TPFLAGS_VALID_VERSION_TAG
  if (!PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG)) return false;
#endif
  return type->tp_version_tag != 0;
}

// What nn.Module.__getattr__ would return for `name` from the instance's __dict__ `dict` (borrowed; nullptr: none):
// the first of its registries, in its order, that holds it.
PyObject* registered(PyObject* dict, PyObject* name) {
  static PyObject* const registries[] = {PyUnicode_InternFromString("_parameters"),
                                         PyUnicode_InternFromString("_buffers"),
                                         PyUnicode_InternFromString("_modules")};
  for (PyObject* registry : registries) {
    PyObject* item = dict_item(dict_item(dict, registry), name);
    if (item != nullptr) return item;
  }
  return nullptr;
}

}  // namespace

AttrWatch::AttrWatch(const std::vector<pybind11::object>& modules, const std::vector<std::vector<std::string>>& names) {
  namespace py = pybind11;
  TORCH_CHECK(modules.size() == names.size(), "AttrWatch: one list of attribute names per module");
  for (size_t i = 0; i < modules.size(); ++i)
    for (const auto& name : names[i]) {
      py::str key(name);
      PyObject* obj = modules[i].ptr();
      Watched w{modules[i], key, modules[i].attr(key), Source::kElsewhere, Py_TYPE(obj), 0, py::none()};  // raises
      // for a missing attribute; what getattr returned is `value`, what the fast check looks for is `found`
      PyObject* on_class = _PyType_Lookup(w.type, key.ptr());  // borrowed; gives the class a version tag
      py::object dict = py::reinterpret_steal<py::object>(instance_dict(obj));
      PyObject* in_instance = dict_item(dict.ptr(), key.ptr());
      w.type_version = version_tag_valid(w.type) ? w.type->tp_version_tag : 0;
      if (is_data_descriptor(on_class) || !standard_getattribute(w.type)) {
        // a property or slot, or another lookup: only getattr says
      } else if (in_instance != nullptr) {
        if (in_instance == w.value.ptr()) w.source = Source::kInstance;
      } else if (on_class != nullptr) {
        w.source = Source::kClass;  // getattr binds a method anew each time: `found` is the function
        w.found = py::reinterpret_borrow<py::object>(on_class);
      } else {
        PyObject* child = registered(dict.ptr(), key.ptr());
        if (child != nullptr && child == w.value.ptr()) w.source = Source::kChild;
      }
      if (w.source == Source::kInstance || w.source == Source::kChild) w.found = w.value;
      watched_.push_back(std::move(w));
    }
}

bool AttrWatch::found_unchanged(const Watched& w) {
  PyObject* obj = w.module.ptr();
  if (w.source == Source::kElsewhere || w.type_version == 0 || Py_TYPE(obj) != w.type ||
      !version_tag_valid(w.type) || w.type->tp_version_tag != w.type_version)
    return false;
  PyObject* dict = instance_dict(obj);
  PyObject* in_instance = dict_item(dict, w.name.ptr());
  bool same = false;
  if (w.source == Source::kInstance) {
    same = in_instance == w.found.ptr();
  } else if (w.source == Source::kClass) {
    same = in_instance == nullptr;  // the class unchanged (its version tag) still has the same attribute
  } else {  // kChild: nothing in the instance or on the class (its tag says so) shadows the registries
    same = in_instance == nullptr && registered(dict, w.name.ptr()) == w.found.ptr();
  }
  Py_XDECREF(dict);
  return same;
}

bool AttrWatch::is_current() const {
  for (const auto& w : watched_) {
    if (found_unchanged(w)) continue;  // getattr would give the very object it gave (or bind the same function)
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
