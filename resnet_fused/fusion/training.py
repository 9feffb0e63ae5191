"""Units in training: conv -> BatchNorm with batch statistics (-> + residual) (-> ReLU), run by one autograd
Function per fused block (or per unit) that keeps only the conv outputs for backward.

A program is a list of units over a list of values: value 0 is the input (and 1 a residual given from outside,
for a lone unit); unit i appends value i + n_inputs:

    y_i = conv(values[source_i], W_i) (+ conv bias)
    mean_i, var_i = batch statistics of y_i (fp32, biased var);  invstd_i = 1 / sqrt(var_i + eps)
    values += [act((y_i - mean_i) * invstd_i * gamma_i + beta_i (+ values[residual_i]))]

and running_mean/var (unbiased var) and num_batches_tracked are updated as nn.BatchNorm2d does. The backend makes
y_i and its statistics in one call (Backend.conv_batch_norm_stats: the "triton" backend in its conv kernel's
epilogue, the "cpu" backend's 1x1 convs as one matrix product). Forward saves each y_i and the input; backward
recomputes the values the convs and residuals read (elementwise, from y_i: no convolution is recomputed) and runs,
unit by unit in reverse, the BatchNorm backward (ops.batch_norm_backward: reductions over centered values in fp32)
and the backend's conv backward (Backend.conv_backward), summing a value's gradients in place where it can.

A block's input that the previous fused block made (unmodified since) is not saved either: it is that block's
output, recomputed from that block's saved tensors (Produced), so a run of fused blocks keeps its first input and
its conv outputs only. Per Bottleneck of width C eager keeps y1, r1, y2, r2, y3 and its output (12C); this keeps
y1, y2, y3 (6C): 0.6x of eager's activations over ResNet-50.

Double backward (gradient penalties): a backward that must itself be differentiable recomputes the program (and a
recomputed input's chain back to a saved one, convolutions included) with plain autograd ops and differentiates
that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..ops.batch_norm_reference import output_format
from ..ops.conv_backward import convolution
from ..ops.cpu_cache import block_cached
from .vjp import differentiable_vjp


@dataclass(frozen=True)
class TrainUnit:
    """One conv -> batch-statistics BN (-> + residual) (-> ReLU), reading values by index."""

    source: int
    residual: Optional[int]
    relu: bool
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    eps: float


def _conv(x, weight, bias, unit: TrainUnit):
    return convolution(x, weight, bias, unit.stride, unit.padding, unit.dilation, unit.groups)


def _count(y) -> int:
    count = y.numel() // max(y.shape[1], 1)
    if count <= 1:  # eager's message, raised where eager raises
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(y.shape)}")
    return count


@torch.no_grad()
def update_running_stats(bn, mean, var, count: int) -> None:
    """As _BatchNorm.forward + F.batch_norm do: count the batch, then blend in mean and unbiased var (both buffers
    in two in-place list ops where they are fp32: this runs once per unit per step)."""
    if not (bn.training and bn.track_running_stats):
        return
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum  # None: cumulative
    if bn.running_mean is None or bn.running_var is None:
        return
    unbiased = var * (count / (count - 1))
    running = [bn.running_mean, bn.running_var]
    if all(r.dtype == torch.float32 for r in running):
        torch._foreach_mul_(running, 1.0 - factor)
        torch._foreach_add_(running, [mean, unbiased], alpha=factor)
    else:
        bn.running_mean.copy_(factor * mean + (1.0 - factor) * bn.running_mean.float())
        bn.running_var.copy_(factor * unbiased + (1.0 - factor) * bn.running_var.float())


def _params(flat, index):
    """(weight, conv bias, gamma, beta) of unit `index` in the flat parameter list."""
    return flat[4 * index: 4 * index + 4]


_PRODUCED = "_resnet_fused_produced"  # attribute of a program's output: how to recompute it
MAX_CHAIN = 16  # programs recomputed from one saved input at most (a stage of ResNet-152 has 36 blocks)


class Produced:
    """How a single-input program's output is recomputed elementwise: from its input (saved by that program, or
    another Produced) and its saved conv outputs and statistics. The next program keeps this instead of the tensor,
    so a run of fused blocks keeps only its first input and each unit's conv output (no convolution is recomputed).
    It reads the producing program's saved tensors through its node, so they are freed, as any saved tensor, by
    that program's backward (never kept alive by a graph the caller still holds)."""

    __slots__ = ("program", "backend", "node", "source", "version", "depth", "value")

    def __init__(self, program, backend, node, source: Optional["Produced"], version: int):
        self.program, self.backend, self.node, self.source, self.version = program, backend, node, source, version
        self.depth = source.depth + 1 if source is not None else 1
        self.value = None  # the recomputed output, kept until the one backward that reads it

    def _saved(self):
        """(input or None, ys, stats, flat) of the producing program."""
        saved = self.node.saved_tensors
        x, saved = (None, saved) if self.source is not None else (saved[0], saved[1:])
        units = len(self.program)
        return x, saved[:units], saved[units:3 * units], saved[3 * units:]

    def recompute(self) -> torch.Tensor:
        if self.value is None:
            x, ys, stats, flat = self._saved()
            x = self.source.recompute() if self.source is not None else x
            self.value = _recompute(self.program, self.backend, [x], ys, stats, flat, keep_last=True)[-1]
        return self.value

    def differentiable(self) -> torch.Tensor:
        """The output recomputed in plain differentiable ops (convolutions too): for double backward only."""
        x, _, _, flat = self._saved()
        x = self.source.differentiable() if self.source is not None else x
        return plain_forward(self.program, [x], flat)


