"""One unit, y = relu?(bn(conv(x)) + residual?), decided once for an input: what runs it, as a step f(x, residual).

    packed   eval, no autograd: BN folded into scale/shift (ops.folding), the weight packed once per change of
             the modules' tensors, the backend's call bound to the input's shape (Backend.bind_conv)
    folded   eval, no autograd, a conv the kernels do not run (grouped, dilated): F.conv2d + the bn_act epilogue
    frozen   eval with autograd (fine-tuning with frozen BN): the packed call forward, a backward of its own
             (frozen.py)
    live     under torch.compile, or a conv the kernels do not run with autograd on: the fold differentiated or
             traced on every call
    train    batch statistics (training.py)
    eager    the modules called as the block calls them, wherever a fused path would not be exact (eligibility.py)

A step's output signature (shape, dtype) follows from its input's, except an eager step around modules that may
do anything (hooks, overridden forwards): `decide` says which steps may be replayed for later inputs of the same
signature.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import ops
from ..ops.folding import folded_scale_shift
from ..ops.registry import _BACKENDS, get_backend, resolve
from .eligibility import (BN_FORWARD, CONV_IMPL, autocast_state, batch_stats, bn_takes, compute_dtype, conv_output,
                          epilogue_takes, is_absorbed_bn, is_fused_conv, kernel_unsupported_reason,
                          plain_bn_reason, plain_conv_reason)
from .frozen import frozen_step
from .training import program_unit, run_program, trainable_conv_reason, unit_params

Step = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def unit_eager(conv, bn, x, residual, relu: bool, promote: bool = False) -> torch.Tensor:
    """The unit exactly as the eager block computes it (a fused conv / absorbed BN run their original math)."""
    y = CONV_IMPL(conv, x, conv.weight, conv.bias) if is_fused_conv(conv) else conv(x)
    if bn is not None:
        y = BN_FORWARD(bn, y) if is_absorbed_bn(bn) else bn(y)
    return add_act(y, residual, relu, promote)


def add_act(y, residual, relu: bool, promote: bool) -> torch.Tensor:
    """relu?(y + residual?) as the block writes it: `out + identity` (promote) or `out += identity`."""
    if residual is not None:
        y = y + residual if promote else y.add_(residual)
    return torch.relu(y) if relu else y


def _needs_grad(x, residual, conv, bn) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x, residual, conv.weight, conv.bias]
    if bn is not None:
        tensors += [bn.weight, bn.bias]
    return any(t is not None and t.requires_grad for t in tensors)


def decide(conv, bn, x: torch.Tensor, residual: Optional[torch.Tensor], relu: bool, backend: Optional[str],
           promote: bool, packs: Optional[dict], name: str) -> tuple[Step, bool]:
    """(step, replayable) for this unit and these inputs.

    packs: the owner's packs by unit (valid for the current state of its modules), or None to fold on every call
    (torch.compile tracing). backend: a name, or None / "auto" for the current default. promote: the block adds
    out of place (`out + identity`), so the sum takes torch's promoted dtype; an in-place add (`out +=
    identity`) keeps the conv's dtype, as the fused epilogue does.
    """
    def eager(x, residual):
        return unit_eager(conv, bn, x, residual, relu, promote)

    if plain_conv_reason(conv) is not None or (bn is not None and plain_bn_reason(bn) is not None):
        return eager, False  # checked first: `conv` may not even have a weight
    if x.dim() != 4 or x.numel() == 0 or x.device != conv.weight.device:
        return eager, True
    dtype = compute_dtype(x.dtype, conv, autocast_state(x.device.type))
    if dtype is None or (bn is not None and not bn_takes(bn, dtype)):
        return eager, True
    if residual is not None and not epilogue_takes(residual.shape, residual.dtype, conv_output(conv, x.shape), dtype,
                                                   promote):
        # a broadcasting residual, or one whose dtype the sum would be promoted to: fuse the rest, add as eager
        inner, replayable = decide(conv, bn, x, None, False, backend, promote, packs, name)
        return (lambda x, residual: add_act(inner(x, None), residual, relu, promote)), replayable
    backend = get_backend() if backend in (None, "auto") else backend
    if batch_stats(bn):
        if trainable_conv_reason(conv) is not None:
            return eager, True
        return _train_step(conv, bn, x, residual, relu, dtype, resolve(backend, x)), True
    step = _eval_step(conv, bn, x, relu, dtype, backend, packs, name, _needs_grad(x, residual, conv, bn))
    if dtype == x.dtype and (residual is None or residual.dtype == dtype):
        return step, True
    return (lambda x, residual: step(x.to(dtype), None if residual is None else residual.to(dtype))), True


def _train_step(conv, bn, x, residual, relu, dtype, backend) -> Step:
    """The unit as a one-unit training program (training.py), x (and the residual) in the compute dtype."""
    program = [program_unit(conv, bn, 0, None if residual is None else 1, relu)]

    def train(x, residual):
        inputs = [x.to(dtype)] if residual is None else [x.to(dtype), residual.to(dtype)]
        return run_program(program, backend, (bn,), inputs, unit_params(conv, bn, dtype))
    return train


def _eval_step(conv, bn, x, relu, dtype, backend, packs, name, needs_grad) -> Step:
    stride = conv.stride[0]
    padding = 0 if isinstance(conv.padding, str) else conv.padding[0]
    fused_conv = kernel_unsupported_reason(conv) is None
    if packs is None or (needs_grad and not fused_conv):  # traced, or autograd on a conv the kernels do not run
        def live(x, residual):
            scale, shift = folded_scale_shift(conv, bn)
            weight = conv.weight.to(dtype)
            if fused_conv and not needs_grad:
                return ops.conv_bn_act(x, weight, scale, shift, residual, stride=stride, padding=padding,
                                       relu=relu, backend=backend)
            return ops.bn_act(CONV_IMPL(conv, x, weight, None), scale, shift, residual, relu=relu, backend=backend)
        return live
    key = (name, dtype, backend)
    entry = packs.get(key)
    if entry is None:
        scale, shift = ops.fold_bn(conv, bn)
        weight = conv.weight.detach().to(dtype)
        # no copy: the pack may share the conv's weight; the owner re-packs whenever that changes
        entry = packs[key] = (ops.pack_conv_bn(weight, scale, shift, stride=stride, padding=padding, backend=backend,
                                               copy=False) if fused_conv else (weight, scale, shift))
    if fused_conv:
        kernel_backend = _BACKENDS[entry.backend]
        kernel = kernel_backend.bind_conv(entry, tuple(x.shape), relu)
        return frozen_step(conv, bn, kernel, relu, dtype, kernel_backend.conv_backward) if needs_grad else kernel
    weight, scale, shift = entry
    epilogue = resolve(backend, x)

    def folded(x, residual):
        return epilogue.bn_act(CONV_IMPL(conv, x, weight, None), scale, shift, residual, relu)
    return folded
