// resnet_fused._C.TensorWatch and AttrWatch: what the fused modules' change counter cannot see of some tensors (their
// versions, requires_grad flags and data pointers) and of some module attributes (conv geometry, BN flags), recorded
// once and compared in one call; resnet_fused/fusion/changes.py uses them where the extension loads and does the same
// in Python where it does not. bound_program.cpp's layer programs check their blocks' watches before every run.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace resnet_fused {

class TensorWatch {
 public:
  // Raises for inference tensors, which have no version counter.
  explicit TensorWatch(std::vector<pybind11::object> tensors);
  bool is_current() const;

 private:
  struct State {
    int64_t version;
    bool requires_grad;
    const void* data;
    bool operator!=(const State& o) const {
      return version != o.version || requires_grad != o.requires_grad || data != o.data;
    }
  };

  static State read(const at::Tensor& t);

  // The Python objects, not at::Tensor references: an extra reference to a parameter's TensorImpl would make
  // torch.utils.swap_tensors refuse it, and a swap replaces what the object holds, which is what is watched.
  std::vector<pybind11::object> tensors_;
  // a swapped-out storage kept alive cannot be freed and reallocated at the same address, which would make a swap
  // look like no change
  std::vector<c10::Storage> storages_;
  std::vector<State> state_;
};

// Module attributes, read at construction (names[i] of modules[i]) and compared (==) by is_current().
class AttrWatch {
 public:
  AttrWatch(const std::vector<pybind11::object>& modules, const std::vector<std::vector<std::string>>& names);
  bool is_current() const;

 private:
  // Where the attribute was found, so that a check can look there first: the instance's __dict__ (conv geometry, BN
  // flags), its class (a method such as forward, a class default), or nn.Module's registries (a child, which getattr
  // reaches through __getattr__).
  enum class Source { kInstance, kClass, kChild, kElsewhere };
  struct Watched {
    pybind11::object module;
    pybind11::str name;
    pybind11::object value;
    Source source;
    PyTypeObject* type;         // the module's class at construction
    unsigned int type_version;  // its version tag then (CPython changes it whenever the class or a base changes)
    pybind11::object found;     // the object found in `source`, held so that its address is never reused
  };
  static bool found_unchanged(const Watched& w);
  std::vector<Watched> watched_;
};

void register_tensor_watch(pybind11::module& m);

}  // namespace resnet_fused
