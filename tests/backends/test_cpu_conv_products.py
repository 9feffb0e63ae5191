"""The "cpu" backend's training convolutions as matrix products (resnet_fused/ops/backends/cpu_conv_products.py)
against float64 aten.convolution and convolution_backward: the 1x1 forward (stride 1 and 2, with and without bias)
and the batch statistics taken from it; 1x1 convolutions at stride 1 and 2 (input and weight gradients as matrix
products), other kernels' weight gradient through im2col (3x3 at stride 1 and 2, the 7x7 stem, padding 0 and more,
odd sizes, batch 1), channels_last and NCHW, every subset of the output mask, gradients in the weight's own memory
format; the rule that picks the products and where it leaves oneDNN (other strides, dtypes, groups, dilation, many
output positions, small NCHW images); the training and frozen-BN units calling it.
"""

import itertools

import pytest
import torch

import resnet_fused as rf
from resnet_fused.ops.backends import cpu_conv_products as gemm
from resnet_fused.ops.backends.cpu import CpuBackend

CL = torch.channels_last
# every eligible conv as products
EVERYTHING = gemm.GemmRule(pointwise=True, min_nchw_pixels=0, max_im2col_rows=10 ** 9)
# (N, C_in, H, W, C_out, kernel, stride, padding)
SHAPES = [
    (1, 3, 7, 9, 5, 1, 1, 0),      # batch 1, odd sizes
    (2, 16, 9, 7, 24, 1, 2, 0),    # strided 1x1 (the projection shortcut), odd input: ceil(H / 2) rows
    (3, 8, 1, 1, 4, 1, 1, 0),      # 1x1 images
    (2, 5, 9, 7, 3, 3, 1, 1),      # 3x3
    (1, 4, 8, 5, 6, 3, 2, 1),      # strided 3x3, odd width
    (2, 6, 5, 5, 4, 3, 2, 0),      # 3x3 without padding
    (3, 3, 11, 13, 8, 7, 2, 3),    # the stem
    (2, 4, 6, 6, 6, 1, 1, 1),      # a padded 1x1: its weight gradient through im2col, input gradient by oneDNN
]


