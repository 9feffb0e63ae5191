"""Triton kernels for the fused ops, and their launchers. A leaf: nothing here imports the rest of the package,
and launchers trust their arguments (the public ops in resnet_fused.ops check them).

    conv_bn_act.py   implicit-GEMM conv + per-channel scale/shift (+ residual) (+ ReLU), and its weight packing
    tuning.py        the conv's autotune configs and pruning, and the split-K choice
    elementwise.py   bn_act and add_relu over channels_last data
    batch_norm.py    training BatchNorm's passes: statistics (partials + combine), apply, backward
    runtime.py       interpreter flag, device guard, the NaN-keeping ReLU

Importing this package imports triton; TRITON_INTERPRET must be set before that to run on CPU tensors. The
"triton" backend (resnet_fused/ops/backends) registers the launchers as torch.library ops.
"""

from .runtime import INTERPRET  # noqa: F401
