"""The "cpu" backend's Winograd F(4x4, 3x3) path (csrc/cpu/winograd.cpp) against the fp32 oracle.

The op itself over partial tiles (H, W not multiples of 4), channel counts off the 16-lane block, batch > 1, both
buffer layouts (position-major and tile-major, each at few and many tiles), the products by MKL, by oneDNN (a
36-group 1x1 convolution) or by the implicit GEMM's register tile per block of tiles (its panels), NCHW and
channels_last inputs, residual and ReLU on and off; the packed path choosing it (its layout and its products) by this
CPU's rules for fp32 3x3 stride-1 convs with enough tiles (and not for the others), with one transform per pack; where
a NaN input goes; argument errors.
"""

import math
import threading

import pytest
import torch

import resnet_fused as rf
from resnet_fused import _C
from resnet_fused.ops.backends import cpu as cpu_backend
from resnet_fused.ops.backends.cpu import WinogradRule, WinogradWeight
from tests.oracle import assert_matches, ref_conv_bn_act

pytestmark = pytest.mark.skipif(rf.available_backends("cpu")["cpu"] is not None,
                                reason=f"the 'cpu' backend is unavailable: {rf.available_backends('cpu')['cpu']}")

CL = torch.channels_last
WINOGRAD = torch.ops.resnet_fused.conv3x3_winograd.default
TRANSFORM = torch.ops.resnet_fused.winograd_weight.default
# (N, C_in, H, W, C_out): whole and partial 4x4 tiles, 1-pixel images, channels on and off the 16-lane block, few
# tiles and many (the last two: 544 and 306).
SHAPES = [(2, 16, 8, 8, 32), (1, 5, 7, 9, 7), (3, 33, 6, 5, 17), (1, 64, 1, 1, 16), (2, 24, 13, 4, 40),
          (1, 64, 14, 14, 64), (2, 8, 66, 62, 12), (1, 17, 70, 65, 5)]


def conv_inputs(shape, residual, channels_last):
    n, cin, h, w, cout = shape
    x = torch.randn(n, cin, h, w)
    x = x.contiguous(memory_format=CL) if channels_last else x
    weight = torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5
    bias = torch.randn(cout)
    res = torch.randn(n, cout, h, w) if residual else None
    return x, weight, bias, res


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("position_major", [True, False], ids=["position_major", "tile_major"])
def test_winograd_op_matches_oracle(shape, residual, relu, channels_last, position_major):
    x, weight, bias, res = conv_inputs(shape, residual, channels_last)
    y = WINOGRAD(x, TRANSFORM(weight), bias, res, relu, position_major)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 1, relu)
    assert_matches(y, expected, torch.float32)


def onednn_u(weight, x_shape):
    """The transform as oneDNN's products read it: a 36-group 1x1 weight, reordered for x's tile count."""
    return cpu_backend._grouped_products_weight(TRANSFORM(weight), x_shape)


needs_gemm = pytest.mark.skipif(not _C.cpu_conv_gemm_available(),
                                reason="the panels' products run the implicit GEMM's AVX2 + FMA kernel")


@pytest.fixture
def products_by_the_vendor_rule(monkeypatch):
    """Winograd's products as WINOGRAD_RULE says (MKL's or oneDNN's), never the GEMM's panels."""
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE",
                        cpu_backend.CONV_GEMM_RULE._replace(max_in_cache_winograd_channels=0))


