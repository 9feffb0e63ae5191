"""The CPU kernels of a ResNet's edges (csrc/cpu/edges*.{h,cpp}, csrc/cpu/isa/edges_*.cpp) and the modules that
fuse_model swaps in for them (resnet_fused/edges.py), against ATen's max_pool2d, adaptive_avg_pool2d and linear.

Max pooling is exact (NaN where the window has one, the earlier tap on ties); average pooling and the classifier
within rounding. Shapes: channel counts off the vector width (tails), odd sizes, batch 1, windows cut by padding,
asymmetric kernels and strides, 1x1 spatial; every pooling dtype; NCHW input; argument errors of the bare ops; the
narrower instruction sets' builds (a fresh process with ATEN_CPU_CAPABILITY). Modules: what fuse_model swaps and
reports, the weights and keys it keeps, every call that must run the torch module's own forward instead, attributes
and weights changed after a forward, copies and pickles.
"""

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused as rf
from resnet_fused import edges
from resnet_fused.models import resnet
from resnet_fused.ops.backends.extension import EXTENSION_REASON

pytestmark = pytest.mark.skipif(EXTENSION_REASON["CPU"] is not None,
                                reason=f"the C++ extension is unavailable: {EXTENSION_REASON['CPU']}")

CL = torch.channels_last
OPS = torch.ops.resnet_fused
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}  # relative, after one rounding

# (shape, kernel_size, stride, padding): the stem's; odd sizes with channel tails; no padding; stride 1; asymmetric;
# a window as large as x; batch 1 with one channel
POOLS = [((1, 64, 112, 112), (3, 3), (2, 2), (1, 1)), ((2, 17, 9, 7), (3, 3), (2, 2), (1, 1)),
         ((3, 33, 8, 8), (2, 2), (2, 2), (0, 0)), ((2, 5, 6, 5), (3, 3), (1, 1), (1, 1)),
         ((2, 24, 11, 10), (3, 2), (2, 1), (1, 0)), ((1, 7, 3, 3), (3, 3), (3, 3), (0, 0)),
         ((1, 1, 5, 5), (5, 5), (1, 1), (2, 2))]
POOL_IDS = ["x".join(map(str, p[0])) + f"-k{p[1][0]}{p[1][1]}s{p[2][0]}{p[2][1]}p{p[3][0]}{p[3][1]}" for p in POOLS]


def _assert_same_values(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert actual.is_contiguous(memory_format=CL)
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.nan_to_num(0.0), expected.nan_to_num(0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,kernel,stride,padding", POOLS, ids=POOL_IDS)
def test_max_pool_is_atens_values(shape, kernel, stride, padding, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=CL)
    _assert_same_values(OPS.max_pool2d_cl(x, kernel, stride, padding), F.max_pool2d(x, kernel, stride, padding))


def test_max_pool_propagates_nan_and_keeps_infinities():
    x = torch.randn(2, 19, 9, 9).contiguous(memory_format=CL)
    x[0, 3, 4, 4] = float("nan")
    x[1, 18, 0, 0] = float("nan")
    x[0, 5] = -float("inf")
    x[1, 7, 2, 2] = float("inf")
    got = OPS.max_pool2d_cl(x, [3, 3], [2, 2], [1, 1])
    _assert_same_values(got, F.max_pool2d(x, 3, 2, 1))
    assert got.isnan().sum() > 0 and (got == -float("inf")).sum() > 0 and (got == float("inf")).sum() > 0


def test_max_pool_takes_any_layout_and_empty_batches():
    x = torch.randn(2, 10, 7, 7)
    _assert_same_values(OPS.max_pool2d_cl(x, [3, 3], [2, 2], [1, 1]), F.max_pool2d(x, 3, 2, 1).contiguous(
        memory_format=CL))
    assert OPS.max_pool2d_cl(torch.randn(0, 4, 7, 7), [3, 3], [2, 2], [1, 1]).shape == (0, 4, 4, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 2048, 7, 7), (8, 512, 7, 7), (2, 513, 3, 5), (3, 7, 1, 1), (1, 1030, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mean_pool_matches_adaptive_average_pooling(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) + 3).to(dtype).contiguous(memory_format=CL)
    got, expected = OPS.mean_pool_cl(x), F.adaptive_avg_pool2d(x.float(), 1)
    assert got.shape == expected.shape and got.dtype == dtype and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got.float(), expected, rtol=TOLERANCE[dtype], atol=0)


def test_mean_pool_propagates_nan_and_inf():
    x = torch.randn(1, 20, 3, 3).contiguous(memory_format=CL)
    x[0, 2, 1, 1], x[0, 3, 0, 0] = float("nan"), float("inf")
    got = OPS.mean_pool_cl(x).flatten()
    assert got[2].isnan() and got[3] == float("inf") and torch.isfinite(got[4:]).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 33])
