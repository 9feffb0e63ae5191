"""conv_bn_act, pack_conv_bn and conv_bn_act_packed on every backend that runs here, against the fp32 oracle.

Every dtype over every conv class of the ResNet family (CONV_CASES; on a GPU also the ResNet-50 layers), with
residual and ReLU on and off, NCHW and channels_last inputs, the packed path beside the unpacked one (the Triton
interpreter, some 60 ms a conv, takes fewer combinations: see `combinations`); shapes whose two layouts coincide,
strided inputs, one pack over several input sizes, empty batches; gradients; opcheck of each backend's own op; the
conv -> bn_act -> add_relu block under torch.compile; NaN; and the argument errors, which the public door raises
whatever the backend. Backend internals are in tests/backends/.
"""

import pytest
import torch

import resnet_fused as rf
from resnet_fused import ops
from tests.oracle import (CONV_CASES, CONV_IDS, GPU_CONV_CASES, GPU_CONV_IDS, assert_matches, make_conv_inputs,
                          ref_add_relu, ref_bn_act, ref_conv_bn_act)
from tests.targets import (CL, DTYPE_IDS, DTYPES, GPU_TARGETS, LIBRARY_TARGETS, assert_output, labelled, layout,
                           on_cpu, targets)

ALL = targets()
SWEEP = [(residual, relu, x_layout)
         for residual in (False, True) for relu in (True, False) for x_layout in ("nchw", "cl")]
# Where the Triton interpreter also takes a channels_last x: a stride-2 1x1, the stem and odd channels.
INTERPRETER_CL_CASES = ("1x1_s2_odd", "7x7_stem", "odd_channels")


def combinations(target, dtype, case):
    """The (residual, relu, x layout) combinations a case is checked in: every one, except in the Triton
    interpreter, which takes NCHW x with every residual/ReLU pair (bf16: both or neither) and channels_last x with
    both on INTERPRETER_CL_CASES."""
    if not target.interpreted:
        return SWEEP
    if dtype == torch.bfloat16:
        combos = [(True, True, "nchw"), (False, False, "nchw")]
    else:
        combos = [c for c in SWEEP if c[2] == "nchw"]
    return combos + [(True, True, "cl")] if case[0] in INTERPRETER_CL_CASES else combos


def check_conv(target, case, dtype):
    """A case's combinations against the oracle (one oracle run serves both x layouts). Beside them, off the
    interpreter, the packed path with ReLU and NCHW x: a pack's weight may be laid out for other kernels, summing in
    another order. The "cpu" backend's public op is its torch.library op: the same result, bitwise. One set of inputs
serves every combination (the pack is made once)."""
    x_nchw, w, scale, shift, residual_tensor, stride, padding = make_conv_inputs(case, dtype, target.device, True)
    pack, expected = None, {}
    for residual, relu, x_layout in combinations(target, dtype, case):
        with labelled(residual=residual, relu=relu, x=x_layout):
            x, res = layout(x_nchw, x_layout), residual_tensor if residual else None
            y = rf.conv_bn_act(x, w, scale, shift, res, stride=stride, padding=padding, relu=relu,
                               backend=target.backend)
            assert_output(y, target, dtype)
            if (residual, relu) not in expected:
                expected[residual, relu] = ref_conv_bn_act(*on_cpu(x, w, scale, shift, res), stride, padding, relu)
            assert_matches(y.cpu(), expected[residual, relu], target.tol(dtype))
            if target.backend == "cpu":
                direct = target.library.conv_bn_act(x, w, scale, shift, res, stride, padding, relu)
                torch.testing.assert_close(direct, y, rtol=0, atol=0)
            if relu and x_layout == "nchw" and not target.interpreted:
                if pack is None:
                    pack = ops.pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend=target.backend)
                assert pack.backend == target.backend
                packed = ops.conv_bn_act_packed(x, pack, res, relu=True)
                assert_output(packed, target, dtype)
                assert_matches(packed.cpu(), y.cpu().float(), target.tol(dtype))
                assert_matches(packed.cpu(), expected[residual, relu], target.tol(dtype))


