// resnet_fused._C.cuda_conv_plan, _C.cuda_sm90_built and (CUDA builds) _C.cuda_set_sm90_enabled: the CUDA
// conv_bn_act's kernel choice (cuda/conv_plan.h) exposed to Python. Compiled in every build, with or without CUDA,
// so the choice is tested on machines without a GPU.
#pragma once

#include <torch/extension.h>

namespace resnet_fused {

void register_conv_plan(pybind11::module& m);

}  // namespace resnet_fused
