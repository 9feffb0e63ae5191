"""The "cuda" backend's Hopper path (csrc/cuda/sm90: CUTLASS, TMA + wgmma, fused epilogue) on an sm_90 GPU.

Every distinct ResNet-50 conv (read off the model) in bf16, fp16 and fp32 (TF32) at batch 1 and 3, each with its
role in the network (ReLU, residual); every residual/ReLU combination on a few shapes, through the op and the
packed path; odd sizes and partial tiles; the split-K GEMM for small M, with and without its im2col copy; tensors
past 2^31 elements; misaligned tensors (which the WMMA kernel takes); and the WMMA kernel on every shape with the
Hopper kernels switched off (_C.cuda_set_sm90_enabled). All against the fp32 oracle; the profiler shows which
kernel ran, so the tests also prove that each call reaches the kernel the plan (_C.cuda_conv_plan) names.

Skipped (with the reason) without a compute capability 9.0 GPU or without an extension built with the sm_90a
kernels; tests/ops/test_conv_bn_act.py covers the backend on every GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resnet_fused as rf
from resnet_fused.benchmarking.layers import conv_layers
from tests.oracle import GPU_CONV_CASES, GPU_CONV_IDS, assert_matches, ref_conv_bn_act

DEVICE = "cuda"
CL = torch.channels_last
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
CUTLASS_KERNEL = "cutlass::device_kernel"  # the CUDA kernel name of every CUTLASS kernel
# Which kernel name shows that a plan's kind ran: CUTLASS's conv, its GEMM (split-K), or the portable WMMA kernel.
KERNEL_OF_PLAN = {"sm90": "ConvUniversal", "sm90_split_k": "GemmUniversal", "wmma": "conv_bn_act_kernel"}
WMMA_KERNEL = KERNEL_OF_PLAN["wmma"]


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU; none is present on this machine"
    reason = rf.available_backends("cuda").get("cuda")
    if reason is not None:
        return f"the 'cuda' backend is unavailable: {reason}"
    from resnet_fused import _C

    if not _C.cuda_sm90_built:
        return "the extension was built without the sm_90a kernels (no CUTLASS headers at build time)"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs compute capability 9.0, this GPU has {torch.cuda.get_device_capability()}"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

RESNET50_CONVS = conv_layers(rf.resnet50(), image_size=224)


def tol(dtype):
    return "tf32" if dtype == torch.float32 else dtype


def conv_inputs(n, cin, h, w, cout, k, stride, padding, dtype, residual):
    x = torch.randn(n, cin, h, w, device=DEVICE).to(dtype).contiguous(memory_format=CL)
    weight = (torch.randn(cout, cin, k, k, device=DEVICE) / (cin * k * k) ** 0.5).to(dtype)
    scale = torch.rand(cout, device=DEVICE) + 0.5
    shift = torch.randn(cout, device=DEVICE)
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    res = torch.randn(n, cout, ho, wo, device=DEVICE).to(dtype).contiguous(memory_format=CL) if residual else None
    return x, weight, scale, shift, res


def plan(x, weight, stride, padding):
    from resnet_fused import _C

    n, cin, h, w = x.shape
    aligned = all(t.data_ptr() % 16 == 0 for t in (x, weight))
    return _C.cuda_conv_plan(x.dtype, n, h, w, cin, weight.shape[0], weight.shape[2], stride, padding,
                             torch.cuda.get_device_capability(), torch.cuda.get_device_properties(0).multi_processor_count,
                             True, aligned)


def cuda_kernels_run(fn):
    """(result of fn(), names of the CUDA kernels it launched)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return out, names


def run_and_check(x, weight, scale, shift, res, stride, padding, relu, packed=False):
    """Run through the public op, compare with the oracle, and check the kernel the plan names is the one that ran."""
    if packed:
        pack = rf.pack_conv_bn(weight, scale, shift, stride=stride, padding=padding, backend="cuda")
        call = lambda: rf.conv_bn_act_packed(x, pack, res, relu=relu)  # noqa: E731
    else:
        call = lambda: rf.conv_bn_act(x, weight, scale, shift, res, stride=stride, padding=padding,  # noqa: E731
                                      relu=relu, backend="cuda")
    y, kernels = cuda_kernels_run(call)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=CL)
    expected = ref_conv_bn_act(x, weight, scale, shift, res, stride, padding, relu)
    assert_matches(y, expected, tol(x.dtype))
    kind = plan(x, weight, stride, padding)[0]
    assert any(KERNEL_OF_PLAN[kind] in k for k in kernels), f"plan {kind}: expected {KERNEL_OF_PLAN[kind]}, ran {kernels}"
    return kind


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layer", RESNET50_CONVS, ids=[layer.name for layer in RESNET50_CONVS])
def test_resnet50_convs(layer, dtype, batch):
    x, weight, scale, shift, res = conv_inputs(batch, layer.cin, layer.h, layer.w, layer.cout, layer.kernel,
                                               layer.stride, layer.padding, dtype, layer.residual)
    kind = run_and_check(x, weight, scale, shift, res, layer.stride, layer.padding, layer.relu)
    assert (kind == "wmma") == (layer.cin == 3), f"{layer.name} ran on {kind}"


