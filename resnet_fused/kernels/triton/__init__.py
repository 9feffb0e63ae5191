"""Triton kernels for the fused ops (see DESIGN.md "The three fused ops").

    conv_bn_act.py   implicit-GEMM conv + per-channel scale/shift (+ residual) (+ ReLU), and its weight packing
    elementwise.py   bn_act and add_relu over channels_last data
    library.py       registers them as torch.ops.resnet_fused_triton.* (fake kernels, autograd)

Importing this package imports triton; TRITON_INTERPRET must be set before that to run on CPU tensors.
"""

from .common import INTERPRET  # noqa: F401