@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", ALL)
def test_matches_oracle(target, dtype, case):
    check_conv(target, case, dtype)


@pytest.mark.parametrize("case", GPU_CONV_CASES, ids=GPU_CONV_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", GPU_TARGETS)
def test_matches_oracle_on_resnet50_layers(target, dtype, case):
    check_conv(target, case, dtype)


# Inputs or outputs whose NCHW and channels_last layouts coincide (1x1 spatial, C_in=1, C_out=1): oneDNN's fused
# residual add is not taken for them; the other kernels see strides they may not expect.
COINCIDING_LAYOUT_CASES = [
    ("1x1_spatial", 2, 16, 1, 1, 8, 1, 1, 0), ("1x1_spatial_pad", 1, 16, 1, 1, 8, 3, 1, 1),
    ("cin1_3x3", 2, 1, 5, 5, 8, 3, 1, 1),
    # x unambiguous, the output not (torch 2.11's oneDNN rejected these with a fused residual)
    ("3x3_valid_to_1x1", 2, 16, 3, 3, 8, 3, 1, 0), ("1x1_s2_to_1x1", 2, 16, 2, 2, 8, 1, 2, 0),
    ("cout1", 2, 16, 5, 5, 1, 3, 1, 1)]


@pytest.mark.parametrize("case", COINCIDING_LAYOUT_CASES, ids=[c[0] for c in COINCIDING_LAYOUT_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", ALL)
def test_layouts_that_coincide_with_residual(target, dtype, case):
    for relu in (True, False):
        with labelled(relu=relu):
            x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, target.device, residual=True)
            y = rf.conv_bn_act(x, w, scale, shift, res, stride=stride, padding=padding, relu=relu,
                               backend=target.backend)
            assert_output(y, target, dtype)
            assert_matches(y.cpu(), ref_conv_bn_act(*on_cpu(x, w, scale, shift, res), stride, padding, relu),
                           target.tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", ALL)
def test_strided_and_mixed_layout_inputs(target, dtype):
    """A channel slice of x (contiguous in neither layout), an NCHW weight, fp16 scale and shift, and a residual
    that is transposed or channels_last are read as they are."""
    device = target.device
    x = torch.randn(2, 24, 9, 11, device=device).to(dtype)[:, 4:20]
    w = (torch.randn(8, 16, 3, 3, device=device) / 12).to(dtype)
    scale, shift = (torch.rand(8, device=device) + 0.5).half(), torch.randn(8, device=device).half()
    transposed = torch.randn(2, 8, 5, 6, device=device).to(dtype).transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CL) and not transposed.is_contiguous()
    for name, residual in (("transposed", transposed), ("channels_last", transposed.contiguous(memory_format=CL))):
        with labelled(residual=name):
            y = rf.conv_bn_act(x, w, scale, shift, residual, stride=2, padding=1, backend=target.backend)
            assert_output(y, target, dtype)
            assert_matches(y.cpu(), ref_conv_bn_act(*on_cpu(x, w, scale, shift, residual), 2, 1, True),
                           target.tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("target", ALL)
def test_one_pack_serves_several_input_sizes(target, dtype):
    """pack_conv_bn lays the weight out once; conv_bn_act_packed then serves inputs of other sizes."""
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[4], dtype, target.device, residual=True)
    pack = ops.pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend=target.backend)
    other_x = torch.randn(2, 3, 10, 13, device=target.device).to(dtype)
    # the output of a 10x13 input: (10 + 6 - 7) // 2 + 1, (13 + 6 - 7) // 2 + 1
    other_res = torch.randn(2, 16, 5, 7, device=target.device).to(dtype)
    for name, x_in, r in (("own", x, res), ("other", other_x, other_res), ("no_residual", x, None)):
        with labelled(input=name):
            y = ops.conv_bn_act_packed(x_in, pack, r, relu=True)
            assert_output(y, target, dtype)
            assert_matches(y.cpu(), ref_conv_bn_act(*on_cpu(x_in, w, scale, shift, r), stride, padding, True),
                           target.tol(dtype))


@pytest.mark.parametrize("target", ALL)
def test_empty_batch_gives_an_empty_channels_last_output(target):
    for case in (CONV_CASES[2], ("cin4", 2, 4, 8, 8, 8, 3, 1, 1)):
        with labelled(case=case[0]):
            x, w, scale, shift, _, stride, padding = make_conv_inputs(case, torch.float32, target.device)
            pack = ops.pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend=target.backend)
            for y in (rf.conv_bn_act(x[:0], w, scale, shift, stride=stride, padding=padding, backend=target.backend),
                      ops.conv_bn_act_packed(x[:0], pack)):
                assert y.shape == (0, case[5], 8, 8)
                assert_output(y, target, torch.float32)


