// TensorWatch (tensor_watch.h): a fused module's bound calls stay valid while none of its parameters and buffers was
// edited in place (its version counter moved), had requires_grad flipped, or had its storage swapped (`p.data = t`:
// another data pointer). Checked before every call, so in one C++ loop rather than ~20 Python attribute reads.
#include "tensor_watch.h"

#include <utility>
#include <vector>

namespace resnet_fused {
namespace {

class TensorWatch {
 public:
  // Raises for inference tensors, which have no version counter.
  explicit TensorWatch(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
    storages_.reserve(tensors_.size());
    for (const at::Tensor& t : tensors_) {
      // a swapped-out storage kept alive cannot be freed and reallocated at the same address, which would make a
      // swap look like no change
      storages_.push_back(t.storage());
      state_.push_back(read(t));
    }
  }

  bool is_current() const {
    for (size_t i = 0; i < tensors_.size(); ++i)
      if (read(tensors_[i]) != state_[i]) return false;
    return true;
  }

 private:
  struct State {
    int64_t version;
    bool requires_grad;
    const void* data;
    bool operator!=(const State& o) const {
      return version != o.version || requires_grad != o.requires_grad || data != o.data;
    }
  };

  static State read(const at::Tensor& t) {
    return {static_cast<int64_t>(t._version()), t.requires_grad(), t.const_data_ptr()};
  }

  std::vector<at::Tensor> tensors_;
  std::vector<c10::Storage> storages_;
  std::vector<State> state_;
};

}  // namespace

void register_tensor_watch(pybind11::module& m) {
  pybind11::class_<TensorWatch>(m, "TensorWatch",
                                "The versions, requires_grad flags and data pointers of some tensors, recorded at "
                                "construction; is_current() is False once any of them changed.")
      .def(pybind11::init<std::vector<at::Tensor>>(), pybind11::arg("tensors"))
      .def("is_current", &TensorWatch::is_current);
}

}  // namespace resnet_fused
