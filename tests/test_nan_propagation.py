"""NaN in, NaN out, as eager: every backend's conv_bn_act ReLU keeps NaN (a max(x, 0) would silently turn it into
0); bn_act's and add_relu's are checked in tests/ops/.

Known exception: the "cpu" backend's conv_bn_act, whose ReLU is oneDNN's post-op (a max with 0 in its JIT
kernels): it maps NaN to 0. The README says so; the xfail is strict, so a fix shows up here."""

import pytest
import torch

import resnet_fused as rf

NAN = float("nan")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(device, backend) for device in DEVICES for backend in ("torch", "cpu", "cuda", "triton")
         if rf.available_backends(device).get(backend, "unregistered") is None]


CONV_CASES = [pytest.param(device, backend, marks=pytest.mark.xfail(
                  strict=True, reason="oneDNN's fused ReLU post-op maps NaN to 0")) if backend == "cpu"
              else (device, backend) for device, backend in CASES]


@pytest.mark.parametrize("device,backend", CONV_CASES, ids=[f"{d}-{b}" for d, b in CASES])
def test_conv_relu_keeps_nan(device, backend):
    x = torch.randn(1, 16, 5, 5, device=device)
    x[0, 3, 2, 2] = NAN
    weight = torch.randn(16, 16, 3, 3, device=device)
    scale, shift = torch.ones(16, device=device), torch.zeros(16, device=device)
    y = rf.conv_bn_act(x, weight, scale, shift, stride=1, padding=1, relu=True, backend=backend)
    expected = torch.relu(torch.nn.functional.conv2d(x, weight, padding=1))
    assert torch.equal(torch.isnan(y), torch.isnan(expected)) and torch.isnan(expected).any()