def _case(shape, dtype=torch.float32, layout=CL, bias=False):
    n, c_in, h, w, c_out, k, stride, padding = shape
    x = torch.randn(n, c_in, h, w, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, k, k, dtype=torch.float64) / (c_in * k * k) ** 0.5
    y = torch.nn.functional.conv2d(x, weight, None, stride, padding)
    grad = torch.randn_like(y)
    geometry = ([stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1)
    doubles = (grad, x, weight)
    tensors = tuple(t.to(dtype).contiguous(memory_format=layout) if layout is not None
                    else t.to(dtype).transpose(2, 3).contiguous().transpose(2, 3) for t in doubles)
    return tensors, doubles, [c_out] if bias else None, geometry


def _truth(doubles, bias_sizes, geometry, mask):
    return torch.ops.aten.convolution_backward(*doubles, bias_sizes, *geometry, mask)


LAYOUTS = {"channels_last": CL, "nchw": torch.contiguous_format}


def _nchw_1x1(shape, layout) -> bool:
    """an NCHW 1x1 conv (1x1 images are channels_last as well: they take that layout's products)"""
    return layout == "nchw" and shape[5] == 1 and shape[7] == 0 and shape[2] * shape[3] > 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask", [m for m in itertools.product([True, False], repeat=3) if any(m)], ids=str)
def test_matches_float64(shape, mask, layout, monkeypatch):
    monkeypatch.setattr(gemm, "GEMM_RULE", EVERYTHING)
    tensors, doubles, bias_sizes, geometry = _case(shape, layout=LAYOUTS[layout], bias=mask[2])
    plan = gemm.gemm_plan(*tensors, geometry[1], geometry[2], 1, mask)
    # under this rule every weight gradient is a product but an NCHW 1x1's (oneDNN's: no transposing copies)
    assert (plan is not None and plan[1]) == (mask[1] and not _nchw_1x1(shape, layout))
    got = gemm.conv_backward(*tensors, bias_sizes, *geometry, list(mask))
    truth = _truth(doubles, bias_sizes, geometry, list(mask))
    for name, value, expected, wanted in zip(("grad_input", "grad_weight", "grad_bias"), got, truth, mask):
        if not wanted:  # aten's own path may compute the weight gradient with the bias's anyway
            continue
        assert value.shape == expected.shape and value.dtype == torch.float32, name
        scale = expected.abs().max().item()
        assert (value.double() - expected).abs().max().item() <= 1e-5 * max(scale, 1.0), name
        if name == "grad_input":
            assert value.is_contiguous(memory_format=LAYOUTS[layout]), "dx in x's layout"


@pytest.mark.parametrize("weight_layout", [CL, torch.contiguous_format], ids=["channels_last", "contiguous"])
def test_weight_gradient_in_the_weights_layout(weight_layout, monkeypatch):
    """autograd accumulates a gradient whose strides match its parameter's without another copy"""
    monkeypatch.setattr(gemm, "GEMM_RULE", EVERYTHING)
    (grad, x, weight), _, _, geometry = _case(SHAPES[3])
    weight = weight.contiguous(memory_format=weight_layout)
    _, grad_weight, _ = gemm.conv_backward(grad, x, weight, None, *geometry, [False, True, False])
    assert grad_weight.stride() == weight.stride()


INTEL, AMD = gemm.GEMM_RULES["GenuineIntel"], gemm.GEMM_RULES["AuthenticAMD"]


def _plan(shape, rule=INTEL, dtype=torch.float32, layout=CL, mask=(True, True, False), groups=1,
          dilation=(1, 1)):
    (grad, x, weight), _, _, geometry = _case(shape, dtype, layout)
    return gemm.gemm_plan(grad, x, weight, geometry[1], dilation, groups, mask, rule)


def test_rule():
    small_3x3, large_3x3 = (2, 8, 8, 8, 8, 3, 1, 1), (8, 8, 16, 16, 8, 3, 1, 1)  # 128 and 2048 output positions
    assert _plan(SHAPES[1]) == (True, True)                                  # 1x1: both gradients
    assert _plan(SHAPES[1], mask=(False, True, True)) == (False, True)
    assert _plan(small_3x3) == (False, True)                                 # few positions: dW by im2col
    assert _plan(large_3x3) is None                                          # many: oneDNN
    assert _plan(small_3x3, mask=(True, False, True)) is None                # dx of a 3x3: always oneDNN
    assert _plan(SHAPES[1], rule=gemm.GemmRule(False, 0, 0)) is None
    nchw = torch.contiguous_format
    wide, small = (2, 16, 8, 8, 8, 1, 1, 0), (2, 16, 7, 7, 8, 1, 1, 0)  # 64 and 49 output pixels per image
    assert _plan(wide, layout=nchw) == (True, False)                        # NCHW 1x1: dx product, dW oneDNN
    assert _plan(small, layout=nchw) is None                                # small NCHW images: oneDNN
    assert _plan(small) == (True, True)                                     # channels_last: always products
    assert _plan(small_3x3, layout=nchw) == (False, True)                   # im2col in either layout


def test_amd_rule_keeps_large_pointwise_convs_with_onednn():
    at_bound, past_bound = (8, 16, 8, 8, 8, 1, 1, 0), (8, 16, 9, 8, 8, 1, 1, 0)  # 512 and 576 output positions
    assert _plan(at_bound, rule=AMD) == (True, True)
    assert _plan(past_bound, rule=AMD) is None
    assert _plan(past_bound, rule=AMD, layout=torch.contiguous_format) == (True, False)  # NCHW: as on Intel
    assert _plan((8, 8, 8, 8, 8, 3, 1, 1), rule=AMD) is None                            # 3x3 dW: as on Intel
    assert _plan((2, 8, 8, 8, 8, 3, 1, 1), rule=AMD) == (False, True)


def test_pointwise_forward_follows_the_rule(monkeypatch):
    (_, x, weight), _, _, (stride, padding, dilation, *_) = _case((8, 16, 9, 8, 8, 1, 1, 0))
    monkeypatch.setattr(gemm, "GEMM_RULE", AMD)
    assert gemm.pointwise_conv(x, weight, None, stride, padding, dilation, 1) is None
    monkeypatch.setattr(gemm, "GEMM_RULE", INTEL)
    assert gemm.pointwise_conv(x, weight, None, stride, padding, dilation, 1) is not None


@pytest.mark.parametrize("case", ["nchw", "strided", "float64", "bfloat16", "groups", "dilation"])
def test_leaves_to_onednn(case):
    shape = SHAPES[1]
    kwargs = {"nchw": dict(layout=torch.contiguous_format), "strided": dict(layout=None),
              "float64": dict(dtype=torch.float64), "bfloat16": dict(dtype=torch.bfloat16), "groups": dict(groups=2),
              "dilation": dict(dilation=(2, 2))}
    assert _plan(shape, **kwargs[case]) is None


def test_falls_back_with_the_same_results():
    """a convolution the rule leaves to oneDNN gets aten's own results"""
    (grad, x, weight), _, _, geometry = _case((8, 5, 9, 7, 3, 3, 1, 1))  # 504 output positions
    mask = [True, True, False]
    got = gemm.conv_backward(grad, x, weight, None, *geometry, mask)
    expected = torch.ops.aten.convolution_backward(grad, x, weight, None, *geometry, mask)
    for value, want in zip(got[:2], expected[:2]):
        assert torch.equal(value, want)


POINTWISE = [s for s in SHAPES if s[5] == 1 and s[7] == 0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", POINTWISE, ids=str)
def test_pointwise_forward_matches_float64(shape, bias, layout, monkeypatch):
    monkeypatch.setattr(gemm, "GEMM_RULE", EVERYTHING)
    (_, x, weight), (_, x64, weight64), _, (stride, padding, dilation, *_) = _case(shape, layout=LAYOUTS[layout])
    b64 = torch.randn(weight.shape[0], dtype=torch.float64) if bias else None
    y = gemm.pointwise_conv(x, weight, None if b64 is None else b64.float(), stride, padding, dilation, 1)
    expected = torch.nn.functional.conv2d(x64, weight64, b64, stride, padding)
    assert y.shape == expected.shape and y.is_contiguous(memory_format=LAYOUTS[layout])
    assert (y.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("case", ["3x3", "padded", "small_nchw", "float64", "groups"])
def test_pointwise_forward_leaves_to_onednn(case):
    shape = {"3x3": SHAPES[3], "padded": SHAPES[-1]}.get(case, SHAPES[1])  # SHAPES[1]: 20 output pixels
    layout = torch.contiguous_format if case == "small_nchw" else CL
    (_, x, weight), *_ = _case(shape, torch.float64 if case == "float64" else torch.float32, layout)
    groups = 2 if case == "groups" else 1
    if groups == 2:
        weight = weight[:, : x.shape[1] // 2]
    assert gemm.pointwise_conv(x, weight, None, [shape[6]] * 2, [shape[7]] * 2, [1, 1], groups) is None


@pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None, reason="the 'cpu' backend is not built here")
def test_batch_statistics_of_the_product():
    """CpuBackend.conv_batch_norm_stats: y by the product, and its mean and biased variance"""
    (_, x, weight), (_, x64, weight64), _, (stride, padding, dilation, *_) = _case(SHAPES[1])
    y, mean, var = CpuBackend().conv_batch_norm_stats(x, weight, None, stride, padding, dilation, 1)
    expected = torch.nn.functional.conv2d(x64, weight64, None, stride, padding)
    assert (y.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(mean.double(), expected.mean(dim=(0, 2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(var.double(), expected.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)


def test_backend_exposes_it():
    assert CpuBackend.conv_backward is gemm.conv_backward


@pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None, reason="the 'cpu' backend is not built here")
@pytest.mark.parametrize("train", [True, False], ids=["train", "frozen"])
def test_fused_units_call_it(train, monkeypatch):
    """a channels_last fused Bottleneck's backward goes through the backend's conv backward, for every conv"""
    calls = []

    def counting(*args):
        calls.append(args[2].shape)
        return gemm.conv_backward(*args)

    monkeypatch.setattr(CpuBackend, "conv_backward", staticmethod(counting))
    torch.manual_seed(0)
    block = rf.Bottleneck(16, 4).train(train).to(memory_format=CL)
    fused, _ = rf.fuse_model(block, backend="cpu")
    fused.train(train)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL).requires_grad_()
    fused(x).sum().backward()
    assert sorted(calls) == sorted(m.weight.shape for m in block.modules() if isinstance(m, torch.nn.Conv2d))
