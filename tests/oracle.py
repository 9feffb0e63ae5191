"""What every op test compares against: the "torch" backend on fp32 copies, and one table of tolerances.

Tolerances are relative to the largest magnitude of the reference output (a conv's error grows with its
reduction length and with the output's scale, not with each element's own value):
    |actual - expected| <= atol + rtol * max|expected|
"""

from __future__ import annotations

import torch

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
]
CONV_IDS = [c[0] for c in CONV_CASES]

_ORACLE = TorchBackend()


def make_conv_inputs(case, dtype, device="cpu", residual=False, channels_last=False):
    _, n, cin, h, w, cout, k, stride, padding = case
    x = torch.randn(n, cin, h, w, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
    scale = torch.rand(cout, device=device) + 0.5
    shift = torch.randn(cout, device=device)
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    res = torch.randn(n, cout, ho, wo, device=device).to(dtype) if residual else None
    return x, weight, scale, shift, res, stride, padding


def _f32(t):
    return None if t is None else t.float()


def ref_conv_bn_act(x, weight, scale, shift, residual, stride, padding, relu):
    pack = (weight.float(), scale.float(), shift.float())
    # cuDNN would run an fp32 conv on TF32 tensor cores by default: the oracle must be true fp32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return _ORACLE.conv_bn_act_packed(x.float(), pack, _f32(residual), stride, padding, relu)


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
