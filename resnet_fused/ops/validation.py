"""The checks of the public ops' arguments: the one door. Everything below them (backends, kernel launchers,
fused modules' bound calls) trusts what passed here, so each op fails the same way whatever runs it.

Every check raises TypeError (wrong type or dtype) or ValueError (wrong value, shape or device) with a message
that names the argument and says what was expected.
"""

from __future__ import annotations

import torch

from .geometry import conv_output_shape
from .pack import ConvBNPack

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16 or bfloat16"
_MAX_GEOMETRY = 2**31 - 1  # stride and padding: the kernels' per-element sizes are 32-bit
_MAX_NUMEL = 2**63 - 1


def type_name(value) -> str:
    """The type of `value` for an error message, module-qualified outside builtins: numpy's bool scalar is
    named "bool" too, and "relu must be a bool, got bool" would say nothing."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type_name(value)}")
    if value.layout != torch.strided:  # sparse, mkldnn: the kernels read strided memory
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    return value


def _activation(name: str, value) -> torch.Tensor:
    t = _tensor(name, value)
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be {_DTYPE_NAMES}, got {t.dtype}")
    return t


def check_same_device(name: str, t: torch.Tensor, x: torch.Tensor, x_name: str = "x") -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}; all tensors must be on one device")


def _channel_vector(name: str, value, channels: int, x: torch.Tensor, x_name: str = "x") -> None:
    t = _tensor(name, value)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 1 or t.numel() != channels:
        raise ValueError(f"{name} must be a 1-D tensor of length {channels} (one per output channel), "
                         f"got shape {tuple(t.shape)}")
    check_same_device(name, t, x, x_name)


def _residual(residual, expected_shape: tuple, x: torch.Tensor) -> None:
    if residual is None:
        return
    r = _activation("residual", residual)
    if tuple(r.shape) != tuple(expected_shape):
        raise ValueError(f"residual must have the output's shape {tuple(expected_shape)}, got {tuple(r.shape)}")
    if r.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {r.dtype}")
    check_same_device("residual", r, x)


def as_square(name: str, value, minimum: int, maximum: int = _MAX_GEOMETRY) -> int:
    """Accept an int or an (a, a) pair, as nn.Conv2d stores stride and padding; return the int."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a pair of equal ints, got {tuple(value)}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type_name(value)}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


def _conv_weight(weight) -> torch.Tensor:
    w = _tensor("weight", weight)
    if w.dim() != 4:
        raise ValueError(f"weight must be a 4-D (C_out, C_in, KH, KW) tensor, got {w.dim()}-D "
                         f"with shape {tuple(w.shape)}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight must be {_DTYPE_NAMES}, got {w.dtype}")
    if 0 in w.shape:
        raise ValueError(f"weight must have non-zero C_out, C_in, KH and KW, got shape {tuple(w.shape)}")
    return w


def check_conv_geometry(stride, padding) -> tuple[int, int]:
    """stride and padding as ints (each an int or a pair of equal ints), or the error naming the bad one."""
    return as_square("stride", stride, 1), as_square("padding", padding, 0)


def _conv_output(x, c_out, kernel_size, stride: int, padding: int) -> tuple:
    """The output shape of a conv of x with this kernel, or the error naming what is wrong."""
    kh, kw = kernel_size
    if 0 in x.shape[2:]:  # as F.conv2d: only the batch may be empty
        raise ValueError(f"x must have non-zero height and width for a convolution, got shape {tuple(x.shape)}")
    out_shape = conv_output_shape(x.shape, c_out, kernel_size, stride, padding)
    if out_shape[2] < 1 or out_shape[3] < 1:
        raise ValueError(f"x's spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel "
                         f"with padding {padding}")
    if max(x.shape[0], 1) * c_out * out_shape[2] * out_shape[3] > _MAX_NUMEL:
        raise ValueError(f"padding {padding} gives an output of shape {out_shape}, more than 2^63 elements")
    return out_shape