@needs_gemm
@pytest.mark.parametrize("shape", SHAPES + [(1, 256, 9, 6, 130)], ids=["x".join(map(str, s)) for s in SHAPES] +
                         ["1x256x9x6x130"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_winograd_op_with_panels_matches_oracle(shape, residual, relu, channels_last):
    # blocks of at most 6 tiles, the tiles spread evenly over a multiple of the thread count (4-6 per block), C_in up
    # to the GEMM's 256-deep K block, C_out across several panels and off them
    x, weight, bias, res = conv_inputs(shape, residual, channels_last)
    y = WINOGRAD(x, cpu_backend._winograd_panels(TRANSFORM(weight)), bias, res, relu, False)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 1, relu)
    assert_matches(y, expected, torch.float32)
    # the same products as MKL's, summed in another order (over 256 channels: differences up to 2.5e-5)
    torch.testing.assert_close(y, WINOGRAD(x, TRANSFORM(weight), bias, res, relu, False), rtol=1e-4, atol=1e-4)


@needs_gemm
def test_panels_results_do_not_depend_on_the_thread_count(set_threads):
    # 24 tiles: 4 blocks of 6 on 1 and 2 threads, 6 blocks of 4 on 3
    x, weight, bias, res = conv_inputs((2, 24, 13, 11, 40), True, True)
    u = cpu_backend._winograd_panels(TRANSFORM(weight))
    outputs = []
    for count in (1, 2, 3):
        set_threads(count)
        outputs.append(WINOGRAD(x, u, bias, res, True, False))
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_winograd_op_with_onednn_products_matches_oracle(shape, residual, relu, channels_last):
    x, weight, bias, res = conv_inputs(shape, residual, channels_last)
    u = onednn_u(weight, x.shape)
    assert u.is_mkldnn
    y = WINOGRAD(x, u, bias, res, relu, False)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 1, relu)
    assert_matches(y, expected, torch.float32)
    torch.testing.assert_close(y, WINOGRAD(x, TRANSFORM(weight), bias, res, relu, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("products", ["mkl", pytest.param("panels", marks=needs_gemm)])
def test_into_residual_takes_the_residuals_buffer_but_never_the_inputs(products):
    x, weight, bias, res = conv_inputs((2, 16, 9, 7, 16), True, True)
    res = res.contiguous(memory_format=CL)
    u = TRANSFORM(weight) if products == "mkl" else cpu_backend._winograd_panels(TRANSFORM(weight))
    expected = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 1, True)
    y = WINOGRAD(x, u, bias, res, True, True, True)
    assert y.data_ptr() == res.data_ptr()
    assert_matches(y, expected, torch.float32)
    # x as its own residual: its buffer is never the output's
    expected, before = ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, x, 1, 1, True), x.clone()
    y = WINOGRAD(x, u, bias, x, True, True, True)
    assert y.data_ptr() != x.data_ptr() and torch.equal(x, before)
    assert_matches(y, expected, torch.float32)


def on_a_fresh_thread(calls):
    """Run calls() on a new thread (its kept workspace made there), re-raising what it raised here."""
    errors = []

    def guarded():
        try:
            calls()
        except Exception as error:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(error)

    thread = threading.Thread(target=guarded)
    thread.start()
    thread.join()
    assert not errors, errors


def test_winograd_results_survive_later_calls():
    # The transformed buffers are reused between calls on a thread (a kept workspace): an earlier output must not
    # alias it, a smaller call after a larger one must not read the larger one's leftovers, and a buffer first made
    # under inference_mode must serve calls outside it (the CI failure of a workspace kept as a tensor).
    # A first call under inference_mode and later ones outside it: the kept buffer serves both.
    # A fresh thread, so that the buffer is made by its first call here.
    big, small = conv_inputs((2, 32, 20, 20, 48), True, True), conv_inputs((1, 8, 5, 7, 4), False, True)
    outputs = []

    def calls():
        for (x, weight, bias, res), inference in ((big, True), (small, False), (big, False), (small, True)):
            with torch.inference_mode(inference):
                outputs.append((WINOGRAD(x, TRANSFORM(weight), bias, res, True, True), x, weight, bias, res))

    on_a_fresh_thread(calls)
    assert len(outputs) == 4
    for y, x, weight, bias, res in outputs:
        assert_matches(y, ref_conv_bn_act(x, weight, torch.ones_like(bias), bias, res, 1, 1, True), torch.float32)


@pytest.mark.parametrize("products", ["mkl", "onednn", pytest.param("panels", marks=needs_gemm)])
def test_winograd_nan_fills_the_tiles_that_read_it(products):
    # Every transformed value mixes the whole 6x6 input tile, so a NaN input makes NaN of every output of the 4x4
    # tiles whose input tile holds it (eager: its 3x3 neighbourhood), and the ReLU keeps it. x[2, 2] lies only in
    # tile (0, 0)'s input rows and columns -1 .. 4.
    x, weight, bias, _ = conv_inputs((1, 16, 8, 8, 16), False, True)
    x[0, 3, 2, 2] = float("nan")
    u = {"mkl": lambda: TRANSFORM(weight), "onednn": lambda: onednn_u(weight, x.shape),
         "panels": lambda: cpu_backend._winograd_panels(TRANSFORM(weight))}[products]()
    y = WINOGRAD(x, u, bias, None, True, products == "mkl")
    tile = torch.zeros_like(y, dtype=torch.bool)
    tile[:, :, :4, :4] = True
    assert torch.equal(torch.isnan(y), tile)
    eager = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
    assert torch.isnan(eager).any() and not (torch.isnan(eager) & ~tile).any()


def _prepared(pack):
    return list(pack.payload.onednn_weights.values())


