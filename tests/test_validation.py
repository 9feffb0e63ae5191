"""Every bad argument to the public ops raises TypeError/ValueError naming the argument, whatever the backend."""

import pytest
import torch

from resnet_fused import ops


def _args(**over):
    args = dict(x=torch.randn(2, 4, 8, 8), weight=torch.randn(8, 4, 3, 3), scale=torch.ones(8),
                shift=torch.zeros(8), residual=None, stride=1, padding=1)
    args.update(over)
    return args


def _call(**over):
    a = _args(**over)
    return ops.conv_bn_act(a["x"], a["weight"], a["scale"], a["shift"], a["residual"], stride=a["stride"],
                           padding=a["padding"], backend="torch")


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
])
def test_conv_bn_act_bad_arguments(over, exc, words):
    with pytest.raises(exc, match=None) as info:
        _call(**over)
    assert words in str(info.value)


def test_pair_stride_and_padding_accepted():
    a = _args()
    y = ops.conv_bn_act(a["x"], a["weight"], a["scale"], a["shift"], stride=(2, 2), padding=(1, 1), backend="torch")
    assert y.shape == (2, 8, 4, 4)


def test_device_mismatch_is_named():
    meta = torch.ones(8, device="meta")
    with pytest.raises(ValueError, match="scale is on meta but x is on cpu"):
        _call(scale=meta)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        _call_with_backend("nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        _call_with_backend(3)


def _call_with_backend(backend):
    a = _args()
    return ops.conv_bn_act(a["x"], a["weight"], a["scale"], a["shift"], padding=1, backend=backend)


def test_relu_must_be_bool():
    a = _args()
    with pytest.raises(TypeError, match="relu must be a bool"):
        ops.conv_bn_act(a["x"], a["weight"], a["scale"], a["shift"], padding=1, relu="yes", backend="torch")


def test_named_backend_that_cannot_run_says_why():
    reasons = ops.available_backends("cpu")
    assert reasons["torch"] is None
    blocked = [name for name, why in reasons.items() if why is not None]
    for name in blocked:
        with pytest.raises(ValueError, match=f"backend '{name}' cannot run this call"):
            _call_with_backend(name)


def test_auto_always_resolves_and_use_backend_scopes():
    assert ops.resolve_name("auto", "cpu") in ops.backend_names()
    with ops.use_backend("torch"):
        assert ops.get_backend() == "torch"
        assert ops.resolve_name(None, "cpu") == "torch"
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError):
        ops.set_backend("nope")


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
    strided = ops.pack_conv_bn(a["weight"], a["scale"], a["shift"], stride=(2, 2), padding=(1, 1), backend="torch")
    assert (strided.stride, strided.padding) == (2, 1)
    assert ops.conv_bn_act_packed(x, strided).shape == (2, 8, 4, 4)


def test_pack_bad_arguments():
    with pytest.raises(ValueError, match="weight must be a 4-D"):
        ops.pack_conv_bn(torch.randn(8, 4, 3), torch.ones(8), torch.zeros(8))
    with pytest.raises(TypeError, match="weight must be float32, float16 or bfloat16"):
        ops.pack_conv_bn(torch.randn(8, 4, 3, 3).double(), torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match="scale must be a 1-D tensor of length 8"):
        ops.pack_conv_bn(torch.randn(8, 4, 3, 3), torch.ones(4), torch.zeros(8))
    with pytest.raises(ValueError, match="shift is on meta but weight is on cpu"):
        ops.pack_conv_bn(torch.randn(8, 4, 3, 3), torch.ones(8), torch.zeros(8, device="meta"))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_empty_batch_gives_an_empty_channels_last_output(backend):
    if ops.available_backends("cpu")[backend] is not None:
        pytest.skip(f"backend {backend!r}: {ops.available_backends('cpu')[backend]}")
    a = _args(x=torch.randn(0, 4, 8, 8))
    pack = ops.pack_conv_bn(a["weight"], a["scale"], a["shift"], padding=1, backend=backend)
    for y in (ops.conv_bn_act(a["x"], a["weight"], a["scale"], a["shift"], padding=1, backend=backend),
              ops.conv_bn_act_packed(a["x"], pack)):
        assert y.shape == (0, 8, 8, 8) and y.is_contiguous(memory_format=torch.channels_last)


def test_non_builtin_types_are_named_with_their_module():
    # numpy's scalars print as builtin names ("stride must be an int, got int64" would say little)
    np = pytest.importorskip("numpy")
    a = _args()
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got numpy\.ndarray"):
        _call(x=a["x"].numpy())
    with pytest.raises(TypeError, match=r"stride must be an int, got numpy\.int64"):
        _call(stride=np.int64(1))


CPU_BACKENDS = [name for name, why in ops.available_backends("cpu").items() if why is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pack_is_a_constant_snapshot(backend):
    # Every backend's pack gives the values of the tensors it was made from: no backend may alias them (the
    # "torch" pack did: it followed later in-place edits while the "cpu" and "triton" packs did not)
    a = _args()
    weight, scale, shift = a["weight"].clone(), torch.rand(8) + 0.5, torch.randn(8)
    pack = ops.pack_conv_bn(weight, scale, shift, padding=1, backend=backend)
    before = ops.conv_bn_act_packed(a["x"], pack)
    for t in (weight, scale, shift):
        t.mul_(2)
    assert torch.equal(ops.conv_bn_act_packed(a["x"], pack), before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pack_of_tensors_that_require_grad(backend):
    # No gradient reaches a pack's tensors on any backend (the "torch" pack passed one to weight, the "triton"
    # one failed in backward): with grad mode on that is an error naming the tensor; under no_grad, a constant
    a = _args()
    weight = a["weight"].clone().requires_grad_()
    for name, args in (("weight", (weight, a["scale"], a["shift"])),
                       ("shift", (a["weight"], a["scale"], a["shift"].clone().requires_grad_()))):
        with pytest.raises(ValueError, match=f"{name} requires grad, but a pack is a constant"):
            ops.pack_conv_bn(*args, backend=backend)
    with torch.no_grad():
        pack = ops.pack_conv_bn(weight, a["scale"], a["shift"], padding=1, backend=backend)
    x = a["x"].clone().requires_grad_()
    y = ops.conv_bn_act_packed(x, pack)
    y.sum().backward()
    assert weight.grad is None and x.grad is not None
