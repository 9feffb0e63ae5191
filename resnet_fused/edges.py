"""The modules around a ResNet's blocks on the "cpu" backend: max pooling, global average pooling and the classifier
as the extension's kernels (csrc/cpu/edges.cpp) instead of ATen's, for inference calls on CPU tensors.

    FusedMaxPool2d           max_pool2d(x, kernel_size, stride, padding)   same values as ATen's, NaN included
    FusedAdaptiveAvgPool2d   adaptive_avg_pool2d(x, 1)                      fp32 sums in pixel order, then / H*W
    FusedLinear              x @ weight^T + bias                            fp32, up to LINEAR_MAX_ROWS rows of x

ATen's max pooling computes the indices a backward would need, and its fp32 x @ W^T on few rows (MKL's) ran 1.3-2.5x
slower than linear_rows (1-32 rows) here. Measured on 2 cores of an AMD EPYC (Zen 3), each op where it runs in a fused
resnet50 (profiler, median of 20 forwards), ATen's -> the kernels': batch 1 max pooling 0.41 -> 0.24 ms, average pooling
0.16 -> 0.04, classifier 0.61 -> 0.28; batch 8 2.85 -> 1.48, 0.35 -> 0.21, 1.49 -> 0.54. Whole forwards, two fused
models interleaved (40 and 8 rounds): resnet50 1.024x (batch 1) and 1.048x (batch 8) faster, resnet18 1.089x (batch 1).

fuse_model turns modules of exactly these torch classes into them in place: the object, its hooks and attributes
stay and only the class changes, so parameters, buffers and state_dict keys are the same. Any other call (autograd
recording, torch.compile, another device, dtype or layout, a Tensor subclass, another backend chosen) runs the
torch module's own forward, as does every call where the extension did not build.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from . import _extension
from .ops.registry import get_backend

__all__ = ["FusedMaxPool2d", "FusedAdaptiveAvgPool2d", "FusedLinear", "edge_class", "LINEAR_MAX_ROWS"]

_POOL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows of x up to which the classifier runs as linear_rows: measured against ATen's (MKL) on 2 cores of an AMD EPYC,
# a 2048 -> 1000 classifier with its weight out of the caches: 1.42x faster at 1 row, 2.5x at 8, 1.7x at 16, 1.3x at
# 32, level at 64.
LINEAR_MAX_ROWS = 32


def _has_edge_kernels() -> bool:
    return all(_extension.has_kernel(op, "CPU") for op in ("max_pool2d_cl", "mean_pool_cl", "linear_rows"))


_EDGE_KERNELS = _has_edge_kernels()


def _native(backend: str, x) -> bool:
    """Whether this call runs the extension's kernel: an inference call on a plain CPU tensor, the "cpu" backend
    chosen (by name, or "auto" as `use_backend` / `set_backend` leave it, which picks "cpu" for CPU tensors)."""
    if type(x) is not torch.Tensor or x.device.type != "cpu" or not _EDGE_KERNELS or torch.compiler.is_compiling():
        return False
    if x.requires_grad and torch.is_grad_enabled():
        return False
    if backend == "auto":
        backend = get_backend()
    return backend in ("cpu", "auto")


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


_X = torch.empty(0)  # where a BoundCall's x goes: replaced on every call


class _Edge:
    """A torch module whose forward runs an extension kernel where it can. `backend` as fuse_model's; each class's
    _kernel_args(module) says whether the kernel computes what the module is configured to (None: it does not),
    checked by fuse_model on the torch module and by every forward, since attributes may change after fusing; its
    _kernel_call(x) says which op call the forward makes for x (None: the torch module's own forward)."""

    backend: str = "auto"
    # what bound_call's result depends on besides x's signature and the tensors in its arguments
    watched_attrs: Tuple[str, ...] = ("forward", "backend")

    def _kernel_call(self, x) -> Optional[tuple]:
        raise NotImplementedError

    def forward(self, x):
        call = self._kernel_call(x)
        if call is None:
            return super().forward(x)
        op, args = call
        return op(*args)

    def bound_call(self, x):
        """The forward for inputs of x's signature (inference, no autocast) as a _C.BoundCall of its kernel, with
        the tensors it reads besides x (to watch: the call holds aliases of them); None where the forward would not
        run the kernel."""
        call = self._kernel_call(x)
        if call is None:
            return None
        op, (_, *fixed) = call
        tensors = [a for a in fixed if isinstance(a, torch.Tensor)]
        # aliases, not the parameters: a reference to a parameter's TensorImpl would make swap_tensors refuse it
        args = (_X, *(a.detach() if isinstance(a, torch.Tensor) else a for a in fixed))
        bound = _extension.bound_call(op._schema.name, op._schema.overload_name, args)
        return None if bound is None else (bound, tensors)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class FusedMaxPool2d(_Edge, nn.MaxPool2d):
    watched_attrs = _Edge.watched_attrs + ("kernel_size", "stride", "padding", "dilation", "return_indices",
                                           "ceil_mode")

    def _kernel_args(self) -> Optional[tuple]:
        """(kernel_size, stride, padding) where the kernel computes what this module does, else None."""
        if self.return_indices or self.ceil_mode or _pair(self.dilation) != (1, 1):
            return None
        kernel, padding = _pair(self.kernel_size), _pair(self.padding)
        if padding[0] * 2 > kernel[0] or padding[1] * 2 > kernel[1]:
            return None  # ATen's forward says what is wrong
        return kernel, _pair(self.stride or self.kernel_size), padding

    def _kernel_call(self, x) -> Optional[tuple]:
        if (_native(self.backend, x) and x.dim() == 4 and x.dtype in _POOL_DTYPES
                and x.is_contiguous(memory_format=torch.channels_last)):
            args = self._kernel_args()
            if args is not None and x.shape[2] + 2 * args[2][0] >= args[0][0] \
                    and x.shape[3] + 2 * args[2][1] >= args[0][1]:
                return torch.ops.resnet_fused.max_pool2d_cl.default, (x, *args)
        return None


class FusedAdaptiveAvgPool2d(_Edge, nn.AdaptiveAvgPool2d):
    watched_attrs = _Edge.watched_attrs + ("output_size",)

    def _kernel_args(self) -> Optional[tuple]:
        """() where the kernel computes what this module does (pooling to 1x1), else None."""
        return () if _pair(self.output_size) == (1, 1) else None

    def _kernel_call(self, x) -> Optional[tuple]:
        if (_native(self.backend, x) and self._kernel_args() is not None and x.dim() == 4
                and x.dtype in _POOL_DTYPES and x.shape[2] * x.shape[3] > 0
                and x.is_contiguous(memory_format=torch.channels_last)):
            return torch.ops.resnet_fused.mean_pool_cl.default, (x,)
        return None


class FusedLinear(_Edge, nn.Linear):
    def _kernel_args(self) -> Optional[tuple]:
        return ()  # any Linear: what decides is the call

    def _kernel_call(self, x) -> Optional[tuple]:
        weight, bias = self.weight, self.bias
        if (_native(self.backend, x) and x.dim() == 2 and x.shape[0] <= LINEAR_MAX_ROWS and x.dtype == torch.float32
                and weight.dtype == torch.float32 and weight.device.type == "cpu"
                and not (torch.is_grad_enabled() and (weight.requires_grad
                                                      or (bias is not None and bias.requires_grad)))
                and not torch.is_autocast_enabled("cpu")):
            return torch.ops.resnet_fused.linear_rows.default, (x, weight, bias)
        return None


_EDGE_CLASSES = {nn.MaxPool2d: FusedMaxPool2d, nn.AdaptiveAvgPool2d: FusedAdaptiveAvgPool2d, nn.Linear: FusedLinear}
_KINDS = {FusedMaxPool2d: "max-pool", FusedAdaptiveAvgPool2d: "avg-pool", FusedLinear: "linear"}


def edge_class(module: nn.Module) -> Optional[type]:
    """The fused class fuse_model gives `module` (one of exactly these torch classes, configured so that the kernel
    can compute it), or None."""
    fused = _EDGE_CLASSES.get(type(module))
    return fused if fused is not None and fused._kernel_args(module) is not None else None


def edge_kind(cls: type) -> str:
    return _KINDS[cls]