def check_conv_bn_act(x, weight, scale, shift, residual, stride, padding) -> tuple[int, int]:
    """Validate conv_bn_act's arguments; return (stride, padding) as ints."""
    x = _activation("x", x)
    w = _conv_weight(weight)
    if w.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {w.dtype}")
    check_same_device("weight", w, x)
    c_out, c_in = w.shape[:2]
    if c_in != x.shape[1]:
        groups_hint = (f"; grouped convolution (groups={x.shape[1] // c_in}) is not supported"
                       if x.shape[1] % c_in == 0 and x.shape[1] != c_in else "")
        raise ValueError(f"weight expects C_in={c_in} input channels but x has {x.shape[1]}{groups_hint}")
    stride, padding = check_conv_geometry(stride, padding)
    out_shape = _conv_output(x, c_out, w.shape[2:], stride, padding)
    _channel_vector("scale", scale, c_out, x)
    _channel_vector("shift", shift, c_out, x)
    _residual(residual, out_shape, x)
    return stride, padding


def check_pack(weight, scale, shift, stride, padding) -> tuple[int, int]:
    """Validate pack_conv_bn's arguments (the conv_bn_act checks that do not need an input); return (stride,
    padding) as ints."""
    w = _conv_weight(weight)
    _channel_vector("scale", scale, w.shape[0], w, "weight")
    _channel_vector("shift", shift, w.shape[0], w, "weight")
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("scale", scale), ("shift", shift)):
            if t.requires_grad:
                raise ValueError(f"{name} requires grad, but a pack is a constant that no gradient reaches: pack "
                                 f"{name}.detach() (or pack under torch.no_grad()), or call conv_bn_act, which "
                                 f"differentiates weight, scale and shift")
    return check_conv_geometry(stride, padding)


def check_conv_packed(x, pack, residual) -> None:
    """Validate conv_bn_act_packed's arguments against the pack."""
    x = _activation("x", x)
    if not isinstance(pack, ConvBNPack):
        raise TypeError(f"pack must be a ConvBNPack from pack_conv_bn, got {type_name(pack)}")
    if x.dtype != pack.dtype or x.device != pack.device:
        raise ValueError(f"x is {x.dtype} on {x.device} but the pack was made for {pack.dtype} on {pack.device}")
    if x.shape[1] != pack.in_channels:
        raise ValueError(f"x must have the pack's C_in={pack.in_channels} channels, got shape {tuple(x.shape)}")
    _residual(residual, _conv_output(x, pack.out_channels, pack.kernel_size, pack.stride, pack.padding), x)


def check_bn_act(x, scale, shift, residual) -> None:
    x = _activation("x", x)
    _channel_vector("scale", scale, x.shape[1], x)
    _channel_vector("shift", shift, x.shape[1], x)
    _residual(residual, tuple(x.shape), x)


def check_batch_norm_stats(y) -> None:
    _activation("y", y)


def check_batch_norm_apply(y, mean, invstd, weight, bias, residual) -> None:
    y = _activation("y", y)
    for name, value in (("mean", mean), ("invstd", invstd)):
        _channel_vector(name, value, y.shape[1], y, "y")
        if value.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (batch statistics are fp32), got {value.dtype}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None:
            _channel_vector(name, value, y.shape[1], y, "y")
    if residual is not None:
        r = _activation("residual", residual)
        if tuple(r.shape) != tuple(y.shape):
            raise ValueError(f"residual must have y's shape {tuple(y.shape)}, got {tuple(r.shape)}")
        if r.dtype != y.dtype:
            raise TypeError(f"residual must have y's dtype {y.dtype}, got {r.dtype}")
        check_same_device("residual", r, y, "y")


def check_batch_norm_backward(grad_out, y, mean, invstd, weight, bias, residual) -> None:
    check_batch_norm_apply(y, mean, invstd, weight, bias, residual)
    g = _activation("grad_out", grad_out)
    if tuple(g.shape) != tuple(y.shape):
        raise ValueError(f"grad_out must have y's shape {tuple(y.shape)}, got {tuple(g.shape)}")
    check_same_device("grad_out", g, y, "y")


def check_add_relu(x, residual) -> None:
    x = _activation("x", x)
    if residual is None:
        raise TypeError("residual must be a torch.Tensor, got NoneType")
    _residual(residual, tuple(x.shape), x)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")
    return value
