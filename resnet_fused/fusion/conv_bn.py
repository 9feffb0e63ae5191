"""One fused unit: y = relu?(bn(conv(x)) + residual?), computed through the public ops.

    eval (BN running stats):  scale = gamma / sqrt(running_var + eps),  shift = beta + (bias - running_mean) * scale
                              y = conv_bn_act(x, W, scale, shift, residual, relu)   (fold + pack cached per unit)
    train (batch stats):      c = conv2d(x, W) + bias;  mean, var = batch mean / biased variance of c per channel
                              y = bn_act(c - mean, gamma / sqrt(var + eps), beta, residual, relu)  (fp32, autograd
                              through every term; centering first keeps the backward as exact as BatchNorm's)
                              running_mean/var (unbiased) and num_batches_tracked updated as nn.BatchNorm2d does

Where a fused path would not be exact (empty batch, float64, a norm layer other than BatchNorm, SyncBatchNorm in
training, dtype mismatch eager would reject) the unit runs its modules eagerly, so behaviour equals eager's.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import ops
from ..ops.registry import get_backend

_CONV_FORWARD = nn.Conv2d.forward
_CONV_IMPL = nn.Conv2d._conv_forward
_BN_FORWARD = _BatchNorm.forward


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


def call_override_reason(module: nn.Module) -> Optional[str]:
    """Why calling `module` may do more than nn.Module.__call__ -> its class's forward (None if it does not)."""
    cls = type(module)
    if cls.__call__ is not nn.Module.__call__ or cls._call_impl is not nn.Module._call_impl:
        return f"{cls.__name__} overrides nn.Module.__call__"
    replaced = [name for name in ("forward", "_call_impl", "_wrapped_call_impl") if name in module.__dict__]
    if replaced:
        return f"its {replaced[0]} is replaced on the instance"
    return None


def _is_fused_conv(conv) -> bool:
    return getattr(type(conv), "_fused_conv", False)


def _is_absorbed_bn(bn) -> bool:
    return getattr(type(bn), "_absorbed_bn", False)


def plain_conv_reason(conv) -> Optional[str]:
    """None if `conv` computes exactly nn.Conv2d's forward (so running its math elsewhere is equivalent)."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if _is_fused_conv(conv):
        return None  # its hooks, if any, wrap the whole fused chain: they run around run_unit already
    if type(conv)._conv_forward is not _CONV_IMPL or type(conv).forward is not _CONV_FORWARD:
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
    if type(bn).forward is not _BN_FORWARD and not _is_absorbed_bn(bn):
        return f"{type(bn).__name__} overrides BatchNorm's forward"
    overridden = call_override_reason(bn)
    if overridden:
        return overridden
    if has_hooks(bn):
        return "has hooks"
    return None


# --------------------------------------------------------------------------------------------------- eager


def unit_eager(conv, bn, x, residual, relu: bool, promote: bool = False) -> torch.Tensor:
    """The unit exactly as the eager block computes it (a fused conv / absorbed BN run their original math)."""
    y = _CONV_IMPL(conv, x, conv.weight, conv.bias) if _is_fused_conv(conv) else conv(x)
    if bn is not None:
        y = _BN_FORWARD(bn, y) if _is_absorbed_bn(bn) else bn(y)
    return _add_act(y, residual, relu, promote)


def _add_act(y, residual, relu: bool, promote: bool) -> torch.Tensor:
    """relu?(y + residual?) as the block writes it: `out + identity` (promote) or `out += identity`."""
    if residual is not None:
        y = y + residual if promote else y.add_(residual)
    return torch.relu(y) if relu else y


# --------------------------------------------------------------------------------------------------- helpers


# Devices without autocast (meta) raise when asked whether it is on; torch < 2.4 has no such query.
_autocast_available = getattr(torch.amp, "is_autocast_available", lambda device_type: device_type in ("cpu", "cuda"))


def _compute_dtype(x: torch.Tensor, conv: nn.Conv2d) -> Optional[torch.dtype]:
    """The dtype eager's conv runs in (autocast's when enabled), or None where the fused path does not apply."""
    device_type = x.device.type
    if x.dtype not in ops.SUPPORTED_DTYPES or conv.weight.dtype not in ops.SUPPORTED_DTYPES:
        return None
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if dtype in ops.SUPPORTED_DTYPES else None
    return x.dtype if x.dtype == conv.weight.dtype else None  # eager raises on a mismatch: let it


def _bn_takes(bn, dtype: torch.dtype) -> bool:
    """Whether eager BatchNorm accepts a `dtype` input with bn's tensors: all of that dtype, or fp32 for an fp16 or
    bf16 input. Otherwise (`bn.double()` alone, ...) eager raises, and the unit runs eagerly so that it does."""
    dtypes = {t.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None}
    return dtypes <= {dtype} or (dtype in (torch.float16, torch.bfloat16) and dtypes <= {torch.float32})


def _batch_stats(bn) -> bool:
    # as F.batch_norm is called by _BatchNorm.forward: batch statistics in training or without running buffers
    return bn is not None and (bn.training or bn.running_mean is None or bn.running_var is None)


def _needs_grad(x, residual, conv, bn) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x, residual, conv.weight, conv.bias]
    if bn is not None:
        tensors += [bn.weight, bn.bias]
    return any(t is not None and t.requires_grad for t in tensors)


def _live_fold(conv, bn):
    """(scale, shift) in fp32 from the modules' current tensors, with autograd (eval statistics)."""
    channels = conv.out_channels
    bias = conv.bias.float() if conv.bias is not None else None
    if bn is None:
        scale = torch.ones(channels, device=conv.weight.device, dtype=torch.float32)
        shift = bias if bias is not None else torch.zeros_like(scale)
        return scale, shift
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.float() * scale
    centered = -bn.running_mean.float() if bias is None else bias - bn.running_mean.float()
    shift = centered * scale
    if bn.bias is not None:
        shift = bn.bias.float() + shift
    return scale, shift


