"""The "triton" backend's convolution inside: the weight pack's layout and its inverse, the 64-bit offsets path,
split K (its chooser and every forced split), the checks of the torch.library ops (which anyone can call
directly), the library ops chained under torch.compile, and on a GPU: a second device, fp32 without TF32,
tensors past 2^31 elements, Inductor. The op itself, on every backend, is tested in tests/ops/test_conv_bn_act.py.

Without a GPU everything runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

import resnet_fused as rf
from resnet_fused.ops import pack_conv_bn
from tests.oracle import (CONV_CASES, GPU_CONV_CASES, assert_matches, make_conv_inputs, ref_add_relu, ref_bn_act,
                          ref_conv_bn_act)
from tests.targets import DTYPE_IDS, DTYPES, Target, on_cpu

if rf.available_backends("cpu" if not torch.cuda.is_available() else "cuda")["triton"] is not None:
    pytest.skip("the triton backend is unavailable here (triton not importable)", allow_module_level=True)

from resnet_fused.kernels.triton import conv_bn_act as conv_kernel  # noqa: E402
from resnet_fused.kernels.triton import tuning  # noqa: E402
from resnet_fused.ops.backends import triton_library  # noqa: E402,F401  (registers torch.ops.resnet_fused_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.resnet_fused_triton
CL = torch.channels_last
# fp32 is exact in the interpreter but goes through TF32 on the GPU while cudnn.allow_tf32 is on (the default)
tol = Target("triton", DEVICE).tol


def launch_conv(x, w, scale, shift, res, stride, padding, relu, **options):
    """The conv launcher on its own (the public ops check arguments and allocate the output before it)."""
    out = torch.empty(rf.ops.conv_output_shape(x.shape, w.shape[0], w.shape[2:], stride, padding), dtype=x.dtype,
                      device=x.device, memory_format=CL)
    return conv_kernel.conv_bn_act(x, conv_kernel.pack_weight(w), scale, shift, res, out, w.shape[2], w.shape[3],
                                   stride, padding, relu, **options)


def run_conv(case, dtype, device):
    """The public op with a residual and ReLU, against the oracle."""
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, device, residual=True)
    y = rf.conv_bn_act(x, w, scale, shift, res, stride=stride, padding=padding, backend="triton").cpu()
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert_matches(y, ref_conv_bn_act(*on_cpu(x, w, scale, shift, res), stride, padding, True), tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flat_k_pack_layout(dtype):
    """The stem (Cin=3): K = 7*7*3 = 147 rows flattened in (kh, kw, cin) order, zero-padded to 160."""
    _, w, scale, shift, _, stride, padding = make_conv_inputs(CONV_CASES[4], dtype, DEVICE)
    pack = pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend="triton")
    assert pack.backend == "triton"
    packed = pack.payload.weight
    assert packed.shape == (160, 16) and packed.dtype == dtype
    assert torch.equal(packed[:147], w.permute(2, 3, 1, 0).reshape(147, 16)) and not packed[147:].any()


@pytest.mark.parametrize("case", [CONV_CASES[3], CONV_CASES[4]], ids=["per_tap_3x3", "flat_k_stem"])
def test_conv_bn_act_64bit_offsets_path(case):
    """The INDEX_64 code path (chosen automatically past 2^31 elements) computes the same result."""
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, torch.float32, DEVICE, True)
    for index_64 in (False, True):
        y = launch_conv(x, w, scale, shift, res, stride, padding, True, index_64=index_64)
        assert_matches(y, ref_conv_bn_act(x, w, scale, shift, res, stride, padding, True), tol(torch.float32))


# Split K: the 1x1 case has one K step here (Cin=16), so most slices are empty; 3x3 and the stem's flat K have
# several steps, split evenly (2) and unevenly (3, 8: a short or empty last slice).
SPLIT_CASES = [CONV_CASES[1], CONV_CASES[3], CONV_CASES[4], CONV_CASES[8]]


@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_bn_act_split_k(dtype, case, split_k):
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, DEVICE, residual=True)
    for r, relu in ((res, True), (None, False)):
        y = launch_conv(x, w, scale, shift, r, stride, padding, relu, split_k=split_k)
        assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
        assert_matches(y.cpu(), ref_conv_bn_act(*on_cpu(x, w, scale, shift, r), stride, padding, relu), tol(dtype))


def test_split_k_candidate_fills_one_wave_of_sms():
    sms = 132
    assert tuning.split_k_candidate(256 * 56 * 56, 64, 64 * 9, sms) == 1  # batch 256: many waves already
    assert tuning.split_k_candidate(49, 512, 512 * 9, sms) == 16  # layer4 3x3 at batch 1: 8 tiles, 144 steps
    assert tuning.split_k_candidate(196, 256, 256 * 9, sms) == 8   # layer3 3x3 at batch 1: 16 tiles, 72 steps
    assert tuning.split_k_candidate(49, 512, 64, sms) == 1        # 2 steps of K: nothing to split
    for m, c_out, k_rows in [(49, 2048, 512), (1, 64, 147), (3136, 64, 576), (784, 128, 1152)]:
        split = tuning.split_k_candidate(m, c_out, k_rows, sms)
        tiles = -(-m // 64) * -(-c_out // 64)
        assert split == 1 or (tiles * split <= sms and k_rows // 32 // split >= tuning.SPLIT_K_MIN_STEPS)


def test_choose_split_k_times_both_once_and_remembers(monkeypatch):
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(tuning, "split_choices", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    calls = []
    seconds = {1: 3.0, 8: 1.0}
    monkeypatch.setattr(tuning, "graph_replay_ms", lambda fn: (fn(), seconds[calls[-1]])[1])
    assert tuning.choose_split_k("key", 8, calls.append) == 8
    assert set(calls) == {1, 8}
    calls.clear()
    assert tuning.choose_split_k("key", 8, calls.append) == 8 and not calls  # remembered, not re-timed
    seconds[1] = 0.5
    assert tuning.choose_split_k("other", 8, calls.append) == 1
    assert tuning.choose_split_k("none", 1, calls.append) == 1  # nothing to compare
    assert tuning.split_choices == {"key": 8, "other": 1, "none": 1}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls.clear()
    assert tuning.choose_split_k("captured", 8, calls.append) == 1 and not calls  # no timing inside a graph


def test_split_k_argument_is_checked():
    x, w, scale, shift, _, stride, padding = make_conv_inputs(CONV_CASES[2], torch.float32, DEVICE)
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        launch_conv(x, w, scale, shift, None, stride, padding, True, split_k=0)


def test_per_tap_pack_pads_each_tap_to_16_channels():
    w = torch.randn(8, 20, 3, 3, device=DEVICE)
    packed = conv_kernel.pack_weight(w)
    assert packed.shape == (3 * 3 * 32, 8)
    taps = packed.view(3, 3, 32, 8)
    assert torch.equal(taps[:, :, :20], w.permute(2, 3, 1, 0)) and not taps[:, :, 20:].any()


def test_conv_op_rejects_mismatched_pack():
    x = torch.randn(1, 32, 4, 4, device=DEVICE)
    packed = conv_kernel.pack_weight(torch.randn(8, 16, 3, 3, device=DEVICE))  # packed for Cin=16
    with pytest.raises(RuntimeError, match="weight_packed must be"):
        OPS.conv_bn_act(x, packed, torch.ones(8), torch.zeros(8), None, 3, 3, 1, 1, True)


def test_ops_check_every_length_and_shape_before_the_kernel_reads():
    # The launchers trust their arguments (the public ops check them); the torch.library ops, which anyone can
    # call directly, check what the kernels would otherwise read out of bounds.
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    scale, shift = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"scale must have one value per channel \(8\)"):
        OPS.bn_act(x, scale[:2], shift, None, False)
    with pytest.raises(RuntimeError, match=r"residual must be torch.float32 of shape \(2, 8, 3, 3\)"):
        OPS.bn_act(x, scale, shift, x[:, :, :1, :1], False)
    with pytest.raises(RuntimeError, match=r"residual must be torch.float32 of shape \(2, 8, 3, 3\)"):
        OPS.add_relu(x, x[:1])
    packed = conv_kernel.pack_weight(torch.randn(4, 8, 3, 3, device=DEVICE))
    with pytest.raises(RuntimeError, match=r"shift must have one value per channel \(4\)"):
        OPS.conv_bn_act(x, packed, scale[:4], shift[:3], None, 3, 3, 1, 1, True)
    with pytest.raises(RuntimeError, match=r"residual must be torch.float32 of shape \(2, 4, 3, 3\)"):
        OPS.conv_bn_act(x, packed, scale[:4], shift[:4], torch.randn(2, 4, 2, 2, device=DEVICE), 3, 3, 1, 1, True)
    with pytest.raises(RuntimeError, match="weight_packed must be"):
        OPS.conv_bn_act(x, packed.half(), scale[:4], shift[:4], None, 3, 3, 1, 1, True)


def test_unpack_weight_inverts_pack_weight():
    for c_in, k in ((3, 7), (24, 3), (16, 1)):
        w = torch.randn(8, c_in, k, k, device=DEVICE)
        assert torch.equal(conv_kernel.unpack_weight(conv_kernel.pack_weight(w), c_in, k, k), w)


def _residual_block(x, pack, scale, shift):
    """conv -> bn_act -> add_relu, as a fused block would chain them."""
    y = OPS.conv_bn_act(x, pack, scale, shift, None, 3, 3, 1, 1, False)
    y = OPS.bn_act(y, scale, shift, x, True)
    return OPS.add_relu(y, x)


def _compile_check(backend):
    torch._dynamo.reset()
    x = torch.randn(2, 16, 6, 6, device=DEVICE)
    w = torch.randn(16, 16, 3, 3, device=DEVICE) / 12
    scale, shift = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)
    pack = conv_kernel.pack_weight(w)
    compiled = torch.compile(_residual_block, fullgraph=True, backend=backend)
    got = compiled(x, pack, scale, shift)
    y = ref_conv_bn_act(x, w, scale, shift, None, 1, 1, False)
    expected = ref_add_relu(ref_bn_act(y, scale, shift, x, True), x)
    assert_matches(got, expected, tol(torch.float32))


def test_torch_compile_fullgraph_aot_eager():
    _compile_check("aot_eager")


@pytest.mark.gpu
def test_gpu_second_device_while_the_first_is_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    with torch.cuda.device(0):
        run_conv(GPU_CONV_CASES[8], torch.bfloat16, "cuda:1")


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [None, 2, 5, 16])
@pytest.mark.parametrize("case", [GPU_CONV_CASES[6], GPU_CONV_CASES[8], GPU_CONV_CASES[0]], ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_conv_bn_act_split_k(dtype, case, split_k):
    """Forced splits (even, uneven, 16) on the tensor cores, and None: whatever choose_split_k measured faster."""
    x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, "cuda", residual=True)
    y = launch_conv(x, w, scale, shift, res, stride, padding, True, split_k=split_k)
    assert_matches(y.cpu(), ref_conv_bn_act(*on_cpu(x, w, scale, shift, res), stride, padding, True), tol(dtype))


@pytest.mark.gpu
def test_gpu_graph_replay_timer():
    x = torch.randn(1 << 22, device="cuda")
    small, large = tuning.graph_replay_ms(lambda: x[: 1 << 12].mul_(1.0)), \
        tuning.graph_replay_ms(lambda: x.mul_(1.0))
    assert 0 < small < large  # 4 K vs 4 M elements: a timer that measures the GPU work tells them apart


@pytest.mark.gpu
def test_gpu_conv_bn_act_fp32_ieee_when_tf32_is_off(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    run_conv(GPU_CONV_CASES[2], torch.float32, "cuda")  # tol() is now the tight fp32 one


@pytest.mark.gpu
@pytest.mark.slow  # 4 GB tensors: kept out of the compute-sanitizer pass (-m "gpu and not slow")
def test_gpu_tensors_past_2_31_elements():
    """64-bit offsets: a 1x1 conv and bn_act on a 2.2e9-element fp16 tensor; check the far end against the oracle."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs a GPU with >= 40 GiB")
    x = torch.randn(1, 16, 11600, 11600, device="cuda", dtype=torch.float16).contiguous(memory_format=CL)
    assert x.numel() > 2**31
    w = (torch.randn(16, 16, 1, 1, device="cuda") / 4).half()
    scale, shift = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    tail, w_cpu, scale_cpu, shift_cpu = on_cpu(x[:, :, -3:, :], w, scale, shift)
    y = rf.conv_bn_act(x, w, scale, shift, backend="triton")
    assert_matches(y[:, :, -3:, :].cpu(), ref_conv_bn_act(tail, w_cpu, scale_cpu, shift_cpu, None, 1, 0, True),
                   torch.float16)
    del y
    z = rf.bn_act(x, scale, shift, backend="triton")
    assert_matches(z[:, :, -3:, :].cpu(), ref_bn_act(tail, scale_cpu, shift_cpu, None, True), torch.float16)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    _compile_check("inductor")
