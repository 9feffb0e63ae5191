// resnet_fused._C.BoundCall, BlockProgram, LayerProgram and ChainProgram: a fused block's eval forward, a run of fused
// blocks and a whole model's plain chain, replayed in C++ (bound_program.cpp).
#pragma once

#include <torch/extension.h>

namespace resnet_fused {

void register_bound_program(pybind11::module& m);

}  // namespace resnet_fused
