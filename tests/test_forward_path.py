"""The shape of the forward path: a warm fused forward is a few Python calls per unit, and the kernels are a leaf
of the package (they import nothing above resnet_fused/kernels)."""

from __future__ import annotations

import ast
import os
import sys

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused import ops
from resnet_fused.blocks import FusedBottleneck

PACKAGE = os.path.dirname(rf.__file__)


def _package_calls(fn) -> int:
    """How many Python functions of the package `fn()` calls (sys.setprofile: every frame, nested ones too)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_warm_eval_forward_is_at_most_12_package_calls_per_unit(backend, downsample):
    if ops.available_backends("cpu")[backend] is not None:
        pytest.skip(f"backend {backend!r}: {ops.available_backends('cpu')[backend]}")
    inplanes = 64 if downsample else 256
    projection = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256)) if downsample else None
    block = FusedBottleneck(inplanes, 64, downsample=projection, backend=backend).eval()
    x = torch.randn(1, inplanes, 4, 4)
    with torch.no_grad():
        block(x)  # decides and binds
        calls = _package_calls(lambda: block(x))
        cold = _package_calls(lambda: (block.clear_fold_cache(), block(x)))
    units = 4 if downsample else 3
    assert calls <= 12 * units, calls
    assert cold > 2 * calls  # what binding saves: the counter above measures the bound path


def test_kernels_import_nothing_above_them():
    root = os.path.join(PACKAGE, "kernels")
    for folder, _, files in os.walk(root):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            depth = os.path.relpath(path, root).count(os.sep) + 1  # relative levels that stay inside kernels/
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom):
                    assert node.level <= depth, f"{path}: from {'.' * node.level}{node.module} leaves kernels/"
                    assert node.level or not (node.module or "").startswith("resnet_fused"), path
                elif isinstance(node, ast.Import):
                    assert not any(a.name.startswith("resnet_fused") for a in node.names), path