# NaN in, NaN out, as eager: a max(x, 0) ReLU would silently turn it into 0. Known exception: the "cpu" backend,
# whose ReLU is oneDNN's post-op (a max with 0 in its JIT kernels); the README says so, and a fix shows up here.
@pytest.mark.parametrize("target", targets(xfail={"cpu": "oneDNN's fused ReLU post-op maps NaN to 0"}))
def test_relu_keeps_nan(target):
    device = target.device
    x = torch.randn(1, 16, 5, 5, device=device)
    x[0, 3, 2, 2] = float("nan")
    weight = torch.randn(16, 16, 3, 3, device=device)
    scale, shift = torch.ones(16, device=device), torch.zeros(16, device=device)
    y = rf.conv_bn_act(x, weight, scale, shift, stride=1, padding=1, relu=True, backend=target.backend)
    expected = torch.relu(torch.nn.functional.conv2d(x, weight, padding=1))
    assert torch.equal(torch.isnan(y), torch.isnan(expected)) and torch.isnan(expected).any()


# --- gradients, against autograd through the oracle -------------------------------------------------------------

def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _assert_same_grads(target, names, ours, theirs, out_ours, out_theirs):
    assert_matches(out_ours.detach().cpu(), out_theirs.detach(), target.tol(torch.float32))
    grad = torch.randn_like(out_theirs)
    got = torch.autograd.grad(out_ours, [t for t in ours if t is not None], grad.to(out_ours.device))
    want = torch.autograd.grad(out_theirs, [t for t in theirs if t is not None], grad)
    for name, g, w in zip([n for n, t in zip(names, ours) if t is not None], got, want):
        with labelled(grad=name):
            assert g is not None
            assert_matches(g.cpu(), w.cpu(), target.tol(torch.float32))


GRAD_CASES = [CONV_CASES[i] for i in (1, 3, 4, 6)]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
@pytest.mark.parametrize("target", ALL)
def test_gradients_reach_every_input(target, case):
    # The public op must not differentiate through a detached pack: x, weight, scale, shift and residual all get
    # eager's gradients (the "triton" kernel has no backward: with inputs that need grad the backend runs conv2d +
    # its bn_act kernel).
    for residual in (False, True):
        with labelled(residual=residual):
            x, w, scale, shift, res, stride, padding = make_conv_inputs(case, torch.float32, target.device, residual)
            ours, theirs = _leaves(x, w, scale, shift, res), _leaves(*on_cpu(x, w, scale, shift, res))
            out = rf.conv_bn_act(*ours, stride=stride, padding=padding, backend=target.backend)
            _assert_same_grads(target, ("x", "weight", "scale", "shift", "residual"), ours, theirs, out,
                               ref_conv_bn_act(*theirs, stride, padding, True))


