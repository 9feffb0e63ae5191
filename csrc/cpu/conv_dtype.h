// Which dtype the CPU convolution runs in (csrc/cpu/conv_dtype.cpp). One decision for the C++ ops and for the
// "cpu" backend's pack, which asks through resnet_fused._C.cpu_conv_dtype.
#pragma once

#include <c10/core/ScalarType.h>

namespace resnet_fused::cpu {

// x's dtype where this CPU convolves it at full speed, else float32; always float32 for an fp32 weight.
c10::ScalarType conv_dtype(c10::ScalarType x_dtype, c10::ScalarType weight_dtype);

}  // namespace resnet_fused::cpu