EPILOGUE_CASES = [  # (id, N, Cin, H, W, Cout, k, stride, padding): the conv kernel, then split-K (fp16/bf16)
    ("3x3", 2, 64, 56, 56, 64, 3, 1, 1),
    ("1x1_expand", 2, 256, 14, 14, 1024, 1, 1, 0),
    ("1x1_s2_downsample", 2, 512, 28, 28, 1024, 1, 2, 0),
    ("3x3_s2_split_k_im2col", 2, 256, 28, 28, 256, 3, 2, 1),
    ("1x1_split_k", 1, 2048, 7, 7, 512, 1, 1, 0),
]


@pytest.mark.parametrize("packed", [False, True], ids=["op", "packed"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", EPILOGUE_CASES, ids=[c[0] for c in EPILOGUE_CASES])
def test_epilogue_variants(case, dtype, residual, relu, packed):
    _, n, cin, h, w, cout, k, stride, padding = case
    x, weight, scale, shift, res = conv_inputs(n, cin, h, w, cout, k, stride, padding, dtype, residual)
    kind = run_and_check(x, weight, scale, shift, res, stride, padding, relu, packed)
    assert kind == ("sm90_split_k" if "split_k" in case[0] and dtype != torch.float32 else "sm90")


ODD_CASES = [  # partial M and N tiles, K blocks shorter than a tile, odd spatial sizes, 5x5, stride 3, tiny M
    ("odd", 3, 40, 17, 13, 72, 3, 1, 1),
    ("cin8_cout8", 2, 8, 9, 11, 8, 3, 1, 1),
    ("cin24_cout200", 1, 24, 15, 9, 200, 1, 1, 0),
    ("5x5_pad2", 2, 16, 13, 13, 48, 5, 1, 2),
    ("3x3_s2_odd", 1, 32, 9, 7, 32, 3, 2, 1),
    ("3x3_s3_pad0", 2, 16, 20, 17, 24, 3, 3, 0),
    ("1x1_pad1", 1, 16, 5, 5, 16, 1, 1, 1),
    ("m1", 1, 64, 1, 1, 128, 1, 1, 0),
    ("wide_m", 4, 64, 64, 80, 64, 3, 1, 1),
    # split-K (fp16/bf16): K not a multiple of the 64-wide block, a partial N tile, M of 63 in a 128-row tile
    ("split_k_partial_tiles", 1, 264, 9, 7, 136, 3, 1, 1),
    ("split_k_1x1_padded", 1, 512, 5, 5, 64, 1, 1, 1),  # a 1x1 conv that still needs the im2col copy
]


@pytest.mark.parametrize("residual", [False, True], ids=["no_res", "res"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ODD_CASES, ids=[c[0] for c in ODD_CASES])
def test_odd_shapes(case, dtype, residual):
    _, n, cin, h, w, cout, k, stride, padding = case
    x, weight, scale, shift, res = conv_inputs(n, cin, h, w, cout, k, stride, padding, dtype, residual)
    kind = run_and_check(x, weight, scale, shift, res, stride, padding, relu=True)
    assert kind == ("sm90_split_k" if case[0].startswith("split_k") and dtype != torch.float32 else "sm90")


def _misaligned(t):
    """A channels_last copy of t whose data starts 2 bytes past a 16-byte boundary."""
    n, c, h, w = t.shape
    flat = torch.empty(t.numel() + 8, device=t.device, dtype=t.dtype)
    view = flat[1:1 + t.numel()].view(n, h, w, c).permute(0, 3, 1, 2)
    view.copy_(t)
    return view


@pytest.mark.parametrize("which", ["x", "residual"])
def test_misaligned_tensors_run_on_the_wmma_kernel(which):
    x, weight, scale, shift, res = conv_inputs(2, 64, 14, 14, 64, 3, 1, 1, torch.bfloat16, residual=True)
    if which == "x":
        x = _misaligned(x)
    else:
        res = _misaligned(res)
    y, kernels = cuda_kernels_run(lambda: rf.conv_bn_act(x, weight, scale, shift, res, stride=1, padding=1,
                                                         backend="cuda"))
    assert_matches(y, ref_conv_bn_act(x, weight, scale, shift, res, 1, 1, True), tol(x.dtype))
    assert any(WMMA_KERNEL in k for k in kernels) and not any(CUTLASS_KERNEL in k for k in kernels), kernels


def test_nan_and_inf_propagate_as_in_torch():
    """ReLU keeps NaN (torch.relu does); without ReLU, -inf stays -inf (the epilogue's floor is -inf, not -max)."""
    x, weight, scale, shift, _ = conv_inputs(1, 64, 8, 8, 64, 1, 1, 0, torch.bfloat16, residual=False)
    shift[0], shift[1], shift[2] = float("nan"), float("-inf"), float("inf")
    for relu in (True, False):
        y = rf.conv_bn_act(x, weight, scale, shift, stride=1, padding=0, relu=relu, backend="cuda").float()
        assert torch.isnan(y[:, 0]).all()
        assert (y[:, 1] == (0.0 if relu else float("-inf"))).all()
        assert (y[:, 2] == float("inf")).all()


def _check_rows(y, x, weight, scale, shift, rows):
    """y's last `rows` output rows against the oracle computed on the matching input rows (1x1, stride 1)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected = F.conv2d(x[:, :, -rows:].float(), weight.float())
    expected = expected * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert_matches(y[:, :, -rows:], torch.relu(expected), tol(x.dtype))


@pytest.mark.slow
def test_input_past_2_to_the_31_elements():
    """x of 2.2e9 elements (4.4 GB bf16): TMA addresses it with 64-bit strides; M stays below 2^31."""
    x = torch.randn(1, 2048, 1040, 1024, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=CL)
    assert x.numel() > 2 ** 31
    weight = (torch.randn(16, 2048, 1, 1, device=DEVICE) / 2048 ** 0.5).to(torch.bfloat16)
    scale, shift = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)
    y, kernels = cuda_kernels_run(lambda: rf.conv_bn_act(x, weight, scale, shift, backend="cuda"))
    assert any(CUTLASS_KERNEL in k for k in kernels), kernels
    _check_rows(y, x, weight, scale, shift, rows=4)


@pytest.mark.slow
def test_output_past_2_to_the_31_elements():
    """y of 2.2e9 elements: the epilogue's 64-bit strides reach its last rows."""
    x = torch.randn(1, 16, 1040, 1024, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=CL)
    weight = (torch.randn(2048, 16, 1, 1, device=DEVICE) / 4).to(torch.bfloat16)
    scale, shift = torch.rand(2048, device=DEVICE) + 0.5, torch.randn(2048, device=DEVICE)
    y, kernels = cuda_kernels_run(lambda: rf.conv_bn_act(x, weight, scale, shift, backend="cuda"))
    assert y.numel() > 2 ** 31 and any(CUTLASS_KERNEL in k for k in kernels), kernels
    _check_rows(y, x, weight, scale, shift, rows=4)


@pytest.fixture
def sm90_off():
    from resnet_fused import _C

    _C.cuda_set_sm90_enabled(False)
    try:
        yield
    finally:
        _C.cuda_set_sm90_enabled(True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GPU_CONV_CASES, ids=GPU_CONV_IDS)
def test_wmma_kernel_still_serves_every_shape_with_sm90_off(sm90_off, case, dtype):
    """The portable kernel (sm_80-sm_89 GPUs, and what TMA cannot take here) keeps its GPU coverage on Hopper."""
    _, n, cin, h, w, cout, k, stride, padding = case
    x, weight, scale, shift, res = conv_inputs(n, cin, h, w, cout, k, stride, padding, dtype, residual=True)
    y, kernels = cuda_kernels_run(lambda: rf.conv_bn_act(x, weight, scale, shift, res, stride=stride,
                                                         padding=padding, backend="cuda"))
    assert_matches(y, ref_conv_bn_act(x, weight, scale, shift, res, stride, padding, True), tol(dtype))
    assert any(WMMA_KERNEL in k for k in kernels) and not any(CUTLASS_KERNEL in k for k in kernels), kernels


def test_backend_reports_the_sm90_path():
    assert rf.ops.registry._BACKENDS["cuda"].kernel_path(DEVICE).startswith("sm90:")
