"""The backend registry: which implementations of the fused ops exist, which run here, and which "auto" picks.

A backend is an object with a `name` and the methods of `Backend` below. Backends register themselves with
`register_backend`; the public ops in `resnet_fused.ops` resolve a name (or "auto") to one of them per call.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Optional

import torch

from . import batch_norm_reference
from .conv_backward import convolution_backward
from .pack import ConvBNPack

# "auto" tries these in order for a tensor's device type, skipping the unavailable ones; "torch" is last everywhere
# because it always works. On the CPU the order is measured (benchmarks/results/). On a GPU it is not yet: triton
# comes first because it autotunes its tiles per shape and splits K where the SMs would idle; the first recorded
# GPU benchmark run decides.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
DEFAULT_ORDER = ("torch",)


class Backend:
    """Interface every backend implements. Arguments arrive validated by the public ops (ops/validation.py):
    nothing below them checks again. scale/shift are any float dtype."""

    name: str = "?"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None if this backend can run on `device`, else a short reason why not."""
        raise NotImplementedError

    def unsupported_reason(self, x: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[str]:
        """None if this backend handles this particular call, else why not (auto then tries the next)."""
        return None

    # A payload is whatever the backend wants to keep per (weight, BN fold, geometry): e.g. a re-laid-out weight.
    def pack_conv(self, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, stride: int,
                  padding: int) -> Any:
        return (weight, scale.float().contiguous(), shift.float().contiguous())

    def conv_bn_act_packed(self, x, pack, residual, relu: bool) -> torch.Tensor:
        """The conv of a ConvBNPack (its payload, stride and padding) on x."""
        raise NotImplementedError

    def bind_conv(self, pack, input_shape: tuple, relu: bool) -> Callable:
        """f(x, residual) computing conv_bn_act_packed for inputs of `input_shape` (and the pack's dtype and
        device), with every per-call decision taken now: the hot path of the fused modules."""
        return lambda x, residual: self.conv_bn_act_packed(x, pack, residual, relu)

    def conv_bn_act(self, x, weight, scale, shift, residual, stride: int, padding: int, relu: bool) -> torch.Tensor:
        """The unpacked call. Packs may be made without autograd: a backend whose op differentiates weight,
        scale and shift overrides this to call that op directly."""
        pack = ConvBNPack(self.name, self.pack_conv(weight, scale, shift, stride, padding), weight.shape[0],
                          weight.shape[1], tuple(weight.shape[2:]), stride, padding, weight.dtype, weight.device)
        return self.conv_bn_act_packed(x, pack, residual, relu)

    def bn_act(self, x, scale, shift, residual, relu: bool) -> torch.Tensor:
        raise NotImplementedError

    # Training BatchNorm's passes (batch_norm_reference.py has their math): plain torch unless a backend has kernels.
    def conv_batch_norm_stats(self, x, weight, bias, stride: tuple, padding: tuple, dilation: tuple,
                              groups: int) -> tuple:
        """(y, mean, var): y = conv2d(x, weight, bias) and its batch statistics (fp32, var biased), training
        BatchNorm's first pass. A backend whose conv kernel gathers the statistics in its epilogue overrides this."""
        y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
        return (y, *self.batch_norm_stats(y))

    def batch_norm_stats(self, y) -> tuple:
        return batch_norm_reference.stats(y)

    def conv_backward(self, grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                      groups, output_mask) -> tuple:
        """(dx, dW, d bias) as aten.convolution_backward computes them: the training and frozen-BN units' conv
        backward (around a oneDNN fault: conv_backward.py). A backend with faster kernels for some convolutions
        overrides this."""
        return convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                                    groups, output_mask)

    def batch_norm_apply(self, y, mean, invstd, weight, bias, residual, relu: bool) -> torch.Tensor:
        return batch_norm_reference.apply(y, mean, invstd, weight, bias, residual, relu)

    def batch_norm_backward(self, grad_out, y, mean, invstd, weight, bias, residual, relu: bool) -> tuple:
        return batch_norm_reference.backward(grad_out, y, mean, invstd, weight, bias, residual, relu)

    def add_relu(self, x, residual) -> torch.Tensor:
        raise NotImplementedError


_BACKENDS: dict[str, Backend] = {}
_state = threading.local()
_global_default = "auto"


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend used when an op is called with backend=None."""
    global _global_default
    _global_default = _check_name(name)


def get_backend() -> str:
    return getattr(_state, "override", None) or _global_default


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block (this thread only), ops called with backend=None use `name`."""
    previous = getattr(_state, "override", None)
    _state.override = _check_name(name)
    try:
        yield
    finally:
        _state.override = previous


def available_backends(device="cpu") -> dict[str, Optional[str]]:
    """Map each known backend to None if usable on `device`, else the reason it is not."""
    device = torch.device(device)
    return {name: b.unavailable_reason(device) for name, b in _BACKENDS.items()}


def resolve(name: Optional[str], x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> Backend:
    """The backend to run this call on. A named backend that cannot run it raises; "auto" falls through."""
    name = _check_name(name if name is not None else get_backend())
    if name != "auto":
        backend = _BACKENDS[name]
        reason = backend.unavailable_reason(x.device) or backend.unsupported_reason(x, weight)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return backend
    for candidate in AUTO_ORDER.get(x.device.type, DEFAULT_ORDER):
        backend = _BACKENDS.get(candidate)
        if backend is None:
            continue
        if backend.unavailable_reason(x.device) is None and backend.unsupported_reason(x, weight) is None:
            return backend
    return _BACKENDS["torch"]


def resolve_name(name: Optional[str], device, dtype=torch.float32) -> str:
    """The backend "auto" (or `name`) would use for tensors on `device`, without a tensor at hand."""
    probe = torch.empty((1, 1, 1, 1), device=torch.device(device), dtype=dtype)
    return resolve(name, probe).name
