"""Decide once, run many: a fused module's forward bound to the current state of its modules.

A fused module (blocks.py) keeps Bindings: the packs of its units and, per input signature, its forward as a
plain loop over the steps that unit.decide chose. A call replays them when nothing they depend on changed:

    the change counter (changes.epoch: optimizer steps, registrations, hooks, train/eval, conversions),
    its units' tensors (versions, storages, requires_grad) and attributes (conv geometry, BN eps/momentum/flags),
    the input's signature (shape, dtype, device, requires_grad, grad mode, autocast, the default backend).

Otherwise it decides again while running (`execute`), and keeps the result where every step is replayable.

Where every step is a backend call with a C++ twin (the cpu backend's eval kernels carry a _C.BoundCall), the block's
forward is one _C.BlockProgram call, and a FusedSequential of such blocks runs them all in one _C.LayerProgram call
(LayerRun): between two convolutions the interpreter ran with cold caches, and its few dozen lines per block cost
130-220 us per block boundary inside resnet50 at batch 1 (csrc/bound_program.cpp).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from ..ops.donation import donated, donating
from ..ops.registry import get_backend
from . import changes
from ..ops.registry import resolve
from .eligibility import (_autocast_available, autocast_state, batch_stats, bn_takes, compute_dtype, conv_output,
                          epilogue_takes, plain_bn_reason, plain_conv_reason)
from .plan import ModuleShortcut, ResidualPlan
from .training import program_unit, run_program, trainable_conv_reason, unit_params
from .unit import decide, unit_eager

_CONV_ATTRS = ("stride", "padding", "dilation", "groups", "padding_mode")
_BN_ATTRS = ("eps", "momentum", "training", "track_running_stats")


def _none():
    return None


class NotCarried:
    """State derived from a module (packs, bound calls, programs) that its copies and pickles do not carry: they
    come out as None and derive their own."""

    __slots__ = ()

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return _none, ()


class Bindings(NotCarried):
    """The packs and bound forwards of one fused module, valid while `is_current()`. Copies and pickles of a
    module carry none (packs may be opaque oneDNN tensors): they come out as None."""

    __slots__ = ("epoch", "convs", "bns", "tensors", "attrs", "packs", "runs")

    def __init__(self, convs, bns):
        self.epoch = changes.epoch()
        # Modules that are no conv or BatchNorm (a unit's conv replaced by a wrapper) run as they are on every call
        self.convs = tuple(conv for conv in convs if isinstance(conv, nn.Conv2d))
        self.bns = tuple(bn for bn in bns if isinstance(bn, _BatchNorm))
        watched = [t for conv in self.convs for t in (conv.weight, conv.bias)]
        for bn in self.bns:  # running statistics only where eval reads them: training updates them every call
            watched += [bn.weight, bn.bias]
            if not batch_stats(bn):
                watched += [bn.running_mean, bn.running_var, bn.num_batches_tracked]
        self.tensors = changes.watch_tensors([t for t in watched if t is not None])  # raises for inference tensors
        self.attrs = changes.watch_attrs(self.convs + self.bns,
                                         [_CONV_ATTRS] * len(self.convs) + [_BN_ATTRS] * len(self.bns))
        self.packs: dict = {}
        self.runs: dict = {}

    def is_current(self) -> bool:
        return (self.epoch == (changes._Counter.value, RemovableHandle.next_id) and self.tensors.is_current()
                and self.attrs.is_current())


def signature(x: torch.Tensor, backend: str) -> tuple:
    """What of an input and of the calling context the bound steps depend on."""
    device_type = x.device.type
    autocast = _autocast_available(device_type) and torch.is_autocast_enabled(device_type) and \
        torch.get_autocast_dtype(device_type)
    return (x.shape, x.dtype, x.device, x.requires_grad, torch.is_grad_enabled(), autocast,
            get_backend() if backend == "auto" else backend)


# ------------------------------------------------------------------------------------------------ execution


DecideUnit = Callable[..., tuple]  # (conv, bn, x, residual, relu, promote, name) -> (step, replayable)


def fused_units(backend: Optional[str], packs: Optional[dict]) -> DecideUnit:
    """Each unit as unit.decide chooses (packs None: fold on every call, for torch.compile)."""
    def choose(conv, bn, x, residual, relu, promote, name):
        return decide(conv, bn, x, residual, relu, backend, promote, packs, name)
    return choose


def eager_units(conv, bn, x, residual, relu, promote, name):
    """Each unit's modules called one by one (for hooks registered on every module)."""
    return (lambda x, residual: unit_eager(conv, bn, x, residual, relu, promote)), False


