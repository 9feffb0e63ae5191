// TensorWatch (tensor_watch.h): a fused module's bound calls stay valid while none of its parameters and buffers was
// edited in place (its version counter moved), had requires_grad flipped, or had its storage swapped (`p.data = t`,
// torch.utils.swap_tensors: another data pointer). Checked before every call, so in one C++ loop rather than ~20
// Python attribute reads.
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

void register_tensor_watch(pybind11::module& m) {
  pybind11::class_<TensorWatch>(m, "TensorWatch",
                                "The versions, requires_grad flags and data pointers of some tensors, recorded at "
                                "construction; is_current() is False once any of them changed.")
      .def(pybind11::init<std::vector<pybind11::object>>(), pybind11::arg("tensors"))
      .def("is_current", &TensorWatch::is_current);
}

}  // namespace resnet_fused
