"""When a unit relu?(bn(conv(x)) + residual?) may run fused, and in which dtype: each rule says why not, or None.

A unit runs fused only where that computes exactly what eager would: plain nn.Conv2d / nn.BatchNorm2d semantics
(no overridden forward or __call__, no hooks), a dtype the kernels take that eager would also compute in, and a
residual the epilogue adds as eager adds it. Everything else runs eagerly, so behaviour equals eager's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.geometry import conv_output_shape
from ..ops.validation import SUPPORTED_DTYPES

CONV_FORWARD = nn.Conv2d.forward
CONV_IMPL = nn.Conv2d._conv_forward
BN_FORWARD = _BatchNorm.forward


def kernel_unsupported_reason(conv: nn.Conv2d) -> Optional[str]:
    """None if the fused conv kernels run this conv; else why it runs as F.conv2d (with a fused epilogue)."""
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups})"
    if tuple(conv.dilation) != (1, 1):
        return f"dilated conv (dilation={tuple(conv.dilation)})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]:
        return f"non-square stride {tuple(conv.stride)} or padding {tuple(conv.padding)}"
    return None


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def global_module_hooks() -> bool:
    """Whether hooks for every module are registered (torch.nn.modules.module.register_module_forward_hook and
    the like): they must see each original module's call, so fused modules then run their modules one by one."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or getattr(hooks, "_global_backward_pre_hooks", None))


def call_override_reason(module: nn.Module) -> Optional[str]:
    """Why calling `module` may do more than nn.Module.__call__ -> its class's forward (None if it does not)."""
    cls = type(module)
    if cls.__call__ is not nn.Module.__call__ or cls._call_impl is not nn.Module._call_impl:
        return f"{cls.__name__} overrides nn.Module.__call__"
    replaced = [name for name in ("forward", "_call_impl", "_wrapped_call_impl") if name in module.__dict__]
    if replaced:
        return f"its {replaced[0]} is replaced on the instance"
    return None


def is_fused_conv(conv) -> bool:
    return getattr(type(conv), "_fused_conv", False)


def is_absorbed_bn(bn) -> bool:
    return getattr(type(bn), "_absorbed_bn", False)


def plain_conv_reason(conv) -> Optional[str]:
    """None if `conv` computes exactly nn.Conv2d's forward (so running its math elsewhere is equivalent)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if is_fused_conv(conv):
        return None  # its hooks, if any, wrap the whole fused chain: they run around the unit already
    if type(conv)._conv_forward is not CONV_IMPL or type(conv).forward is not CONV_FORWARD:
        return f"{type(conv).__name__} overrides nn.Conv2d's forward"
    overridden = call_override_reason(conv) or ("its _conv_forward is replaced on the instance"
                                                if "_conv_forward" in conv.__dict__ else None)
    if overridden:
        return overridden
    if has_hooks(conv):
        return "has hooks"
    return None


def plain_bn_reason(bn) -> Optional[str]:
    """None if `bn` computes exactly nn.BatchNorm2d's forward."""
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not an nn.BatchNorm2d"
    if type(bn).forward is not BN_FORWARD and not is_absorbed_bn(bn):
        return f"{type(bn).__name__} overrides BatchNorm's forward"
    overridden = call_override_reason(bn)
    if overridden:
        return overridden
    if has_hooks(bn):
        return "has hooks"
    return None


# Devices without autocast (meta) raise when asked whether it is on; torch < 2.4 has no such query.
_autocast_available = getattr(torch.amp, "is_autocast_available", lambda device_type: device_type in ("cpu", "cuda"))


def autocast_state(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in effect for `device_type`, or None when autocast is off there."""
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(x_dtype: torch.dtype, conv: nn.Conv2d, autocast: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype eager's conv runs in (autocast's when enabled), or None where the fused path does not apply."""
    if x_dtype not in SUPPORTED_DTYPES or conv.weight.dtype not in SUPPORTED_DTYPES:
        return None
    if autocast is not None:
        return autocast if autocast in SUPPORTED_DTYPES else None
    return x_dtype if x_dtype == conv.weight.dtype else None  # eager raises on a mismatch: let it


def bn_takes(bn, dtype: torch.dtype) -> bool:
    """Whether eager BatchNorm accepts a `dtype` input with bn's tensors: all of that dtype, or fp32 for an fp16 or
    bf16 input. Otherwise (`bn.double()` alone, ...) eager raises, and the unit runs eagerly so that it does."""
    dtypes = {t.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None}
    return dtypes <= {dtype} or (dtype in (torch.float16, torch.bfloat16) and dtypes <= {torch.float32})


def batch_stats(bn) -> bool:
    """Whether bn normalizes with batch statistics, as F.batch_norm is called by _BatchNorm.forward: in training,
    or without running buffers."""
    return bn is not None and (bn.training or bn.running_mean is None or bn.running_var is None)


def conv_output(conv: nn.Conv2d, input_shape) -> tuple:
    """The shape conv(x) has for an x of `input_shape` (any padding, stride and dilation, 'same' and 'valid')."""
    if conv.padding == "same":
        return (input_shape[0], conv.out_channels, *input_shape[2:])
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    return conv_output_shape(input_shape, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation)


def epilogue_takes(residual_shape, residual_dtype, output_shape, dtype: torch.dtype, promote: bool) -> bool:
    """Whether the fused epilogue adds a residual exactly as eager would: the output's shape (no broadcasting),
    and a sum that stays in the conv's dtype."""
    if promote and torch.promote_types(dtype, residual_dtype) != dtype:
        return False
    return tuple(residual_shape) == tuple(output_shape)