def execute(block: torch.nn.Module, plan: ResidualPlan, x: torch.Tensor, choose: DecideUnit,
            record: Optional[list] = None) -> torch.Tensor:
    """Run `plan` on `block`'s submodules, each unit as `choose` decides, the residual add+ReLU in the last main
    unit; append each (step, replayable) to `record`, in execution order."""
    def run(units, x, residual=None, promote=False):
        last = len(units) - 1
        for i, unit in enumerate(units):
            conv = block.get_submodule(unit.conv)
            bn = block.get_submodule(unit.bn) if unit.bn else None
            res = residual if i == last else None
            step, replayable = choose(conv, bn, x, res, unit.relu or res is not None, promote, unit.conv)
            if record is not None:
                record.append((step, replayable))
            x = step(x, res)
        return x

    main = plan.main
    if plan.shortcut is None:
        identity = x
    elif isinstance(plan.shortcut, ModuleShortcut):
        # It may modify its input in place: it runs where the block ran it, after the units that read x first.
        head, main = main[:plan.shortcut.after], main[plan.shortcut.after:]
        out = run(head, x)
        identity = block.get_submodule(plan.shortcut.name)(x)
        with donating(None):  # its output may be x itself, which a module may also keep: never overwritten
            return run(main, out, residual=identity, promote=plan.promote)
    else:
        identity = run(plan.shortcut, x)
        with donating(identity):  # the shortcut units' own output: nothing reads it after the last unit
            return run(main, x, residual=identity, promote=plan.promote)
    return run(main, x, residual=identity, promote=plan.promote)


def compose(block: torch.nn.Module, plan: ResidualPlan, steps: list, choose: DecideUnit) -> Callable:
    """The forward `execute` recorded, as a loop over its steps. After a module shortcut, whose output the plan
    cannot predict, the last unit is decided on every call (its packs stay cached)."""
    shortcut = plan.shortcut
    if isinstance(shortcut, ModuleShortcut):
        head, (*middle, _) = steps[:shortcut.after], steps[shortcut.after:]
        module = block.get_submodule(shortcut.name)
        unit = plan.main[-1]
        conv = block.get_submodule(unit.conv)
        bn = block.get_submodule(unit.bn) if unit.bn else None

        def last(y, identity):
            return choose(conv, bn, y, identity, True, plan.promote, unit.conv)[0](y, identity)

        def forward(x):
            y = x
            for step in head:
                y = step(y, None)
            identity = module(x)
            for step in middle:
                y = step(y, None)
            with donating(None):  # its output may be x itself, which a module may also keep: never overwritten
                return last(y, identity)
        return forward

    short = steps[:len(shortcut)] if shortcut else ()
    *middle, last = steps[len(short):]

    def forward(x):
        identity = x
        for step in short:
            identity = step(identity, None)
        y = x
        for step in middle:
            y = step(y, None)
        if not short:
            return last(y, identity)
        with donating(identity):  # the shortcut units' own output: nothing reads it after the last unit
            return last(y, identity)

    program = _block_program(short, middle, last)
    if program is None:
        return forward
    python_steps = forward

    def forward(x):
        # a Tensor subclass gets the Python steps, which call the ops where its __torch_function__ sees them
        return program(x, donated(x)) if type(x) is torch.Tensor else python_steps(x)
    forward.program = program  # for FusedSequential's layer program
    return forward


def _block_program(short: list, middle: list, last) -> Optional[object]:
    """The block's steps as one _C.BlockProgram, where every step has its BoundCall (the cpu backend's eval
    kernels: ops/backends/cpu.py); else None. The last step adds the residual, the others take none."""
    natives = [getattr(step, "native", None) for step in (*short, *middle, last)]
    if any(native is None for native in natives):
        return None
    from .. import _C

    *before, final = natives
    calls = [native[0] for native in before]
    return _C.BlockProgram(calls[:len(short)], calls[len(short):] + [final[1]])


