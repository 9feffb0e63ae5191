"""One process-wide change counter, read by everything that caches work derived from a model's tensors and modules
(the fused modules' bound calls, `cuda_graphed`'s graphs), so that a cache is checked in microseconds and never
goes stale.

    epoch() changes when: any optimizer steps (fused optimizers bypass version counters), any module registers a
    parameter, buffer or submodule (`conv.weight = ...`, `block.relu = ...`, load_state_dict(assign=True)), any
    hook is registered (module, global or tensor hooks: every one takes a RemovableHandle, whose id counter this
    reads), or a fused module is switched between train and eval or converted (.to(), .half(), ...).

What the counter cannot see, a cache compares itself: in-place edits, through tensor version counters, and
storages swapped behind a parameter (`p.data = t`, `.to()` of a plain module), through data pointers; see
`watch_tensors`. In-place edits that bypass version counters (`p.data.mul_(2)`, NumPy views) are invisible to both.
"""

from __future__ import annotations

from operator import attrgetter, methodcaller
from typing import Sequence

import torch
from torch.nn.modules import module as _module
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

from .. import _extension


class _Counter:
    value = 0


def bump(*_args) -> None:
    """Count one change (usable as a registration or optimizer hook: returns None, changes nothing)."""
    _Counter.value += 1


def epoch() -> tuple:
    """Equal between two reads iff none of the changes the module docstring lists happened in between."""
    return _Counter.value, RemovableHandle.next_id


register_optimizer_step_post_hook(bump)
_module.register_module_parameter_registration_hook(bump)
_module.register_module_buffer_registration_hook(bump)
_module.register_module_module_registration_hook(bump)

_VERSION_AND_FLAG = attrgetter("_version", "requires_grad")
_DATA_PTR = methodcaller("data_ptr")


class TensorState:
    """What the counter cannot see of some tensors: their versions (in-place edits), storages and requires_grad.

    Holds the tensors' storages alive (through detached aliases), so that a storage swapped out behind a
    parameter cannot be freed and reallocated at the same address, which would make a swap look like no change.
    Raises RuntimeError for inference tensors, which have no version counter.
    """

    __slots__ = ("tensors", "_aliases", "state")

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = tuple(tensors)
        self._aliases = tuple(t.detach() for t in self.tensors)
        self.state = self.read()

    def read(self) -> tuple:
        return tuple(map(_VERSION_AND_FLAG, self.tensors)), tuple(map(_DATA_PTR, self.tensors))

    def is_current(self) -> bool:
        return self.read() == self.state


def watch_tensors(tensors: Sequence[torch.Tensor]):
    """What the counter cannot see of `tensors`, recorded now; `.is_current()` is False once any changed (as
    TensorState). Checked before every fused call: where the extension loads, in one C++ call
    (resnet_fused._C.TensorWatch, about 1 us for a bottleneck's ~20 tensors instead of ~30 us of Python attribute
    reads). Raises RuntimeError for inference tensors."""
    if _extension.load() is None:
        from .. import _C

        if hasattr(_C, "TensorWatch"):  # else an extension built before it had one
            return _C.TensorWatch(list(tensors))
    return TensorState(tensors)


class AttrState:
    """What the counter cannot see of some modules' attributes (`names[i]` of `modules[i]`, e.g. a conv's padding
    set after a call): their values, compared with ==."""

    __slots__ = ("getters", "modules", "state")

    def __init__(self, modules: Sequence, names: Sequence[Sequence[str]]):
        self.modules = tuple(modules)
        self.getters = tuple(attrgetter(*n) for n in names)
        self.state = self.read()

    def read(self) -> tuple:
        return tuple(get(m) for get, m in zip(self.getters, self.modules))

    def is_current(self) -> bool:
        try:
            return self.read() == self.state
        except AttributeError:  # an attribute deleted since
            return False


def watch_attrs(modules: Sequence, names: Sequence[Sequence[str]]):
    """What the counter cannot see of the modules' attributes, recorded now (as AttrState): where the extension
    loads, one C++ call (resnet_fused._C.AttrWatch, which FusedSequential's layer programs check too)."""
    if _extension.load() is None:
        from .. import _C

        if hasattr(_C, "AttrWatch"):
            return _C.AttrWatch(list(modules), [list(n) for n in names])
    return AttrState(modules, names)
