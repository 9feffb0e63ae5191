"""torch.library.opcheck for the extension's ops (schema, fake kernel, autograd registration, AOT dispatch),
on CPU samples and, marked gpu, on CUDA samples; and torch.compile(fullgraph=True) through the "cpu" backend.
bn_act and add_relu are opchecked in tests/ops/."""

import pytest
import torch

import resnet_fused as rf
from tests.oracle import CONV_CASES, CONV_IDS, assert_matches, make_conv_inputs, ref_conv_bn_act

CPU_REASON = rf.available_backends("cpu")["cpu"]
needs_cpu_backend = pytest.mark.skipif(CPU_REASON is not None, reason=f"the 'cpu' backend is unavailable: {CPU_REASON}")

# A stride-2 1x1, a padded 3x3 with odd sizes, the 7x7 stem, and odd channel counts.
OPCHECK_CASES = [CONV_CASES[1], CONV_CASES[3], CONV_CASES[4], CONV_CASES[6]]
OPCHECK_IDS = [CONV_IDS[1], CONV_IDS[3], CONV_IDS[4], CONV_IDS[6]]


def _requires_grad(*tensors):
    return [None if t is None else t.requires_grad_(True) for t in tensors]


def _conv_sample(case, device, residual, grad):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, torch.float32, device, residual=residual)
    if grad:
        x, w, scale, shift, res = _requires_grad(x, w, scale, shift, res)
    return x, w, scale, shift, res, stride, padding


def _check_public_ops(device, case, residual, grad):
    x, w, scale, shift, res, stride, padding = _conv_sample(case, device, residual, grad)
    torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act.default, (x, w, scale, shift, res, stride, padding, True))


@needs_cpu_backend
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=OPCHECK_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_cpu(case, residual, grad):
    _check_public_ops("cpu", case, residual, grad)


@needs_cpu_backend
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=OPCHECK_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_opcheck_conv_bias_act(case, residual, grad):
    x, w, _, shift, res, stride, padding = _conv_sample(case, "cpu", residual, grad)
    torch.library.opcheck(torch.ops.resnet_fused.conv_bias_act.default, (x, w, shift, res, stride, padding, False))


@needs_cpu_backend
def test_opcheck_cpu_bf16():
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[3], torch.bfloat16, residual=True)
    torch.library.opcheck(torch.ops.resnet_fused.conv_bn_act.default, (x, w, scale, shift, res, stride, padding, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=OPCHECK_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_opcheck_cuda(case, residual):
    reason = rf.available_backends("cuda")["cuda"]
    if reason is not None:
        pytest.skip(f"the 'cuda' backend is unavailable: {reason}")
    _check_public_ops("cuda", case, residual, grad=True)


@needs_cpu_backend
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_compile_fullgraph(packed):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[3], torch.float32, residual=True)
    pack = rf.ops.pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend="cpu")

    def block(x, res):
        if packed:
            y = rf.ops.conv_bn_act_packed(x, pack, res)
        else:
            y = rf.conv_bn_act(x, w, scale, shift, res, stride=stride, padding=padding, backend="cpu")
        return rf.add_relu(y, res, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    expected = torch.relu(ref_conv_bn_act(x, w, scale, shift, res, stride, padding, True) + res)
    assert_matches(compiled(x, res), expected, torch.float32)
    assert_matches(block(x, res), expected, torch.float32)