@pytest.mark.parametrize("in_features,out_features", [(2048, 1000), (7, 3), (17, 9), (1, 5)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_rows_matches_linear(rows, in_features, out_features, with_bias):
    torch.manual_seed(0)
    x, weight = torch.randn(rows, in_features), torch.randn(out_features, in_features)
    bias = torch.randn(out_features) if with_bias else None
    got, expected = OPS.linear_rows(x, weight, bias), F.linear(x.double(), weight.double(),
                                                               None if bias is None else bias.double())
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * in_features ** 0.5 * 4)


def test_linear_rows_of_no_features_is_the_bias():
    assert torch.equal(OPS.linear_rows(torch.randn(2, 0), torch.randn(3, 0), torch.ones(3)), torch.ones(2, 3))
    assert torch.equal(OPS.linear_rows(torch.randn(2, 0), torch.randn(3, 0), None), torch.zeros(2, 3))


def test_bare_ops_name_what_is_wrong():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        OPS.max_pool2d_cl(x[0], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        OPS.max_pool2d_cl(x.double(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="padding must be at most half the kernel size"):
        OPS.max_pool2d_cl(x, [3, 3], [2, 2], [2, 2])
    with pytest.raises(RuntimeError, match="stride must be two integers >= 1"):
        OPS.max_pool2d_cl(x, [3, 3], [0, 2], [1, 1])
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        OPS.max_pool2d_cl(x, [9, 9], [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="at least one pixel"):
        OPS.mean_pool_cl(torch.randn(1, 4, 0, 5))
    with pytest.raises(RuntimeError, match="x must be a 2-D float32"):
        OPS.linear_rows(torch.randn(2, 3).double(), torch.randn(4, 3), None)
    with pytest.raises(RuntimeError, match="weight must have x's 3 in_features"):
        OPS.linear_rows(torch.randn(2, 3), torch.randn(4, 5), None)
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor of length 4"):
        OPS.linear_rows(torch.randn(2, 3), torch.randn(4, 3), torch.randn(5))


# ---- every instruction set's build -----------------------------------------------------------------------------------

_OTHER_ISA_CHECK = """
import torch, resnet_fused
import torch.nn.functional as F
ops = torch.ops.resnet_fused
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(2, 21, 9, 8).to(dtype).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ops.max_pool2d_cl(x, [3, 3], [2, 2], [1, 1]), F.max_pool2d(x, 3, 2, 1))
    torch.testing.assert_close(ops.mean_pool_cl(x).float(), F.adaptive_avg_pool2d(x.float(), 1), rtol=1e-2,
                               atol=1e-2)
a, w, b = torch.randn(3, 37), torch.randn(11, 37), torch.randn(11)
torch.testing.assert_close(ops.linear_rows(a, w, b), F.linear(a, w, b), rtol=1e-5, atol=1e-5)
"""


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_every_instruction_set_build_matches_aten(isa):
    order = ["default", "avx2", "avx512"]
    if order.index(isa) >= order.index(rf._C.cpu_batch_norm_isa()):  # the same choice as the edge kernels'
        pytest.skip(f"this process already runs the {rf._C.cpu_batch_norm_isa()} build")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    proc = subprocess.run([sys.executable, "-c", _OTHER_ISA_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- the modules -----------------------------------------------------------------------------------------------------


def _ran(fn, op: str) -> bool:
    with torch.profiler.profile() as prof:
        fn()
    return any(event.name == f"resnet_fused::{op}" for event in prof.events())


def _model():
    torch.manual_seed(0)
    return resnet.resnet18(num_classes=10).eval().to(memory_format=CL)


def test_fuse_model_swaps_the_edges_in_place_and_keeps_every_tensor():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused, report = rf.fuse_model(model, backend="cpu")
    assert [(item.name, item.kind) for item in report.edges] == [("maxpool", "max-pool"), ("avgpool", "avg-pool"),
                                                                ("fc", "linear")]
    assert "edge   fc [linear]" in report.summary() and not report.left
    assert type(fused.maxpool) is edges.FusedMaxPool2d and isinstance(fused.maxpool, nn.MaxPool2d)
    assert type(fused.fc) is edges.FusedLinear and fused.fc.backend == "cpu"
    state = fused.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())
    unfused = _model()
    unfused.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    with torch.inference_mode():
        assert _ran(lambda: fused(x), "max_pool2d_cl") and _ran(lambda: fused(x), "linear_rows")
        assert _ran(lambda: fused(x), "mean_pool_cl")
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_other_backends_keep_the_torch_modules(backend):
    fused, report = rf.fuse_model(_model(), backend=backend)
    assert not report.edges and type(fused.maxpool) is nn.MaxPool2d and type(fused.fc) is nn.Linear


def test_unsupported_configurations_stay_torch_modules():
    model = nn.Sequential(nn.MaxPool2d(3, 2, 1, dilation=2), nn.MaxPool2d(2, ceil_mode=True),
                          nn.MaxPool2d(2, return_indices=True), nn.AdaptiveAvgPool2d(2), nn.AdaptiveMaxPool2d(1))
    fused, report = rf.fuse_model(model, backend="cpu")
    assert not report.edges and [type(m) for m in fused] == [type(m) for m in model]


def test_calls_the_kernels_cannot_take_run_the_torch_forward():
    pool, avg, fc = edges.FusedMaxPool2d(3, 2, 1), edges.FusedAdaptiveAvgPool2d(1), edges.FusedLinear(12, 5)
    pool.backend = avg.backend = fc.backend = "cpu"
    x = torch.randn(2, 12, 9, 9)
    cases = [
        (lambda: pool(x), "max_pool2d_cl", lambda: F.max_pool2d(x, 3, 2, 1)),  # NCHW
        (lambda: avg(x), "mean_pool_cl", lambda: F.adaptive_avg_pool2d(x, 1)),
        (lambda: fc(torch.randn(40, 12)), "linear_rows", None),  # more rows than LINEAR_MAX_ROWS
        (lambda: fc(torch.randn(2, 3, 12)), "linear_rows", None),  # 3-D
        (lambda: pool(x.double().contiguous(memory_format=CL)), "max_pool2d_cl", None),
    ]
    with torch.no_grad():
        for call, op, reference in cases:
            assert not _ran(call, op)
            if reference is not None:
                assert torch.equal(call(), reference())
    xr = x.contiguous(memory_format=CL).requires_grad_()
    out = fc(avg(pool(xr)).flatten(1))  # autograd records: the torch forwards, with gradients
    out.sum().backward()
    assert xr.grad is not None and fc.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ran(lambda: fc(torch.randn(2, 12)), "linear_rows")
        assert fc(torch.randn(2, 12)).dtype == torch.bfloat16
    fc.backend = pool.backend = "auto"  # follows use_backend, as the fused blocks do
    with torch.no_grad():
        assert _ran(lambda: fc(torch.randn(2, 12)), "linear_rows")
        with rf.use_backend("torch"):
            assert not _ran(lambda: pool(x.contiguous(memory_format=CL)), "max_pool2d_cl")
        with rf.use_backend("cpu"):
            assert _ran(lambda: pool(x.contiguous(memory_format=CL)), "max_pool2d_cl")


def test_changes_after_a_forward_are_seen():
    fused, _ = rf.fuse_model(_model(), backend="cpu")
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x)
        fused.fc.weight.mul_(2)
        fused.fc.bias.add_(1)
        fused.maxpool.ceil_mode = True  # the kernel does not take it: the torch forward does
        unfused = _model()
        unfused.load_state_dict(fused.state_dict())
        unfused.maxpool.ceil_mode = True
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-4, atol=1e-4)
        assert not _ran(lambda: fused(x), "max_pool2d_cl") and _ran(lambda: fused(x), "linear_rows")


def test_fused_edges_copy_and_pickle():
    fused, _ = rf.fuse_model(_model(), backend="cpu")
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(fused)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=CL)
    with torch.inference_mode():
        expected = fused(x)
        for other in (loaded, clone):
            assert type(other.fc) is edges.FusedLinear and other.fc.backend == "cpu"
            assert torch.equal(other(x), expected)
