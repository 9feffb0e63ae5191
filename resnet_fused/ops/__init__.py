"""The public fused ops. One semantics, several backends (see README "Ops and backends").

    conv_bn_act(x, weight, scale, shift, residual=None, *, stride=1, padding=0, relu=True, backend=None)
    bn_act(x, scale, shift, residual=None, *, relu=True, backend=None)
    add_relu(x, residual, *, backend=None)
    pack_conv_bn(weight, scale, shift, *, stride=1, padding=0, backend=None) -> ConvBNPack
    conv_bn_act_packed(x, pack, residual=None, *, relu=True)

Training BatchNorm's passes, for the fused modules' training (batch_norm_reference.py has their math):
    batch_norm_stats(y, *, backend=None) -> (mean, var)
    batch_norm_apply(y, mean, invstd, weight, bias, residual=None, *, relu=True, backend=None) -> out
    batch_norm_backward(grad_out, y, mean, invstd, weight, bias, residual=None, *, relu=True, backend=None)
        -> (grad_y, grad_weight, grad_bias, grad_residual)

Inputs are logical NCHW (contiguous or channels_last); outputs are channels_last with the input's dtype.
backend=None means the current default (`set_backend` / `use_backend`, "auto" unless changed).
These functions are the one place arguments are checked (validation.py); the backends trust them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils._pytree import tree_map_only

from . import backends as _backends  # noqa: F401  (registers the backends)
from .folding import fold_bn
from .geometry import conv_output_shape
from .pack import ConvBNPack
from .registry import (_BACKENDS, AUTO_ORDER, Backend, available_backends, backend_names, get_backend,
                       register_backend, resolve, resolve_name, set_backend, use_backend)
from .validation import (SUPPORTED_DTYPES, check_add_relu, check_batch_norm_apply, check_batch_norm_backward,
                         check_batch_norm_stats, check_bn_act, check_conv_bn_act, check_conv_packed, check_flag,
                         check_pack)

__all__ = [
    "conv_bn_act", "bn_act", "add_relu", "ConvBNPack", "pack_conv_bn", "conv_bn_act_packed", "fold_bn",
    "available_backends", "backend_names", "set_backend", "get_backend", "use_backend", "register_backend",
    "Backend", "AUTO_ORDER", "SUPPORTED_DTYPES", "resolve_name", "conv_output_shape", "batch_norm_stats",
    "batch_norm_apply", "batch_norm_backward",
]


def pack_conv_bn(weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, stride=1, padding=0,
                 backend: Optional[str] = None, copy: bool = True) -> ConvBNPack:
    """Prepare (weight, scale, shift) and the conv's stride and padding for repeated conv_bn_act_packed calls.

    The backend is resolved for the weight's device and dtype, as it will be for inputs like it. The pack is a
    constant snapshot: later in-place edits of weight, scale or shift do not reach it, nor do gradients.
    copy=False lets the pack share memory with its arguments where the backend can (no copy of the weight), for
    callers that re-pack whenever the arguments change (as the fused modules do).
    """
    stride, padding = check_pack(weight, scale, shift, stride, padding)
    chosen = resolve(backend, weight, weight)  # the weight has the device and dtype of the inputs to come
    with torch.no_grad():
        payload = chosen.pack_conv(weight, scale, shift, stride, padding)
        if copy:
            # Some backends' packs alias their arguments (and would follow later in-place edits of them), others
            # reorder or fold into new tensors: copy what aliases, so that every backend's pack is a snapshot.
            payload = _unaliased(payload, (weight, scale, shift))
    return ConvBNPack(chosen.name, payload, weight.shape[0], weight.shape[1], tuple(weight.shape[2:]), stride,
                      padding, weight.dtype, weight.device)


def _unaliased(payload, sources):
    """payload with a private copy of each of its tensors that shares memory with one of `sources`."""
    shared = {t.untyped_storage().data_ptr() for t in sources}

    def private(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.layout == torch.strided and t.untyped_storage().data_ptr() in shared else t

    return tree_map_only(torch.Tensor, private, payload)


def conv_bn_act_packed(x: torch.Tensor, pack: ConvBNPack, residual: Optional[torch.Tensor] = None, *,
                       relu: bool = True) -> torch.Tensor:
    """conv_bn_act with a weight, BN fold and geometry packed by `pack_conv_bn`."""
    check_conv_packed(x, pack, residual)
    return _BACKENDS[pack.backend].conv_bn_act_packed(x, pack, residual, check_flag("relu", relu))


def conv_bn_act(x, weight, scale, shift, residual=None, *, stride=1, padding=0, relu=True, backend=None):
    """y = conv2d(x, weight, stride, padding) * scale[c] + shift[c] (+ residual), ReLU if relu."""
    stride, padding = check_conv_bn_act(x, weight, scale, shift, residual, stride, padding)
    relu = check_flag("relu", relu)
    return resolve(backend, x, weight).conv_bn_act(x, weight, scale, shift, residual, stride, padding, relu)


def bn_act(x, scale, shift, residual=None, *, relu=True, backend=None):
    """y = x * scale[c] + shift[c] (+ residual), ReLU if relu."""
    check_bn_act(x, scale, shift, residual)
    relu = check_flag("relu", relu)
    return resolve(backend, x).bn_act(x, scale, shift, residual, relu)


def add_relu(x, residual, *, backend=None):
    """y = max(x + residual, 0)."""
    check_add_relu(x, residual)
    return resolve(backend, x).add_relu(x, residual)


def batch_norm_stats(y, *, backend=None):
    """(mean, var) of y per channel over (N, H, W), fp32, var biased (training BatchNorm's batch statistics)."""
    check_batch_norm_stats(y)
    return resolve(backend, y).batch_norm_stats(y)


def batch_norm_apply(y, mean, invstd, weight, bias, residual=None, *, relu=True, backend=None):
    """act((y - mean[c]) * invstd[c] * weight[c] + bias[c] (+ residual)), in y's dtype and layout."""
    check_batch_norm_apply(y, mean, invstd, weight, bias, residual)
    return resolve(backend, y).batch_norm_apply(y, mean, invstd, weight, bias, residual, check_flag("relu", relu))


def batch_norm_backward(grad_out, y, mean, invstd, weight, bias, residual=None, *, relu=True, backend=None):
    """(grad_y, grad_weight, grad_bias, grad_residual) of batch_norm_apply at fixed mean and invstd: with g the
    gradient that passes the ReLU, grad_y = weight * invstd * (g - (sum g + xhat * sum g*xhat) / M)."""
    check_batch_norm_backward(grad_out, y, mean, invstd, weight, bias, residual)
    return resolve(backend, y).batch_norm_backward(grad_out, y, mean, invstd, weight, bias, residual,
                                                   check_flag("relu", relu))

