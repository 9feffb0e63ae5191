"""What an untraceable forward reaches into, read from its bytecode (torch.fx gave no graph to prove it on).

`reached_descendants(module)` lists the descendants the forward may use other than by calling a child: those must
stay as they are when the rest of the model is fused.
"""

from __future__ import annotations

import dis
import inspect
import sys
from typing import Set

from torch import nn


def reached_descendants(module: nn.Module) -> Set[int]:
    """For a module fx cannot trace: ids of the descendants its code may use other than by calling a child.

    Without a graph, the forward's bytecode says which children it reaches into (`self.ch.conv(x)`,
    `self.body[0]`, `for m in self.body`, `getattr(self.ch, ...)`): their descendants must not be swapped.
    `self.child(...)` is a plain call (the child's own forward, fused or not, computes the same). Anything the
    scan cannot follow (self passed on, super(), closures, nn.Module's own methods) reaches every descendant.
    """
    reached: Set[str] = set()
    if not _scan(module, type(module).forward, reached, set()):
        return {id(m) for m in module.modules() if m is not module}
    return {id(m) for name in reached for m in module._modules[name].modules() if m is not module._modules[name]}


_SINGLE_LOADS = {"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW"}
_PAIR_LOADS = {"LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"}
_METHOD_LOADS = {"LOAD_METHOD"}  # 3.12+: LOAD_ATTR with the low bit of its argument set


def _scan(module: nn.Module, function, reached: Set[str], seen: set) -> bool:
    """Add to `reached` the children `function` reaches into; False if it does what the scan cannot follow."""
    function = getattr(function, "__func__", function)  # bound method -> function
    code = getattr(function, "__code__", None)
    if code is None or not code.co_varnames or code.co_argcount == 0:
        return False
    if code in seen:
        return True
    seen.add(code)
    me = code.co_varnames[0]
    if me in code.co_cellvars or "__class__" in code.co_freevars:  # self in a closure, zero-argument super()
        return False
    instructions = list(dis.get_instructions(code))
    for i, ins in enumerate(instructions):
        names = ins.argval if isinstance(ins.argval, tuple) else (ins.argval,)
        if ins.opcode not in dis.haslocal or me not in names:
            continue
        # 3.13+ pairs loads (LOAD_FAST_LOAD_FAST a, self): the next instruction still acts on self, the top one
        on_top = ins.opname in _SINGLE_LOADS or (ins.opname in _PAIR_LOADS and names[1] == me != names[0])
        if not on_top or i + 1 == len(instructions):
            return False  # stored, deleted, under another local on the stack: not followed
        following = instructions[i + 1]
        if following.opname not in ("LOAD_ATTR", "LOAD_METHOD"):
            return False  # self passed to a function, returned, stored elsewhere
        name = following.argval
        if name in module._modules:
            is_call = following.opname in _METHOD_LOADS or (following.opname == "LOAD_ATTR" and following.arg & 1
                                                             and _LOAD_ATTR_METHOD_BIT)
            if not is_call:
                reached.add(name)
            continue
        attribute = inspect.getattr_static(type(module), name, None)
        if isinstance(attribute, property):
            attribute = attribute.fget
        if inspect.isfunction(attribute) and getattr(nn.Module, name, None) is not attribute:
            if not _scan(module, attribute, reached, seen):  # a helper method of the class: scan it too
                return False
        elif hasattr(nn.Module, name) and name != "training":
            return False  # self.modules(), self._modules, self.get_submodule(...), self.__dict__, ...
    return True


# 3.12+ folded LOAD_METHOD into LOAD_ATTR (low bit of the argument); LOAD_METHOD stays in dis.opmap as a pseudo-op
_LOAD_ATTR_METHOD_BIT = sys.version_info >= (3, 12)