def _version(t: Optional[torch.Tensor]):
    if t is None:
        return None
    try:
        return (id(t), t.data_ptr(), t._version, t.dtype, t.device)
    except RuntimeError:  # inference tensors carry no version counter: never trust a cached fold of one
        return False


# Fused optimizers (Adam(fused=True), ...) update parameters without bumping their version counters: every
# optimizer step anywhere counts here, and a cached fold (or a CUDA graph, graphs.py) made before it is rebuilt.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many optimizer steps this process has taken (any optimizer, fused or not)."""
    return _optimizer_steps


def _fold_tensors(conv, bn) -> list:
    tensors = [conv.weight, conv.bias]
    if bn is not None:  # num_batches_tracked: eager BatchNorm training bumps it, not running_mean/var's versions
        tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked]
    return tensors


def _cache_key(conv, bn, tensors, dtype, backend):
    key = tuple(_version(t) for t in tensors)
    if False in key:
        return None
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    return key + (geometry, None if bn is None else float(bn.eps), dtype, backend, _optimizer_steps)


def _warn_uncacheable() -> None:
    # one message from one place: Python's default filter shows it once, not once per conv
    warnings.warn(
        "a fused module's parameters or buffers are inference tensors (made under torch.inference_mode), which "
        "carry no version counter, so its BatchNorm fold and weight pack are rebuilt on every call; build the "
        "model (or call rf.fuse_model, which copies it) outside torch.inference_mode to cache them",
        RuntimeWarning, stacklevel=2)


def _cached_pack(cache: dict, name: str, conv, bn, dtype, backend: str):
    """The (fold, pack) of this unit for these tensors, rebuilt whenever any of them changed."""
    tensors = _fold_tensors(conv, bn)
    key = _cache_key(conv, bn, tensors, dtype, backend)
    hit = cache.get(name)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    scale, shift = ops.fold_bn(conv, bn)
    weight = conv.weight.detach().to(dtype)
    if kernel_unsupported_reason(conv) is None:
        # no copy: the pack may share the conv's weight, and the key above re-packs whenever that changes
        entry = ("packed", ops.pack_conv_bn(weight, scale, shift, backend=backend, copy=False))
    else:
        entry = ("eager_conv", weight, scale, shift)
    if key is None:
        _warn_uncacheable()
    else:
        # The key's tensors stay alive with it: a tensor replaced behind a parameter (`p.data = t`, a weight_norm
        # weight recomputed per call) could otherwise be allocated at the same address and match the key.
        cache[name] = (key, entry, [t.detach() for t in tensors if t is not None])
    return entry


