"""One training step of fused models against a float64 run of the eager model (tests/float64_step.py).

Model families: the reference layout with BasicBlocks and with Bottlenecks, a CIFAR tutorial's ResNet (shortcut an
nn.Sequential that is empty for the identity, nn.ReLU() made inside forward, `out += self.shortcut(x)`), convs with
biases, batch 1 and tiny spatial sizes. Widths are small so that draws without ReLU ties exist; every layer still
normalizes at least 16 values per channel, so that training BatchNorm is not degenerate in float64 either.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from tests.float64_step import assert_step_matches, draw_without_ties, one_sgd_step
from tests.test_blocks import _randomize_bn


def _projection(inplanes, outplanes, stride, bias=False):
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=bias), nn.BatchNorm2d(outplanes))


class SmallResNet(nn.Module):
    """The reference ResNet's layout (3x3 stem without max-pool, stages of rf.models blocks, the first of each
    later stage strided with a projection) at small widths."""

    def __init__(self, block, layers=(1, 1, 1), widths=(4, 8, 16), stem=8, num_classes=10, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        stages, inplanes = [], stem
        for index, (blocks, planes) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2
            out = planes * block.expansion
            downsample = _projection(inplanes, out, stride, bias) if stride != 1 or inplanes != out else None
            stage = [block(inplanes, planes, stride, downsample)]
            stage += [block(out, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
            inplanes = out
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(inplanes, num_classes)
        if bias:  # the reference blocks make their convs without bias: give every conv one
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and m.bias is None:
                    m.bias = nn.Parameter(torch.empty(m.out_channels).uniform_(-0.5, 0.5))

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TutorialBlock(nn.Module):
    """A BasicBlock as CIFAR tutorials write it."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x):
        out = nn.ReLU()(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return nn.ReLU()(out)


class TutorialResNet(nn.Module):
    def __init__(self, widths=(8, 16, 16), num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, in_planes = [], widths[0]
        for index, planes in enumerate(widths):
            blocks.append(TutorialBlock(in_planes, planes, 1 if index == 0 else 2))
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.linear(torch.flatten(F.avg_pool2d(out, out.shape[-1]), 1))


# name -> (model builder, input shape); the last stage of each sees >= 16 values per channel
FAMILIES = {
    "basic": (lambda: SmallResNet(rf.BasicBlock, (2, 1, 1)), (4, 3, 16, 16)),
    "bottleneck": (lambda: SmallResNet(rf.Bottleneck, (2, 1, 1), widths=(2, 4, 8)), (4, 3, 16, 16)),
    "tutorial": (lambda: TutorialResNet(), (4, 3, 16, 16)),
    "conv_bias": (lambda: SmallResNet(rf.BasicBlock, (1, 1, 1), bias=True), (4, 3, 16, 16)),
    "batch1": (lambda: SmallResNet(rf.BasicBlock, (1, 1, 1)), (1, 3, 16, 16)),
    "tiny_spatial": (lambda: SmallResNet(rf.BasicBlock, (1, 1, 1)), (4, 3, 8, 8)),
}


def _draw(family):
    build, shape = FAMILIES[family]

    def make(seed):
        return _randomize_bn(build()).train(), torch.randn(shape), torch.randint(0, 10, (shape[0],))

    return draw_without_ties(make)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_training_step_matches_float64(family):
    model, x, target = _draw(family)
    fused, report = rf.fuse_model(model)
    assert report.blocks, report  # the comparison is about fused blocks: they must be there
    truth = one_sgd_step(copy.deepcopy(model).double(), x, target)
    eager = one_sgd_step(copy.deepcopy(model), x, target)
    assert_step_matches(one_sgd_step(fused, x, target), eager, truth)


# ------------------------------------------------------------------------------ frozen BatchNorm (eval + autograd)


def _draw_frozen(family, frozen_affine=False):
    build, shape = FAMILIES[family]

    def make(seed):
        model = _randomize_bn(build()).eval()
        if frozen_affine:  # a detection backbone's FrozenBatchNorm: only the convs (and the head) train
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False), m.bias.requires_grad_(False)
        return model, torch.randn(shape), torch.randint(0, 10, (shape[0],))

    return draw_without_ties(make)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_frozen_bn_step_matches_float64(family, backend):
    """Eval mode with autograd on runs the packed kernels forward and frozen.py's backward: one SGD step (every
    gradient, BN affine parameters included, and the state after it) as accurate as eager fp32's."""
    if backend not in rf.available_backends():
        pytest.skip(f"backend {backend!r} not built here")
    model, x, target = _draw_frozen(family)
    fused, report = rf.fuse_model(model, backend=backend)
    assert report.blocks, report
    truth = one_sgd_step(copy.deepcopy(model).double(), x, target)
    eager = one_sgd_step(copy.deepcopy(model), x, target)
    assert_step_matches(one_sgd_step(fused, x, target), eager, truth)


def test_frozen_bn_with_frozen_affine_and_input_gradient():
    """Only the convs train (BN weight and bias without requires_grad), and the input's gradient is wanted."""
    model, x, target = _draw_frozen("bottleneck", frozen_affine=True)
    fused, _ = rf.fuse_model(model)
    grads = []
    for m, dtype in ((fused, torch.float32), (copy.deepcopy(model), torch.float32), (copy.deepcopy(model).double(),
                                                                                     torch.float64)):
        xi = x.detach().to(dtype).requires_grad_()
        F.cross_entropy(m(xi), target).backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters() if p.requires_grad])
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    for fused_grad, eager_grad, truth in zip(*grads):
        eager_err = (eager_grad.double() - truth).abs().max().item()
        assert (fused_grad.double() - truth).abs().max().item() <= max(1e-6, 10 * eager_err)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_double_backward_through_several_blocks_matches_eager(mode, threads, set_threads):
    """A gradient penalty differentiates the backward (create_graph): fused programs and frozen units recompute
    themselves in plain ops for it, each alone (its input has a history through earlier fused blocks that the
    outer backward follows once). Every parameter's gradient is compared: the projections' 1x1 stride-2 convs of
    4 and 8 channels are where oneDNN's own double backward of a channels_last input was wrong (and, on one thread,
    corrupted the heap)."""
    model, x, _ = _draw_frozen("basic")
    model.train(mode == "train")
    fused, _ = rf.fuse_model(model)
    penalties = []
    set_threads(threads)
    for m in (fused, model):
        xi = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(m(xi).square().sum(), xi, create_graph=True)
        penalty = grad.square().sum()
        penalty.backward()
        penalties.append([penalty.detach()] + [p.grad.clone() for p in m.parameters() if p.grad is not None])
    assert len(penalties[0]) == len(penalties[1]) == 1 + sum(p.requires_grad for p in model.parameters())
    for fused_value, eager_value in zip(*penalties):
        torch.testing.assert_close(fused_value, eager_value, rtol=1e-4, atol=1e-5 * eager_value.abs().max().item())


# ------------------------------------------------------------------------------ channels_last on the "cpu" backend


def _channels_last(model, x):
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None, reason="the 'cpu' backend is not built here")
@pytest.mark.parametrize("mode", ["train", "frozen"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_channels_last_step_on_the_cpu_backend_matches_float64(family, mode):
    """A channels_last model and input, as the benchmarks train: the cpu backend's convolution backward runs as
    matrix products there (ops/backends/cpu_conv_products.py). Held to eager fp32 NCHW's error, not channels_last's."""
    model, x, target = _draw(family) if mode == "train" else _draw_frozen(family)
    fused, report = rf.fuse_model(_channels_last(copy.deepcopy(model), x)[0], backend="cpu")
    assert report.blocks, report
    truth = one_sgd_step(copy.deepcopy(model).double(), x, target)
    eager = one_sgd_step(copy.deepcopy(model), x, target)
    assert_step_matches(one_sgd_step(fused, x.contiguous(memory_format=torch.channels_last), target), eager, truth)
