// conv_bn_act on sm_90a, bf16, 128x128 tile (see conv_sm90.cuh).
#include "conv_sm90.cuh"
RF_SM90_INSTANTIATE(BFloat16, Large)