@pytest.mark.parametrize("batch,size", [(1, 28), (3, 16), (1, 14), (1, 7), (20, 16)])
def test_packed_path_takes_winograd_where_it_pays(batch, size):
    # 49, 48, 16, 4 and 320 tiles of 4x4: on either side of every rule's thresholds.
    weight = torch.randn(32, 16, 3, 3) / 12
    scale, shift = torch.rand(32) + 0.5, torch.randn(32)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, padding=1, backend="cpu")
    x = torch.randn(batch, 16, size, size).contiguous(memory_format=CL)
    res = torch.randn(batch, 32, size, size).contiguous(memory_format=CL)
    with torch.inference_mode():
        y = rf.ops.conv_bn_act_packed(x, pack, res, relu=True)
    expected_winograd = batch * math.ceil(size / 4) ** 2 >= cpu_backend.WINOGRAD_RULE.min_tiles
    # one prepared weight for the shape (beside it, where the rule gives a few-pixel call with a residual the GEMM,
    # the pack's GEMM weight)
    assert [isinstance(w, WinogradWeight) for k, w in pack.payload.onednn_weights.items() if k != "residual"] == [
        expected_winograd]
    assert_matches(y, ref_conv_bn_act(x, weight, scale, shift, res, 1, 1, True), torch.float32)


@pytest.mark.parametrize("onednn_products", [False, True], ids=["mkl", "onednn"])
@pytest.mark.parametrize("batch,size", [(1, 28), (20, 16)])
def test_packed_path_takes_the_rules_layout_and_products(batch, size, onednn_products, monkeypatch,
                                                          products_by_the_vendor_rule):
    # The bound call passes the layout and the products that the rule gives for its tile count (49 and 320 tiles):
    # MKL's position-major up to 100 tiles here, oneDNN's always tile-major.
    calls = []
    winograd = torch.ops.resnet_fused.conv3x3_winograd.default

    class Recording:
        default = staticmethod(lambda *args: calls.append((args[1].is_mkldnn, args[5])) or winograd(*args))

    monkeypatch.setattr(torch.ops.resnet_fused, "conv3x3_winograd", Recording)
    monkeypatch.setattr(cpu_backend, "WINOGRAD_RULE", WinogradRule(1, 100, onednn_products))
    weight = torch.randn(16, 16, 3, 3) / 12
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, padding=1, backend="cpu")
    x = torch.randn(batch, 16, size, size)
    with torch.inference_mode():
        y = rf.ops.conv_bn_act_packed(x, pack)
    position_major = not onednn_products and batch * math.ceil(size / 4) ** 2 <= 100
    assert calls == [(onednn_products, position_major)]
    assert_matches(y, ref_conv_bn_act(x, weight, scale, shift, None, 1, 1, True), torch.float32)


@needs_gemm
@pytest.mark.parametrize("c_in,c_out,panels", [(16, 16, True), (128, 96, True), (129, 16, False), (16, 129, False)])
def test_packed_path_takes_the_panels_up_to_the_rules_channel_count(c_in, c_out, panels, monkeypatch):
    # One transform per pack as the GEMM's panels, shared by its input shapes, where neither channel count passes
    # the rule's 128; else the vendor rule's products.
    monkeypatch.setattr(cpu_backend, "CONV_GEMM_RULE", cpu_backend.CONV_GEMM_RULES["AVX2"])
    made = []

    class Counting:
        default = staticmethod(lambda weight: made.append(1) or TRANSFORM(weight))

    monkeypatch.setattr(torch.ops.resnet_fused, "winograd_weight", Counting)
    weight = torch.randn(c_out, c_in, 3, 3) / (3 * c_in ** 0.5)
    scale, shift = torch.rand(c_out) + 0.5, torch.randn(c_out)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, padding=1, backend="cpu")
    with torch.inference_mode():
        for batch in (1, 2):
            x = torch.randn(batch, c_in, 16, 17)
            res = torch.randn(batch, c_out, 16, 17)
            expected = ref_conv_bn_act(x, weight, scale, shift, res, 1, 1, True)
            assert_matches(rf.ops.conv_bn_act_packed(x, pack, res, relu=True), expected, torch.float32)
    prepared = _prepared(pack)
    assert len(prepared) == 2 and all(isinstance(w, WinogradWeight) for w in prepared)
    assert all((w.products.dim() == 2) == panels for w in prepared)
    if panels:
        assert len(made) == 1 and prepared[0].products is prepared[1].products


def test_panels_rule_per_capability(monkeypatch):
    # Measured on an AVX2-only CPU (cpu.py); elsewhere no GEMM, so no panels.
    assert cpu_backend.CONV_GEMM_RULES["AVX2"].max_in_cache_winograd_channels == 128
    assert cpu_backend.NO_CONV_GEMM.max_in_cache_winograd_channels == 0


@pytest.mark.parametrize("vendor,rule", [("GenuineIntel", WinogradRule(8, math.inf)),
                                         ("AuthenticAMD", WinogradRule(16, 0, onednn_products=True)),
                                         ("", WinogradRule(16, 0, onednn_products=True))])
def test_winograd_rule_per_vendor(vendor, rule):
    # The measured rules (cpu.py), and the EPYC's where the vendor is unknown.
    assert cpu_backend.WINOGRAD_RULES.get(vendor, cpu_backend.DEFAULT_WINOGRAD_RULE) == rule