PACKED_GRAD_CASES = [CONV_CASES[i] for i in (2, 3, 4)]


@pytest.mark.parametrize("case", PACKED_GRAD_CASES, ids=[c[0] for c in PACKED_GRAD_CASES])
@pytest.mark.parametrize("target", ALL)
def test_packed_path_gradients_reach_x_and_residual(target, case):
    # The pack is a constant; x and the residual get gradients (e.g. saliency in eval mode).
    for residual in (False, True):
        with labelled(residual=residual):
            x, w, scale, shift, res, stride, padding = make_conv_inputs(case, torch.float32, target.device, residual)
            pack = ops.pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend=target.backend)
            ours, theirs = _leaves(x, res), _leaves(*on_cpu(x, res))
            out = ops.conv_bn_act_packed(ours[0], pack, ours[1])
            _assert_same_grads(target, ("x", "residual"), ours, theirs, out,
                               ref_conv_bn_act(theirs[0], *on_cpu(w, scale, shift), theirs[1], stride, padding, True))


# --- each backend's own torch.library op: opcheck (schema, fake kernel, autograd registration, AOT dispatch) ---

def library_conv_call(target, x, w, scale, shift, res, stride, padding, relu):
    """(op, args): the conv op the target's backend registers, with the arguments it takes (the Triton op reads a
    weight packed by its kernel module, with the kernel size beside it)."""
    if target.backend == "triton":
        from resnet_fused.kernels.triton.conv_bn_act import pack_weight

        return target.library.conv_bn_act.default, (x, pack_weight(w), scale, shift, res, w.shape[2], w.shape[3],
                                                    stride, padding, relu)
    return target.library.conv_bn_act.default, (x, w, scale, shift, res, stride, padding, relu)


# A stride-2 1x1, a padded 3x3 with odd sizes, the 7x7 stem (flat K on Triton, the scalar path on CUDA), and odd
# channel counts.
OPCHECK_CASES = [CONV_CASES[i] for i in (1, 3, 4, 6)]


def opcheck_cases(target, cases):
    """The Triton interpreter opchecks the padded stride-2 3x3 alone (an opcheck runs the op about ten times)."""
    return [CONV_CASES[3]] if target.interpreted else cases


