"""A residual block's dataflow as plain data, and its fused execution.

    out = relu( unit_k(... unit_1(x)) + shortcut(x) )

where each unit is relu?(bn?(conv(.))), the last main unit has no ReLU of its own (its epilogue takes the
shortcut and the final ReLU), and the shortcut is the identity, a chain of units, or a module run as is.
Names are attribute paths inside the block ("conv1", "downsample.0"), so a plan pickles and survives `.to()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .conv_bn import run_unit, unit_eager


@dataclass(frozen=True)
class Unit:
    conv: str
    bn: Optional[str]
    relu: bool

    def describe(self) -> str:
        return "+".join([self.conv] + ([self.bn] if self.bn else []) + (["relu"] if self.relu else []))


@dataclass(frozen=True)
class ModuleShortcut:
    """A shortcut the kernels cannot fuse (e.g. avg-pool then conv): run as the block would.

    after: how many main units run before it. The module may modify its input in place (a pre-activation
    ReLU(inplace=True)), so it runs where the block ran it: after the units whose convs read the input first
    (at most all but the last unit, whose epilogue takes its output).
    """

    name: str
    after: int = 0


Shortcut = Union[None, Tuple[Unit, ...], ModuleShortcut]  # None: identity


@dataclass(frozen=True)
class ResidualPlan:
    main: Tuple[Unit, ...]
    shortcut: Shortcut = None
    promote: bool = False  # the block adds out of place (out + identity): the sum takes the promoted dtype

    def describe(self) -> str:
        main = " -> ".join(u.describe() for u in self.main)
        if self.shortcut is None:
            short = "identity"
        elif isinstance(self.shortcut, ModuleShortcut):
            short = f"{self.shortcut.name} (run as is)"
        else:
            short = " -> ".join(u.describe() for u in self.shortcut)
        return f"[{main}] + [{short}] -> relu"


def _run_chain(block: nn.Module, units, x, cache, backend, residual=None, eager=False, promote=False):
    last = len(units) - 1
    for i, unit in enumerate(units):
        conv = block.get_submodule(unit.conv)
        bn = block.get_submodule(unit.bn) if unit.bn else None
        relu = unit.relu or (i == last and residual is not None)
        res = residual if i == last else None
        if eager:
            x = unit_eager(conv, bn, x, res, relu, promote)
        else:
            x = run_unit(cache, unit.conv, conv, bn, x, res, relu, backend, promote)
    return x


def run_plan(block: nn.Module, plan: ResidualPlan, x: torch.Tensor, cache: Optional[dict],
             backend: Optional[str], eager: bool = False) -> torch.Tensor:
    """Execute `plan` on `block`'s submodules: one fused op per unit, the residual add+ReLU in the last one
    (eager: each conv and BN module called as the block calls it, e.g. for hooks registered on all modules)."""
    main = plan.main
    if plan.shortcut is None:
        identity = x
    elif isinstance(plan.shortcut, ModuleShortcut):
        head, main = main[:plan.shortcut.after], main[plan.shortcut.after:]
        out = _run_chain(block, head, x, cache, backend, eager=eager)
        identity = block.get_submodule(plan.shortcut.name)(x)
        x = out
    else:
        identity = _run_chain(block, plan.shortcut, x, cache, backend, eager=eager)
    return _run_chain(block, main, x, cache, backend, residual=identity, eager=eager, promote=plan.promote)


def global_module_hooks() -> bool:
    """Whether hooks for every module are registered (torch.nn.modules.module.register_module_forward_hook and
    the like): they must see each original module's call, so fused modules then run their modules one by one."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or getattr(hooks, "_global_backward_pre_hooks", None))
