// conv_bn_act on sm_90a, fp32, 64x64 tile (see conv_sm90.cuh).
#include "conv_sm90.cuh"
RF_SM90_INSTANTIATE(Float32, Small)
