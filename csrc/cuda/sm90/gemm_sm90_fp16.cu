// conv_bn_act on sm_90a for small M, fp16: split-K GEMM (see gemm_sm90.cuh).
#include "gemm_sm90.cuh"
RF_SM90_GEMM_INSTANTIATE(Float16)
