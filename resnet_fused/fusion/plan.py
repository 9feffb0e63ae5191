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

from .conv_bn import run_unit


@dataclass(frozen=True)
class Unit:
    conv: str
    bn: Optional[str]
    relu: bool

    def describe(self) -> str:
        return "+".join([self.conv] + ([self.bn] if self.bn else []) + (["relu"] if self.relu else []))


@dataclass(frozen=True)
class ModuleShortcut:
    """A shortcut the kernels cannot fuse (e.g. avg-pool then conv): run as the block would."""

    name: str


Shortcut = Union[None, Tuple[Unit, ...], ModuleShortcut]  # None: identity


@dataclass(frozen=True)
class ResidualPlan:
    main: Tuple[Unit, ...]
    shortcut: Shortcut = None

    def describe(self) -> str:
        main = " -> ".join(u.describe() for u in self.main)
        if self.shortcut is None:
            short = "identity"
        elif isinstance(self.shortcut, ModuleShortcut):
            short = f"{self.shortcut.name} (run as is)"
        else:
            short = " -> ".join(u.describe() for u in self.shortcut)
        return f"[{main}] + [{short}] -> relu"


def _run_chain(block: nn.Module, units, x, cache, backend, residual=None):
    last = len(units) - 1
    for i, unit in enumerate(units):
        conv = block.get_submodule(unit.conv)
        bn = block.get_submodule(unit.bn) if unit.bn else None
        relu = unit.relu or (i == last and residual is not None)
        x = run_unit(cache, unit.conv, conv, bn, x, residual if i == last else None, relu, backend)
    return x


def run_plan(block: nn.Module, plan: ResidualPlan, x: torch.Tensor, cache: Optional[dict],
             backend: Optional[str]) -> torch.Tensor:
    """Execute `plan` on `block`'s submodules: one fused op per unit, the residual add+ReLU in the last one."""
    if plan.shortcut is None:
        identity = x
    elif isinstance(plan.shortcut, ModuleShortcut):
        identity = block.get_submodule(plan.shortcut.name)(x)
    else:
        identity = _run_chain(block, plan.shortcut, x, cache, backend)
    return _run_chain(block, plan.main, x, cache, backend, residual=identity)
