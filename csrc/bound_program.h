// resnet_fused._C.BoundCall, BlockProgram and LayerProgram: a fused block's eval forward, and a run of fused blocks,
// replayed in C++ (bound_program.cpp).
#pragma once

#include <torch/extension.h>

namespace resnet_fused {

void register_bound_program(pybind11::module& m);

}  // namespace resnet_fused