def _epilogue_takes(residual: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d, dtype, promote: bool) -> bool:
    """Whether the fused epilogue adds `residual` exactly as eager would: same shape as the conv's output (no
    broadcasting), and a sum that stays in the conv's dtype."""
    if promote and torch.promote_types(dtype, residual.dtype) != dtype:
        return False
    if conv.padding == "same":
        spatial = tuple(x.shape[2:])
    else:
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        spatial = tuple((size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for size, pad, dilation, kernel,
                        stride in zip(x.shape[2:], padding, conv.dilation, conv.kernel_size, conv.stride))
    return tuple(residual.shape) == (x.shape[0], conv.out_channels, *spatial)


def _residual_as(residual, dtype):
    return None if residual is None else residual.to(dtype)


# --------------------------------------------------------------------------------------------------- the unit


def run_unit(cache: Optional[dict], name: str, conv: nn.Conv2d, bn, x: torch.Tensor,
             residual: Optional[torch.Tensor], relu: bool, backend: Optional[str],
             promote: bool = False) -> torch.Tensor:
    """relu?(bn(conv(x)) + residual?) as eager computes it, fused where exact.

    cache: the owner's dict of (key, fold/pack) per unit name (None under torch.compile tracing).
    backend: a backend name, or None / "auto" for the current default (`use_backend`, `set_backend`).
    promote: the block adds out of place (`out + identity`), so the sum takes torch's promoted dtype; an in-place
    add (`out += identity`) keeps the conv's dtype, as the fused epilogue does.
    """
    if plain_conv_reason(conv) is not None or (bn is not None and plain_bn_reason(bn) is not None):
        return unit_eager(conv, bn, x, residual, relu, promote)  # checked first: `conv` may not even have a weight
    dtype = _compute_dtype(x, conv) if x.dim() == 4 and x.numel() > 0 else None
    if dtype is None or (bn is not None and not _bn_takes(bn, dtype)):
        return unit_eager(conv, bn, x, residual, relu, promote)
    if residual is not None and not _epilogue_takes(residual, x, conv, dtype, promote):
        # a broadcasting residual, or one whose dtype the sum would be promoted to: fuse the rest, add as eager
        return _add_act(run_unit(cache, name, conv, bn, x, None, False, backend), residual, relu, promote)
    backend = get_backend() if backend in (None, "auto") else backend
    if _batch_stats(bn):
        return _train_unit(conv, bn, x, _residual_as(residual, dtype), relu, dtype, backend)
    residual = _residual_as(residual, dtype)
    x = x.to(dtype)
    stride = conv.stride[0]
    padding = 0 if isinstance(conv.padding, str) else conv.padding[0]
    needs_grad = _needs_grad(x, residual, conv, bn)
    if cache is None or needs_grad:  # tracing, or autograd wanted (e.g. fine-tuning with frozen BN): no cache
        scale, shift = _live_fold(conv, bn)
        weight = conv.weight.to(dtype)
        if kernel_unsupported_reason(conv) is None and not needs_grad:
            return ops.conv_bn_act(x, weight, scale, shift, residual, stride=stride, padding=padding, relu=relu,
                                   backend=backend)
        return ops.bn_act(_CONV_IMPL(conv, x, weight, None), scale, shift, residual, relu=relu, backend=backend)
    entry = _cached_pack(cache, name, conv, bn, dtype, backend)
    if entry[0] == "packed":
        return ops.conv_bn_act_packed(x, entry[1], residual, stride=stride, padding=padding, relu=relu)
    _, weight, scale, shift = entry
    return ops.bn_act(_CONV_IMPL(conv, x, weight, None), scale, shift, residual, relu=relu, backend=backend)


def _train_unit(conv, bn, x, residual, relu, dtype, backend):
    x = x.to(dtype)
    weight = conv.weight.to(dtype)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    y = _CONV_IMPL(conv, x, weight, bias)  # the bias stays in: it shifts the batch mean, hence running_mean
    per_channel = y.numel() // max(y.shape[1], 1)
    if per_channel <= 1:  # batch statistics of one value: eager raises (in eval too without running stats)
        return unit_eager(conv, bn, x, residual, relu)
    y32 = y.float()
    var, mean = torch.var_mean(y32, dim=(0, 2, 3), correction=0)
    # Normalize the centered values: autograd then reduces sum(g * (y - mean)), as BatchNorm's backward does,
    # instead of sum(g * y) - mean * sum(g), which cancels catastrophically when |mean| >> std.
    centered = y32 - mean.view(1, -1, 1, 1)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.float() * scale
    shift = bn.bias.float() if bn.bias is not None else torch.zeros_like(scale)
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean.detach(), var.detach(), per_channel)
    residual = None if residual is None else residual.float()
    if not relu:
        # Without a ReLU the next module may modify this output in place (an inplace ReLU that could not be
        # absorbed), as eager BatchNorm's output allows; a fused op's autograd may save its output, so use plain
        # autograd here, which saves only its inputs.
        out = centered * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return (out if residual is None else out + residual).to(y.dtype)
    return ops.bn_act(centered, scale, shift, residual, relu=relu, backend=backend).to(y.dtype)


@torch.no_grad()
def _update_running_stats(bn, mean, var, count: int) -> None:
    """As _BatchNorm.forward + F.batch_norm do: count the batch, then blend in mean and unbiased var."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative moving average
        factor = 1.0 / float(bn.num_batches_tracked)
    else:
        factor = bn.momentum
    if bn.running_mean is None or bn.running_var is None:
        return
    unbiased = var * (count / (count - 1))
    bn.running_mean.copy_(factor * mean + (1.0 - factor) * bn.running_mean.float())
    bn.running_var.copy_(factor * unbiased + (1.0 - factor) * bn.running_var.float())
