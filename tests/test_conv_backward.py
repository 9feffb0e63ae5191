"""resnet_fused.ops.conv_backward: convolution_backward gives aten.convolution_backward's results, and convolution
aten.convolution's with its first and second derivatives, also where oneDNN's own are wrong on some CPUs (fp32 1x1
stride-2 convolutions of channels_last inputs with 2-7 channels: on an AVX2 AMD EPYC the weight gradient was 10-100%
off, the double backward's up to 76x, and on one thread the double backward corrupted the heap). Every case against a
float64 computation."""

import itertools

import pytest
import torch

from resnet_fused.ops.conv_backward import convolution, convolution_backward

CL = torch.channels_last


def _case(batch, c_in, c_out, size, kernel, stride, padding, channels_last, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(batch, c_in, size, size, dtype=dtype)
    weight = torch.randn(c_out, c_in, kernel, kernel, dtype=dtype)
    out = (size + 2 * padding - kernel) // stride + 1
    grad = torch.randn(batch, c_out, out, out, dtype=dtype)
    if channels_last:
        x, weight, grad = (t.contiguous(memory_format=CL) for t in (x, weight, grad))
    return grad, x, weight


def _check(grad, x, weight, stride, padding, mask, bias=True, rtol=1e-5):
    args = ([weight.shape[0]] if bias else None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, mask)
    got = convolution_backward(grad, x, weight, *args)
    want = torch.ops.aten.convolution_backward(grad.double(), x.double(), weight.double(), *args)
    for name, g, w, needed in zip(("dx", "dW", "d bias"), got, want, mask):
        if not needed:  # aten may compute it anyway (oneDNN's dW with d bias)
            continue
        assert g.shape == w.shape and g.dtype == x.dtype, name
        err = (g.double() - w).abs().max().item() / max(w.abs().max().item(), 1e-30)
        assert err < rtol, f"{name}: relative error {err:.3g}"
    if mask[0]:
        assert got[0].is_contiguous(memory_format=CL) == x.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("c_in,batch", [(c, b) for c in (1, 2, 3, 4, 5, 7, 8, 9) for b in (1, 4)])
@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("channels_last", [True, False])
def test_strided_pointwise_with_few_channels(c_in, batch, stride, channels_last):
    for size, c_out in ((8, 8), (9, 32), (14, 16)):
        grad, x, weight = _case(batch, c_in, c_out, size, 1, stride, 0, channels_last)
        _check(grad, x, weight, stride, 0, [True, True, True])


@pytest.mark.parametrize("mask", [m for m in itertools.product([True, False], repeat=3) if any(m)])
def test_each_output_alone(mask):
    grad, x, weight = _case(4, 4, 8, 8, 1, 2, 0, True)
    _check(grad, x, weight, 2, 0, list(mask))


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (7, 2, 3)])
def test_other_convolutions_as_aten(kernel, stride, padding):
    grad, x, weight = _case(2, 3, 8, 11, kernel, stride, padding, True)
    _check(grad, x, weight, stride, padding, [True, True, False])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_goes_to_aten(dtype):
    grad, x, weight = _case(4, 4, 8, 8, 1, 2, 0, True, dtype=dtype)
    _check(grad, x, weight, 2, 0, [True, True, False], rtol=2e-2)


def _penalized_grads(x, weight, stride, conv):
    """d/d(x, weight) of a gradient penalty on conv: first derivatives made with create_graph, then differentiated."""
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = conv(x, weight, stride)
    grad_x, grad_w = torch.autograd.grad((y * y * y).sum(), (x, weight), create_graph=True)
    (grad_x.square().sum() + grad_w.square().sum()).backward()
    return y.detach(), grad_x.detach(), grad_w.detach(), x.grad, weight.grad


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("c_in", [1, 2, 4, 6, 7, 8, 9])
@pytest.mark.parametrize("stride", [2, 3])
def test_convolution_and_its_double_backward(c_in, stride, threads, set_threads):
    def ours(x, weight, stride):
        return convolution(x, weight, None, [stride] * 2, [0, 0], [1, 1], 1)

    def reference(x, weight, stride):
        return torch.nn.functional.conv2d(x.double(), weight.double(), stride=stride)

    set_threads(threads)
    for batch, size, c_out in ((4, 8, 8), (4, 16, 8), (1, 9, 32)):
        _, x, weight = _case(batch, c_in, c_out, size, 1, stride, 0, True)
        got = _penalized_grads(x, weight, stride, ours)
        want = _penalized_grads(x, weight, stride, reference)
        for name, g, w in zip(("y", "dx", "dW", "d dx", "d dW"), got, want):
            assert g.shape == w.shape and g.dtype == torch.float32, name
            err = (g.double() - w).abs().max().item() / max(w.abs().max().item(), 1e-30)
            assert err < 1e-5, f"{name} ({batch}, {c_in}, {size}, {size}) -> {c_out}: relative error {err:.3g}"


def test_convolution_elsewhere_is_aten_convolution():
    _, x, weight = _case(2, 3, 8, 11, 3, 2, 1, True)
    bias = torch.randn(8)
    want = torch.ops.aten.convolution(x, weight, bias, [2, 2], [1, 1], [1, 1], False, [0, 0], 1)
    torch.testing.assert_close(convolution(x, weight, bias, [2, 2], [1, 1], [1, 1], 1), want, rtol=0, atol=0)
