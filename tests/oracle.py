"""What every op test compares against: the "torch" backend on fp32 copies, and one table of tolerances.

Tolerances are relative to the largest magnitude of the reference output (a conv's error grows with its
reduction length and with the output's scale, not with each element's own value):
    |actual - expected| <= atol + rtol * max|expected|
"""

from __future__ import annotations

import torch

from resnet_fused.ops import conv_output_shape
from resnet_fused.ops.backends.torch_backend import TorchBackend

# Kernel-in-this-dtype vs fp32 oracle. bf16 allows a couple of ulps (the interpreter truncates, GPUs round).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    "tf32": dict(atol=1e-3, rtol=5e-3),      # fp32 through TF32 tensor cores (Triton/CUDA on a GPU)
    torch.float16: dict(atol=1e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=2e-2),
}

# Small shapes covering every conv class of the ResNet family: (id, N, Cin, H, W, Cout, k, stride, padding)
CONV_CASES = [
    ("1x1", 2, 16, 8, 8, 32, 1, 1, 0),
    ("1x1_s2_odd", 2, 16, 9, 9, 32, 1, 2, 0),
    ("3x3", 2, 16, 8, 8, 16, 3, 1, 1),
    ("3x3_s2_odd", 1, 16, 9, 7, 32, 3, 2, 1),
    ("7x7_stem", 1, 3, 15, 15, 16, 7, 2, 3),
    ("7x7_stem_gray", 1, 1, 12, 12, 16, 7, 2, 3),
    ("odd_channels", 3, 5, 7, 5, 7, 3, 1, 1),
    ("batch1_wide", 1, 32, 6, 6, 64, 3, 1, 1),
    ("cin24_partial_k", 2, 24, 5, 6, 16, 3, 1, 1),  # Cin not a multiple of the K block: a masked channel tail
]
CONV_IDS = [c[0] for c in CONV_CASES]

# For the GPU tests: ResNet-50 layers at small batch, same fields, and one odd shape. Between them they take every
# kernel path: the stem's scalar loads (Cin=3), 16-byte loads with small tiles (batch 1, late stages) and large
# ones (r50_l1_expand_b8 and r50_l3_expand_b32 give two waves of 128x128 tiles on an H100/H200), Cout past one
# tile, a 2048-wide 1x1, and odd sizes.
GPU_CONV_CASES = [
    ("r50_stem", 2, 3, 224, 224, 64, 7, 2, 3),
    ("r50_l1_reduce", 2, 256, 56, 56, 64, 1, 1, 0),
    ("r50_l1_3x3", 2, 64, 56, 56, 64, 3, 1, 1),
    ("r50_l1_expand_b8", 8, 64, 56, 56, 256, 1, 1, 0),
    ("r50_l2_3x3_s2", 2, 128, 56, 56, 128, 3, 2, 1),
    ("r50_l2_downsample", 2, 256, 56, 56, 512, 1, 2, 0),
    ("r50_l3_3x3", 4, 256, 14, 14, 256, 3, 1, 1),
    ("r50_l3_expand_b32", 32, 256, 14, 14, 1024, 1, 1, 0),
    ("r50_l4_3x3_b1", 1, 512, 7, 7, 512, 3, 1, 1),
    ("r50_l4_expand_b1", 1, 512, 7, 7, 2048, 1, 1, 0),
    ("odd", 3, 40, 17, 13, 72, 3, 1, 1),
]
GPU_CONV_IDS = [c[0] for c in GPU_CONV_CASES]

_ORACLE = TorchBackend()


def make_conv_inputs(case, dtype, device="cpu", residual=False, channels_last=False):
    _, n, cin, h, w, cout, k, stride, padding = case
    x = torch.randn(n, cin, h, w, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
    scale = torch.rand(cout, device=device) + 0.5
    shift = torch.randn(cout, device=device)
    res = torch.randn(conv_output_shape(x.shape, cout, k, stride, padding), device=device).to(dtype) if residual \
        else None
    return x, weight, scale, shift, res, stride, padding


def _f32(t):
    return None if t is None else t.float()


def ref_conv_bn_act(x, weight, scale, shift, residual, stride, padding, relu):
    # cuDNN would run an fp32 conv on TF32 tensor cores by default: the oracle must be true fp32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return _ORACLE.conv_bn_act(x.float(), weight.float(), scale.float(), shift.float(), _f32(residual), stride,
                                   padding, relu)


def ref_bn_act(x, scale, shift, residual, relu):
    return _ORACLE.bn_act(x.float(), scale.float(), shift.float(), _f32(residual), relu)


def ref_add_relu(x, residual):
    return _ORACLE.add_relu(x.float(), residual.float())


def assert_matches(actual, expected, tol):
    """Assert actual (any dtype) matches the fp32 reference within `tol` (a TOLERANCES entry or key)."""
    if not isinstance(tol, dict):
        tol = TOLERANCES[tol]
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.float()).all(), "output has non-finite values"
    err = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    bound = tol["atol"] + tol["rtol"] * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"max abs error {err:.3g} exceeds {bound:.3g} ({tol})"