class LayerRun(NotCarried):
    """A FusedSequential's blocks as one _C.LayerProgram (None: they do not replay in C++), for inputs of `key` while
    the change counter reads `epoch` (the program itself checks the blocks' tensors and module attributes). Copies
    and pickles carry none."""

    __slots__ = ("epoch", "key", "backend", "program")

    def __init__(self, epoch, key, backend, program):
        self.epoch, self.key, self.backend, self.program = epoch, key, backend, program


_BLOCK_ATTRS = ("forward", "backend")  # a forward replaced on the instance must be called


def layer_program(blocks: list, inputs: list):
    """`blocks` (fused blocks without hooks, just run on inputs of signatures `inputs`) as one _C.LayerProgram, where
    each has a current bound run of its input's signature that is a BlockProgram and all share one backend; else
    None. The program checks the blocks' own watches, and that no block's forward or backend was replaced."""
    from .. import _C

    if not blocks or not hasattr(_C, "LayerProgram") or len({block.backend for block in blocks}) != 1:
        return None
    programs, watches = [], [changes.watch_attrs(blocks, [_BLOCK_ATTRS] * len(blocks))]
    for block, key in zip(blocks, inputs):
        bindings = block.__dict__.get("_bindings")
        run = None if bindings is None or not bindings.is_current() else bindings.runs.get(key)
        program = getattr(run, "program", None)
        if program is None:
            return None
        programs.append(program)
        watches += [bindings.tensors, bindings.attrs]
    if not all(isinstance(w, (_C.TensorWatch, _C.AttrWatch)) for w in watches):
        return None
    return _C.LayerProgram(programs, watches)


def train_forward(block: torch.nn.Module, plan: ResidualPlan, x: torch.Tensor, backend: Optional[str]):
    """The whole block as one training program (training.py: only the conv outputs kept for backward), where
    every unit normalizes with batch statistics in one compute dtype and the residual adds as the epilogue adds
    it; else None (the units are then decided one by one)."""
    if isinstance(plan.shortcut, ModuleShortcut) or x.dim() != 4 or x.numel() == 0:
        return None
    shortcut = plan.shortcut or ()
    units = [(block.get_submodule(u.conv), block.get_submodule(u.bn) if u.bn else None) for u in shortcut + plan.main]
    if any(plain_conv_reason(conv) or bn is None or plain_bn_reason(bn) or not batch_stats(bn)
           or trainable_conv_reason(conv) or x.device != conv.weight.device for conv, bn in units):
        return None
    autocast = autocast_state(x.device.type)
    dtype = compute_dtype(x.dtype, units[0][0], autocast)
    # every conv computes in that dtype (without autocast: all weights of x's dtype), every BN accepts it
    if dtype is None or any(compute_dtype(dtype, conv, autocast) != dtype or not bn_takes(bn, dtype)
                            for conv, bn in units):
        return None
    shape, shapes = tuple(x.shape), []
    for conv, _ in units:  # each shortcut and main chain starts from x
        shapes.append(conv_output(conv, shapes[-1] if shapes and len(shapes) != len(shortcut) else shape))
    identity_shape, identity_dtype = (shapes[len(shortcut) - 1], dtype) if shortcut else (shape, x.dtype)
    if not epilogue_takes(identity_shape, identity_dtype, shapes[-1], dtype, plan.promote):
        return None
    program, bns = [], [bn for _, bn in units]
    for index, unit in enumerate(shortcut):
        program.append(program_unit(units[index][0], units[index][1], index, None, unit.relu))
    identity = len(shortcut)
    for index, unit in enumerate(plan.main):
        conv, bn = units[len(shortcut) + index]
        source = 0 if index == 0 else len(program)
        last = index == len(plan.main) - 1
        program.append(program_unit(conv, bn, source, identity if last else None, unit.relu or last))
    passes = resolve(backend, x)

    def forward(x):
        params = [t for conv, bn in units for t in unit_params(conv, bn, dtype)]
        # an input that an earlier fused block made is recomputed from that block's saved tensors, not saved
        return run_program(program, passes, bns, [x.to(dtype)], params, anchor=False)
    return forward

