"""NaN in, NaN out, as eager: every backend's ReLU keeps NaN (a max(x, 0) would silently turn it into 0).

Known exception: the "cpu" backend's conv_bn_act, whose ReLU is oneDNN's post-op (a max with 0 in its JIT
kernels): it maps NaN to 0. The README says so; the xfail is strict, so a fix shows up here."""

import pytest
import torch

import resnet_fused as rf

NAN = float("nan")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(device, backend) for device in DEVICES for backend in ("torch", "cpu", "cuda", "triton")
         if rf.available_backends(device).get(backend, "unregistered") is None]


@pytest.mark.parametrize("device,backend", CASES, ids=[f"{d}-{b}" for d, b in CASES])
def test_bn_act_relu_keeps_nan(device, backend):
    x = torch.tensor([NAN, -1.0, 2.0, 0.0], device=device).view(1, 4, 1, 1)
    scale, shift = torch.ones(4, device=device), torch.zeros(4, device=device)
    y = rf.bn_act(x, scale, shift, relu=True, backend=backend).flatten().cpu()
    assert torch.isnan(y[0]) and y[1:].tolist() == [0.0, 2.0, 0.0]


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


@pytest.mark.parametrize("device,backend", CASES, ids=[f"{d}-{b}" for d, b in CASES])
def test_relu_backward_selects_as_eager(device, backend):
    # eager's ReLU backward selects: an inf gradient where y = 0 gives 0 (not inf * 0 = NaN), and a NaN output
    # passes its gradient through
    upstream = torch.tensor([float("inf"), 1.0, 3.0, float("inf")], device=device).view(1, 4, 1, 1)
    ones, zeros = torch.ones(4, device=device), torch.zeros(4, device=device)
    ops = {"bn_act": lambda x: rf.bn_act(x, ones, zeros, relu=True, backend=backend),
           "eager": torch.relu}
    grads = {}
    for name, op in ops.items():
        x = torch.tensor([-1.0, 2.0, NAN, 0.0], device=device).view(1, 4, 1, 1).requires_grad_()
        op(x).backward(upstream)
        grads[name] = x.grad.flatten().tolist()
    assert grads["eager"] == [0.0, 1.0, 3.0, 0.0]
    assert grads["bn_act"] == grads["eager"]