def _producer(x: torch.Tensor) -> Optional[Produced]:
    """x's Produced where x is a program's output, unmodified since, whose chain may grow by one."""
    produced = getattr(x, _PRODUCED, None)
    if produced is None or produced.version != x._version or produced.depth >= MAX_CHAIN:
        return None
    return produced


class _Program(torch.autograd.Function):
    @staticmethod
    def forward(ctx, program: tuple, backend, bns: tuple, anchor: bool, n_inputs: int, *tensors):
        inputs, flat = list(tensors[:n_inputs]), tensors[n_inputs:]
        values, ys, stats = list(inputs), [], []
        for index, (unit, bn) in enumerate(zip(program, bns)):
            weight, conv_bias, gamma, beta = _params(flat, index)
            y, mean, var = backend.conv_batch_norm_stats(values[unit.source], weight, conv_bias, unit.stride,
                                                         unit.padding, unit.dilation, unit.groups)
            update_running_stats(bn, mean, var, _count(y))
            invstd = torch.rsqrt(var + unit.eps)
            residual = None if unit.residual is None else values[unit.residual]
            values.append(backend.batch_norm_apply(y, mean, invstd, gamma, beta, residual, unit.relu))
            ys.append(y)
            stats += [mean, invstd]
        ctx.program, ctx.backend, ctx.n_inputs = program, backend, n_inputs
        source = _producer(inputs[0]) if n_inputs == 1 and not anchor else None
        ctx.source = source  # None: the inputs are saved
        ctx.save_for_backward(*(inputs if source is None else ()), *ys, *stats, *flat)
        out = values[-1]
        if n_inputs == 1 and any(ctx.needs_input_grad):  # out -> Produced -> this node: no cycle, no tensor held
            setattr(out, _PRODUCED, Produced(program, backend, ctx, source, out._version))
        return out

    @staticmethod
    @block_cached  # the recomputed values and gradients from the CPU block cache, as the forward's activations
    def backward(ctx, grad_out):
        program, backend, n_inputs, source = ctx.program, ctx.backend, ctx.n_inputs, ctx.source
        saved = ctx.saved_tensors
        units = len(program)
        if source is not None:
            saved = (None,) + saved
        ys = saved[n_inputs:n_inputs + units]
        stats, flat = saved[n_inputs + units:n_inputs + 3 * units], saved[n_inputs + 3 * units:]
        needs = ctx.needs_input_grad[5:]
        if torch.is_grad_enabled():  # create_graph: the backward must be differentiable
            inputs = saved[:n_inputs] if source is None else (source.differentiable(),)

            def whole(*tensors):
                return plain_forward(program, list(tensors[:n_inputs]), tensors[n_inputs:])
            return (None,) * 5 + differentiable_vjp(whole, (*inputs, *flat), grad_out, needs)
        inputs = saved[:n_inputs] if source is None else (source.recompute(),)
        values = _recompute(program, backend, list(inputs), ys, stats, flat)
        if source is not None:
            source.value = None  # no later backward reads this program's input
        grads = [None] * len(values)
        grads[-1] = grad_out
        owned = set()  # indices whose gradient this backward made (summed into in place, never grad_out)
        param_grads = [None] * len(flat)
        for index in reversed(range(units)):
            unit = program[index]
            weight, conv_bias, gamma, beta = _params(flat, index)
            residual = None if unit.residual is None else values[unit.residual]
            mean, invstd = stats[2 * index], stats[2 * index + 1]
            grad_y, grad_gamma, grad_beta, grad_residual = backend.batch_norm_backward(
                grads[n_inputs + index], ys[index], mean, invstd, gamma, beta, residual, unit.relu)
            if residual is not None:
                _accumulate(grads, owned, unit.residual, grad_residual, fresh=False)
            source_needs = unit.source >= n_inputs or needs[unit.source]
            grad_x, grad_w, grad_cb = backend.conv_backward(
                grad_y, values[unit.source], weight, None if conv_bias is None else [conv_bias.shape[0]],
                unit.stride, unit.padding, unit.dilation, False, [0, 0], unit.groups,
                [source_needs, needs[n_inputs + 4 * index], conv_bias is not None and needs[n_inputs + 4 * index + 1]])
            if source_needs:
                _accumulate(grads, owned, unit.source, grad_x, fresh=True)
            param_grads[4 * index: 4 * index + 4] = [
                grad_w, grad_cb, None if gamma is None else grad_gamma.to(gamma.dtype),
                None if beta is None else grad_beta.to(beta.dtype)]
        return (None,) * 5 + (*grads[:n_inputs], *param_grads)