@pytest.mark.parametrize("onednn_products", [False, True], ids=["mkl", "onednn"])
def test_one_transform_per_pack(onednn_products, monkeypatch, products_by_the_vendor_rule):
    # The transform is made once; later input shapes reuse it (MKL) or reorder another shape's weight (oneDNN), and
    # every shape's results match the oracle.
    made = []

    class Counting:
        default = staticmethod(lambda weight: made.append(1) or TRANSFORM(weight))

    monkeypatch.setattr(torch.ops.resnet_fused, "winograd_weight", Counting)
    monkeypatch.setattr(cpu_backend, "WINOGRAD_RULE", WinogradRule(1, math.inf, onednn_products))
    weight = torch.randn(16, 24, 3, 3) / 12
    scale, shift = torch.rand(16) + 0.5, torch.randn(16)
    pack = rf.ops.pack_conv_bn(weight, scale, shift, padding=1, backend="cpu")
    with torch.inference_mode():
        for batch in (3, 4, 5):
            x = torch.randn(batch, 24, 16, 12)
            expected = ref_conv_bn_act(x, weight, scale, shift, None, 1, 1, True)
            assert_matches(rf.ops.conv_bn_act_packed(x, pack), expected, torch.float32)
    prepared = _prepared(pack)
    assert len(made) == 1 and len(prepared) == 3 and all(isinstance(w, WinogradWeight) for w in prepared)
    assert all(w.products.is_mkldnn == onednn_products for w in prepared)
    if not onednn_products:
        assert all(w.products is prepared[0].products for w in prepared)


@pytest.mark.parametrize("dtype,stride,padding", [(torch.bfloat16, 1, 1), (torch.float32, 2, 1),
                                                  (torch.float32, 1, 0)], ids=["bf16", "stride2", "padding0"])
def test_other_convs_stay_on_onednn(dtype, stride, padding):
    weight = (torch.randn(16, 16, 3, 3) / 12).to(dtype)
    pack = rf.ops.pack_conv_bn(weight, torch.rand(16) + 0.5, torch.randn(16), stride=stride, padding=padding,
                              backend="cpu")
    with torch.inference_mode():
        rf.ops.conv_bn_act_packed(torch.randn(4, 16, 32, 32).to(dtype), pack)
    assert not any(isinstance(w, WinogradWeight) for w in _prepared(pack))


def test_winograd_argument_errors():
    x, weight, bias, _ = conv_inputs((1, 16, 8, 8, 16), False, True)
    u = TRANSFORM(weight)
    with pytest.raises(RuntimeError, match="x must be float32"):
        WINOGRAD(x.bfloat16(), u, bias, None, True, True)
    with pytest.raises(RuntimeError, match="u must be a float32 CPU tensor of shape"):
        WINOGRAD(x, u[:, :8], bias, None, True, True)
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor of length 16"):
        WINOGRAD(x, u, bias[:8], None, True, True)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        WINOGRAD(x, u, bias, torch.randn(1, 16, 4, 4), True, True)
    grouped = onednn_u(weight, x.shape)
    with pytest.raises(RuntimeError, match=r"a oneDNN u must be a grouped 1x1 weight \(36 C_out, 16, 1, 1\), with "
                                           "tile-major buffers"):
        WINOGRAD(x, grouped, bias, None, True, True)
    with pytest.raises(RuntimeError, match=r"a oneDNN u must be a grouped 1x1 weight \(36 C_out, 8, 1, 1\)"):
        WINOGRAD(x[:, :8], grouped, bias, None, True, False)
    with pytest.raises(RuntimeError, match=r"weight must be a \(C_out, C_in, 3, 3\) tensor"):
        TRANSFORM(torch.randn(16, 16, 1, 1))


@needs_gemm
def test_panels_argument_errors():
    x, weight, bias, _ = conv_inputs((1, 16, 8, 8, 20), False, True)
    panels = cpu_backend._winograd_panels(TRANSFORM(weight))
    assert panels.shape == (36, 16 * 32)
    with pytest.raises(RuntimeError, match=r"u as panels must be .* of shape \(36, 16 \* 32\)"):
        WINOGRAD(x, panels[:, :-16].contiguous(), bias, None, True, False)
    with pytest.raises(RuntimeError, match=r"u as panels must be .* of shape \(36, 8 \* 32\)"):
        WINOGRAD(x[:, :8], panels, bias, None, True, False)
    with pytest.raises(RuntimeError, match="32-byte aligned"):
        WINOGRAD(x, torch.empty(36 * 512 + 1)[1:].view(36, 512), bias, None, True, False)
    with pytest.raises(RuntimeError, match="C_in at most 256"):
        big = torch.randn(1, 272, 8, 8).contiguous(memory_format=CL)
        WINOGRAD(big, torch.zeros(36, 272 * 32), bias, None, True, False)