@pytest.mark.parametrize("target", LIBRARY_TARGETS)
def test_opcheck(target):
    for case in opcheck_cases(target, OPCHECK_CASES):
        for residual in (False, True):
            with labelled(case=case[0], residual=residual):
                x, w, scale, shift, res, stride, padding = make_conv_inputs(case, torch.float32, target.device,
                                                                            residual)
                torch.library.opcheck(*library_conv_call(target, x, w, scale, shift, res, stride, padding, True))


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
@pytest.mark.parametrize("target", targets("cpu", "cuda"))  # the Triton conv op is inference-only (no autograd)
def test_opcheck_autograd(target, case):
    for residual in (False, True):
        with labelled(residual=residual):
            inputs = make_conv_inputs(case, torch.float32, target.device, residual)
            x, w, scale, shift, res = _leaves(*inputs[:5])
            torch.library.opcheck(*library_conv_call(target, x, w, scale, shift, res, *inputs[5:], True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("target", LIBRARY_TARGETS)
def test_opcheck_low_precision(target, dtype):
    for case in opcheck_cases(target, [CONV_CASES[1], CONV_CASES[3], CONV_CASES[4]]):
        for residual in (False, True):
            with labelled(case=case[0], residual=residual):
                x, w, scale, shift, res, stride, padding = make_conv_inputs(case, dtype, target.device, residual)
                torch.library.opcheck(*library_conv_call(target, x, w, scale, shift, res, stride, padding, True))


@pytest.mark.parametrize("target", LIBRARY_TARGETS)
def test_library_op_takes_an_empty_batch(target):
    for residual in (False, True):
        with labelled(residual=residual):
            inputs = make_conv_inputs(("empty", 0, 16, 8, 8, 8, 3, 1, 1), torch.float32, target.device, residual)
            op, args = library_conv_call(target, *inputs, True)
            y = op(*args)
            assert y.shape == (0, 8, 8, 8)
            assert_output(y, target, torch.float32)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("target", ALL)
def test_block_compiles_fullgraph(target, packed):
    """conv_bn_act (or its packed form, as the fused blocks call it), with a residual or None, -> bn_act -> add_relu
    traces without a graph break and computes what it computes eagerly."""
    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[3], torch.float32, target.device, True)
    pack = ops.pack_conv_bn(w, scale, shift, stride=stride, padding=padding, backend=target.backend)
    channels = w.shape[0]
    bn_scale, bn_shift = torch.rand(channels, device=target.device) + 0.5, torch.randn(channels, device=target.device)

    def block(x, conv_res, res):
        if packed:
            y = ops.conv_bn_act_packed(x, pack, conv_res)
        else:
            y = rf.conv_bn_act(x, w, scale, shift, conv_res, stride=stride, padding=padding, backend=target.backend)
        y = rf.bn_act(y, bn_scale, bn_shift, res, relu=False, backend=target.backend)
        return rf.add_relu(y, res, backend=target.backend)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    cpu_res, cpu_scale, cpu_shift = on_cpu(res, bn_scale, bn_shift)
    for conv_res in (res, None):
        with labelled(conv_residual=conv_res is not None):
            y = ref_conv_bn_act(*on_cpu(x, w, scale, shift, conv_res), stride, padding, True)
            expected = ref_add_relu(ref_bn_act(y, cpu_scale, cpu_shift, cpu_res, False), cpu_res)
            assert_matches(compiled(x, conv_res, res).cpu(), expected, target.tol(torch.float32))
            assert_matches(block(x, conv_res, res).cpu(), expected, target.tol(torch.float32))


# --- packs ---------------------------------------------------------------------------------------------------

def _args(device="cpu", **over):
    args = dict(x=torch.randn(2, 4, 8, 8, device=device), weight=torch.randn(8, 4, 3, 3, device=device),
                scale=torch.ones(8, device=device), shift=torch.zeros(8, device=device), residual=None, stride=1,
                padding=1)
    args.update(over)
    return args


@pytest.mark.parametrize("target", ALL)
def test_pack_is_a_constant_snapshot(target):
    # Every backend's pack gives the values of the tensors it was made from: no backend may alias them (the
    # "torch" pack did: it followed later in-place edits while the "cpu" and "triton" packs did not)
    a = _args(target.device)
    weight, scale, shift = a["weight"].clone(), torch.rand(8, device=target.device) + 0.5, \
        torch.randn(8, device=target.device)
    pack = ops.pack_conv_bn(weight, scale, shift, padding=1, backend=target.backend)
    before = ops.conv_bn_act_packed(a["x"], pack)
    for t in (weight, scale, shift):
        t.mul_(2)
    assert torch.equal(ops.conv_bn_act_packed(a["x"], pack), before)


@pytest.mark.parametrize("target", ALL)
def test_pack_of_tensors_that_require_grad(target):
    # No gradient reaches a pack's tensors on any backend (the "torch" pack passed one to weight, the "triton"
    # one failed in backward): with grad mode on that is an error naming the tensor; under no_grad, a constant
    a = _args(target.device)
    weight = a["weight"].clone().requires_grad_()
    for name, args in (("weight", (weight, a["scale"], a["shift"])),
                       ("shift", (a["weight"], a["scale"], a["shift"].clone().requires_grad_()))):
        with pytest.raises(ValueError, match=f"{name} requires grad, but a pack is a constant"):
            ops.pack_conv_bn(*args, backend=target.backend)
    with torch.no_grad():
        pack = ops.pack_conv_bn(weight, a["scale"], a["shift"], padding=1, backend=target.backend)
    x = a["x"].clone().requires_grad_()
    y = ops.conv_bn_act_packed(x, pack)
    y.sum().backward()
    assert weight.grad is None and x.grad is not None


def test_pair_stride_and_padding_accepted():
    a = _args()
    y = ops.conv_bn_act(a["x"], a["weight"], a["scale"], a["shift"], stride=(2, 2), padding=(1, 1), backend="torch")
    assert y.shape == (2, 8, 4, 4)
    strided = ops.pack_conv_bn(a["weight"], a["scale"], a["shift"], stride=(2, 2), padding=(1, 1), backend="torch")
    assert (strided.stride, strided.padding) == (2, 1)
    assert ops.conv_bn_act_packed(a["x"], strided).shape == (2, 8, 4, 4)


# --- argument errors: checked at the public door, before a backend is chosen, so the same on every backend ------

BACKENDS = ops.backend_names()


def _call(backend, **over):
    a = _args(**over)
    return ops.conv_bn_act(a["x"], a["weight"], a["scale"], a["shift"], a["residual"], stride=a["stride"],
                           padding=a["padding"], backend=backend)


def assert_every_backend_raises(exc, words, call):
    """call(backend) raises `exc` whose message contains `words`, for every registered backend (runnable here or
    not: the arguments are checked first)."""
    for backend in BACKENDS:
        try:
            call(backend)
        except exc as error:
            assert words in str(error), f"backend {backend!r}: {error}"
        else:
            pytest.fail(f"backend {backend!r}: no {exc.__name__} raised")


@pytest.mark.parametrize("over, exc, words", [
    (dict(x=torch.randn(4, 8, 8)), ValueError, "x must be a 4-D"),
    (dict(x=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError, "x must be float32, float16 or bfloat16"),
    (dict(x=torch.randint(0, 3, (2, 4, 8, 8))), TypeError, "x must be float32"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(weight=torch.randn(8, 4, 3)), ValueError, "weight must be a 4-D"),
    (dict(weight=torch.randn(8, 4, 3, 3, dtype=torch.float16)), TypeError, "weight must have x's dtype"),
    (dict(weight=torch.randn(8, 3, 3, 3)), ValueError, "weight expects C_in=3 input channels but x has 4"),
    (dict(weight=torch.randn(8, 2, 3, 3)), ValueError, "grouped convolution (groups=2) is not supported"),
    (dict(scale=torch.ones(7)), ValueError, "scale must be a 1-D tensor of length 8"),
    (dict(shift=torch.zeros(8, 1)), ValueError, "shift must be a 1-D tensor of length 8"),
    (dict(scale=torch.ones(8, dtype=torch.int32)), TypeError, "scale must be a floating-point tensor"),
    (dict(residual=torch.randn(2, 8, 7, 8)), ValueError, "residual must have the output's shape (2, 8, 8, 8)"),
    (dict(residual=torch.randn(2, 8, 8, 8, dtype=torch.bfloat16)), TypeError, "residual must have x's dtype"),
    (dict(stride=0), ValueError, "stride must be in [1, 2147483647], got 0"),
    (dict(stride=2**31), ValueError, "stride must be in [1, 2147483647]"),
    (dict(stride=1.5), TypeError, "stride must be an int"),
    (dict(stride=(1, 2)), ValueError, "stride must be an int or a pair of equal ints"),
    (dict(padding=-1), ValueError, "padding must be in [0, 2147483647], got -1"),
    (dict(padding=2**40), ValueError, "padding must be in [0, 2147483647]"),
    (dict(padding=2**30), ValueError, "more than 2^63 elements"),
    (dict(x=torch.randn(2, 4, 2, 2), padding=0), ValueError, "too small for a 3x3 kernel"),
    (dict(x=torch.randn(2, 4, 0, 8)), ValueError, "x must have non-zero height and width"),
    (dict(x=torch.randn(2, 4, 8, 8).to_sparse()), TypeError, "x must be a dense (strided) tensor"),
    (dict(weight=torch.randn(8, 4, 3, 3).to_sparse()), TypeError, "weight must be a dense (strided) tensor"),
    (dict(residual=torch.randn(2, 8, 8, 8).to_sparse()), TypeError, "residual must be a dense (strided) tensor"),
    (dict(scale=torch.ones(8).to_sparse()), TypeError, "scale must be a dense (strided) tensor"),
    (dict(scale=torch.ones(8, device="meta")), ValueError, "scale is on meta but x is on cpu"),
])
def test_bad_arguments(over, exc, words):
    assert_every_backend_raises(exc, words, lambda backend: _call(backend, **over))


def test_relu_must_be_a_bool():
    a = _args()
    assert_every_backend_raises(TypeError, "relu must be a bool", lambda backend: ops.conv_bn_act(
        a["x"], a["weight"], a["scale"], a["shift"], padding=1, relu="yes", backend=backend))


def test_non_builtin_types_are_named_with_their_module():
    np = pytest.importorskip("numpy")
    a = _args()
    assert_every_backend_raises(TypeError, "x must be a torch.Tensor, got numpy.ndarray",
                                lambda backend: _call(backend, x=a["x"].numpy()))
    assert_every_backend_raises(TypeError, "stride must be an int, got numpy.int64",
                                lambda backend: _call(backend, stride=np.int64(1)))


def test_packed_path_validates_like_the_op():
    # A wrong residual must be an error before any kernel reads it (the kernels index it by the output's shape).
    a = _args()
    pack = ops.pack_conv_bn(a["weight"], a["scale"], a["shift"], padding=1, backend="torch")
    x = a["x"]
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 8, 8, 8\)"):
        ops.conv_bn_act_packed(x, pack, torch.randn(2, 8, 4, 4))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        ops.conv_bn_act_packed(x, pack, torch.randn(2, 8, 8, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"stride must be in \[1, 2147483647\]"):
        ops.pack_conv_bn(a["weight"], a["scale"], a["shift"], stride=0, backend="torch")
    with pytest.raises(TypeError, match="pack must be a ConvBNPack from pack_conv_bn, got NoneType"):
        ops.conv_bn_act_packed(x, None)
    with pytest.raises(ValueError, match="too small for a 3x3 kernel"):
        ops.conv_bn_act_packed(torch.randn(1, 4, 2, 2), ops.pack_conv_bn(a["weight"], a["scale"], a["shift"]))
    with pytest.raises(ValueError, match="the pack was made for torch.float32"):
        ops.conv_bn_act_packed(x.half(), pack)
    with pytest.raises(ValueError, match="pack's C_in=4"):
        ops.conv_bn_act_packed(torch.randn(2, 3, 8, 8), pack)
    with pytest.raises(TypeError, match="relu must be a bool"):
        ops.conv_bn_act_packed(x, pack, relu=1)


@pytest.mark.parametrize("weight, scale, shift, exc, words", [
    (torch.randn(8, 4, 3), torch.ones(8), torch.zeros(8), ValueError, "weight must be a 4-D"),
    (torch.randn(8, 4, 3, 3).double(), torch.ones(8), torch.zeros(8), TypeError,
     "weight must be float32, float16 or bfloat16"),
    (torch.randn(8, 4, 3, 3), torch.ones(4), torch.zeros(8), ValueError, "scale must be a 1-D tensor of length 8"),
    (torch.randn(8, 4, 3, 3), torch.ones(8), torch.zeros(8, device="meta"), ValueError,
     "shift is on meta but weight is on cpu"),
], ids=["weight_rank", "weight_dtype", "scale_length", "shift_device"])
def test_pack_bad_arguments(weight, scale, shift, exc, words):
    assert_every_backend_raises(exc, words, lambda backend: ops.pack_conv_bn(weight, scale, shift, backend=backend))