def _accumulate(grads: list, owned: set, index: int, grad: torch.Tensor, fresh: bool) -> None:
    """grads[index] += grad, in place where the sum is a tensor this backward made (no new activation-sized
    buffer); `fresh`: grad is such a tensor (a conv backward's result, not a BatchNorm backward's, which may be
    grad_out itself)."""
    total = grads[index]
    if total is None:
        grads[index] = grad
    elif index in owned:
        total.add_(grad)
    elif fresh:
        grads[index] = grad.add_(total)
    else:
        grads[index] = total + grad
    if fresh or total is not None:
        owned.add(index)


def _recompute(program, backend, values, ys, stats, flat, keep_last: bool = False) -> list:
    """The values of the forward from the saved conv outputs (the last one only if keep_last: none of the
    program's units reads it)."""
    read = {u.source for u in program} | {u.residual for u in program if u.residual is not None}
    if keep_last:
        read.add(len(values) + len(program) - 1)
    n_inputs = len(values)
    for index, unit in enumerate(program):
        value = None
        if n_inputs + index in read:
            _, _, gamma, beta = _params(flat, index)
            residual = None if unit.residual is None else values[unit.residual]
            value = backend.batch_norm_apply(ys[index], stats[2 * index], stats[2 * index + 1], gamma, beta,
                                             residual, unit.relu)
        values.append(value)
    return values


def plain_forward(program, values: list, flat) -> torch.Tensor:
    """The program in plain differentiable torch ops (batch statistics, no running-statistics update)."""
    values = list(values)
    for index, unit in enumerate(program):
        weight, conv_bias, gamma, beta = _params(flat, index)
        y = _conv(values[unit.source], weight, conv_bias, unit)
        var, mean = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
        z = (y.float() - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + unit.eps).view(1, -1, 1, 1)
        if gamma is not None:
            z = z * gamma.float().view(1, -1, 1, 1)
        if beta is not None:
            z = z + beta.float().view(1, -1, 1, 1)
        if unit.residual is not None:
            z = z + values[unit.residual].float()
        values.append((torch.relu(z) if unit.relu else z).to(y.dtype).contiguous(memory_format=output_format(y)))
    return values[-1]


def run_program(program: Sequence[TrainUnit], backend, bns, inputs, params, anchor: bool = True) -> torch.Tensor:
    """The program's last value, differentiable in the inputs and params (flat: weight, conv bias, gamma, beta
    per unit, None where absent). anchor=False: a single input that an earlier program made may be recomputed
    from that program's saved tensors instead of being saved (fused blocks after the first of a stage)."""
    return _Program.apply(tuple(program), backend, tuple(bns), anchor, len(inputs), *inputs, *params)


def unit_params(conv, bn, dtype) -> list:
    """A unit's (weight, conv bias, gamma, beta) for the program: the conv's in the compute dtype (as eager's
    conv under autocast), the BN's as they are (the passes read them in fp32)."""
    return [conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype), bn.weight, bn.bias]


def trainable_conv_reason(conv) -> Optional[str]:
    """None if a program can run this conv (it calls aten.convolution with explicit zero padding)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return f"padding {conv.padding!r} with padding_mode {conv.padding_mode!r}"
    return None


def program_unit(conv, bn, source: int, residual: Optional[int], relu: bool) -> TrainUnit:
    return TrainUnit(source, residual, relu, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
                     conv.groups, float(bn.eps))
