"""A residual block's dataflow as plain data (binding.py executes it).

    out = relu( unit_k(... unit_1(x)) + shortcut(x) )

where each unit is relu?(bn?(conv(.))), the last main unit has no ReLU of its own (its epilogue takes the
shortcut and the final ReLU), and the shortcut is the identity, a chain of units, or a module run as is.
Names are attribute paths inside the block ("conv1", "downsample.0"), so a plan pickles and survives `.to()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union


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


@dataclass(frozen=True)
class ChainStep:
    """One step of a model forward that is a plain chain (chained.py): a call of the child `module` on the previous
    value alone, or (module None) the previous value's flatten(*flatten)."""

    module: Optional[str]
    flatten: Optional[Tuple[int, int]] = None

    def describe(self) -> str:
        return self.module if self.module is not None else f"flatten{self.flatten}"
