// resnet_fused._C.TensorWatch: what the fused modules' change counter cannot see of some tensors (their versions,
// requires_grad flags and data pointers), recorded once and compared in one call; resnet_fused/fusion/changes.py's
// TensorState uses it where the extension loads and does the same in Python where it does not.
#pragma once

#include <torch/extension.h>

namespace resnet_fused {

void register_tensor_watch(pybind11::module& m);

}  // namespace resnet_fused
