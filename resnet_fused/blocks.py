"""Fused residual blocks and the fused conv-BN(-ReLU) module, drop-in for their eager counterparts.

Every fused module computes what its eager original computes, with the same submodules, parameters, buffers
and state_dict keys; only the execution differs (fusion/unit.py has the math of one unit):

    FusedBottleneck   relu( bn3(conv3( relu(bn2(conv2( relu(bn1(conv1(x))) ))) )) + shortcut(x) )
                      eval: conv_bn_act(conv1, relu) -> conv_bn_act(conv2, relu) -> [downsample: conv_bn_act]
                            -> conv_bn_act(conv3, residual, relu): three or four op calls
    FusedBasicBlock   relu( bn2(conv2( relu(bn1(conv1(x))) )) + shortcut(x) )
    FusedResidualBlock  any block whose forward torch.fx proved to be such a chain (fuse_model builds these)
    FusedConvBNAct    an nn.Conv2d that also applies the BatchNorm absorbed from the module after it (+ ReLU);
                      the BN stays registered where it was, as an AbsorbedBatchNorm2d whose forward is the identity
                      (and a fused ReLU as an AbsorbedReLU)

Eval folds BN into a per-channel scale/shift and packs the weight once. What a forward decides (the folds and
packs, which backend call runs each unit) is kept and replayed while nothing it depends on changed (a parameter
or buffer changed in place, an optimizer step, load_state_dict, .to(), a tensor assigned through `.data`,
.train()/.eval(), hooks, registrations: fusion/binding.py). Train uses batch statistics and updates the running
statistics exactly as eager does.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .fusion import changes
from .fusion.binding import (Bindings, LayerRun, compose, eager_units, execute, fused_units, layer_program,
                             signature, train_forward)
from .fusion.eligibility import (call_override_reason, global_module_hooks, has_hooks, plain_bn_reason,
                                 plain_conv_reason)
from .fusion.plan import ModuleShortcut, ResidualPlan, Unit
from .fusion.unit import decide
from .models.resnet import BasicBlock, Bottleneck
from .ops.cpu_cache import block_cached
from .ops.donation import donating
from .ops.registry import _check_name

__all__ = ["FusedBottleneck", "FusedBasicBlock", "FusedResidualBlock", "FusedConvBNAct", "AbsorbedBatchNorm2d",
           "AbsorbedReLU", "FusedSequential"]

_BINDINGS = "_bindings"


def _warn_uncacheable() -> None:
    # one message from one place: Python's default filter shows it once, not once per conv
    warnings.warn(
        "a fused module's parameters or buffers are inference tensors (made under torch.inference_mode), which "
        "carry no version counter, so its BatchNorm fold and weight pack are rebuilt on every call; build the "
        "model (or call rf.fuse_model, which copies it) outside torch.inference_mode to cache them",
        RuntimeWarning, stacklevel=3)


class _Bound:
    """Mixin: the module's forward decided once per change of its modules and per input signature, and replayed
    (fusion/binding.py). The decisions never pickle, copy or go stale."""

    backend: str = "auto"

    def _units(self) -> list:
        """(conv, bn or None) of every unit the forward fuses."""
        raise NotImplementedError

    def _current_bindings(self) -> Optional[Bindings]:
        """The module's Bindings, made anew if anything changed; None where its tensors are inference tensors."""
        bindings = self.__dict__.get(_BINDINGS)
        if bindings is not None and bindings.is_current():
            return bindings
        units = self._units()
        try:
            bindings = Bindings([conv for conv, _ in units], [bn for _, bn in units])
        except RuntimeError:  # inference tensors: no version counter to trust
            self.__dict__.pop(_BINDINGS, None)
            _warn_uncacheable()
            return None
        self.__dict__[_BINDINGS] = bindings
        return bindings

    def clear_fold_cache(self) -> None:
        """Drop the cached folds, packs and bound calls: the next forward re-reads the weights. Needed only after
        edits that bypass PyTorch's version counters (in place through `.data`); `.train()` and `.eval()` call it
        too."""
        self.__dict__.pop(_BINDINGS, None)
        changes.bump()  # a FusedSequential's layer program holds the same packs

    def train(self, mode: bool = True):
        self.clear_fold_cache()
        return super().train(mode)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop(_BINDINGS, None)
        return state

    def _apply(self, *args, **kwargs):
        self.clear_fold_cache()  # the bindings would be stale anyway; this frees the old device's packs now
        return super()._apply(*args, **kwargs)


def _copy_module_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Make `new` hold exactly `old`'s submodules, parameters, buffers, hooks and attributes (shared tensors)."""
    state = dict(old.__dict__)
    state.pop(_BINDINGS, None)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in state:
            state[key] = state[key].copy()
    new.__dict__.update(state)
    return new


# ---------------------------------------------------------------------------------------------- plans


def _is_identity_module(module) -> bool:
    return module is None or type(module) is nn.Identity or (type(module) is nn.Sequential and len(module) == 0)


def downsample_shortcut(block: nn.Module, name: str = "downsample", after: int = 0):
    """The plan of torchvision's `downsample`: identity, conv1x1+BN as a fused unit, anything else as is (run
    after the first `after` main units: torchvision's forward calls it after the main branch)."""
    module = getattr(block, name, None)
    if _is_identity_module(module) and (module is None or call_override_reason(module) is None):
        return None
    if (type(module) is nn.Sequential and len(module) == 2 and plain_conv_reason(module[0]) is None
            and plain_bn_reason(module[1]) is None and not has_hooks(module) and call_override_reason(module) is None):
        return (Unit(f"{name}.0", f"{name}.1", False),)
    return ModuleShortcut(name, after)


_BOTTLENECK_MAIN = (Unit("conv1", "bn1", True), Unit("conv2", "bn2", True), Unit("conv3", "bn3", False))
_BASIC_MAIN = (Unit("conv1", "bn1", True), Unit("conv2", "bn2", False))


class _FusedResidual(_Bound):
    def residual_plan(self) -> ResidualPlan:
        raise NotImplementedError

    def _units(self) -> list:
        plan = self.residual_plan()
        units = plan.main + (plan.shortcut if isinstance(plan.shortcut, tuple) else ())
        return [(self.get_submodule(u.conv), self.get_submodule(u.bn) if u.bn else None) for u in units]

    @block_cached  # its activations from the CPU block cache (ops/cpu_cache.py): no page faults after the first call
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            bindings = self.__dict__.get(_BINDINGS)
            if bindings is not None and bindings.is_current():
                run = bindings.runs.get(signature(x, self.backend))
                if run is not None:
                    return run(x)
        return self._decide_and_run(x)

    def _decide_and_run(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.residual_plan()
        if torch.compiler.is_compiling():  # fold on every call, so that the computation traces
            return execute(self, plan, x, fused_units(self.backend, None))
        if self.modules_changed():
            return self.changed_forward(x)
        if global_module_hooks():  # hooks for all modules must see the original modules' calls
            return self.eager_forward(x)
        bindings = self._current_bindings()
        key = signature(x, self.backend)
        train = train_forward(self, plan, x, self.backend)
        if train is not None:
            if bindings is not None:
                bindings.runs[key] = train
            return train(x)
        choose = fused_units(self.backend, {} if bindings is None else bindings.packs)
        record = []
        out = execute(self, plan, x, choose, record)
        if bindings is not None and all(replayable for _, replayable in record):
            bindings.runs[key] = compose(self, plan, [step for step, _ in record], choose)
        return out

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plan with each conv and BN module called (not fused); its ReLU modules are not called."""
        return execute(self, self.residual_plan(), x, eager_units)

    def structure(self) -> tuple:
        raise NotImplementedError

    def modules_changed(self) -> bool:
        """Whether modules the plan does not call (ReLU modules, containers of its units) were added, removed,
        replaced or hooked since the block was fused: the plan, which applies its own ReLUs, would skip them."""
        fused_as = self.__dict__.get("_structure")  # absent in blocks pickled before it was recorded
        return fused_as is not None and self.structure() != fused_as

    def changed_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"modules of this fused block other than its convs and BatchNorms were added, removed, replaced or "
            f"hooked after it was fused, so its plan {self.residual_plan().describe()} no longer computes what the "
            f"block's forward would (e.g. a ReLU module replaced, or a module added to its shortcut): change "
            f"modules before fuse_model, not after")

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, plan={self.residual_plan().describe()}"


class _FusedReference(_FusedResidual):
    _main: tuple = ()
    _reference: type = nn.Module
    _required: tuple = ()
    _reference_name = ""

    def residual_plan(self) -> ResidualPlan:
        return ResidualPlan(self._main, downsample_shortcut(self, after=len(self._main) - 1))

    def structure(self) -> tuple:
        return _structure(self, self._main, ("downsample",))  # the plan follows `downsample` at every call

    def modules_changed(self) -> bool:
        relu = self._modules.get("relu")  # from_block does not check it
        return super().modules_changed() or (relu is not None and type(relu) is not nn.ReLU)

    def changed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if "relu" in self._modules:  # the reference layout: its forward, module by module, is the block's
            return self.eager_forward(x)
        return super().changed_forward(x)

    def eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if "relu" not in self._modules:  # fused from another layout (timm's act1, act2): the plan, module by module
            return super().eager_forward(x)
        return self._reference.forward(self, x)

    def _check_shortcut_fits(self, inplanes: int, planes: int, stride: int, downsample) -> None:
        """Without a downsample the block adds its input to its output: that needs the same shape. A model built for
        blocks that make their own shortcut from (in_planes, planes, stride) passes no downsample, and would
        otherwise fail in forward with a shape error."""
        out = planes * self.expansion
        if downsample is None and (stride != 1 or inplanes != out):
            name = type(self).__name__
            raise ValueError(
                f"{name}(inplanes={inplanes}, planes={planes}, stride={stride}) needs a downsample: without one its "
                f"shortcut adds the input ({inplanes} channels, full size) to the output ({out} channels, stride "
                f"{stride}). {name} takes torchvision's {self._reference_name} arguments (inplanes, planes, stride, "
                f"downsample, ...), the model passing downsample=conv1x1+BatchNorm where the shapes differ; for a "
                f"model whose blocks build their own shortcut, build it eager and fuse it with rf.fuse_model")

    @classmethod
    def from_block(cls, block: nn.Module, backend: str = "auto"):
        """A fused block SHARING `block`'s submodules, parameters and buffers (the same tensors)."""
        if not isinstance(block, nn.Module):
            raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")
        missing = [n for n in cls._required if not isinstance(getattr(block, n, None), nn.Module)]
        if missing or not hasattr(block, "downsample"):
            raise TypeError(f"block must have submodules {', '.join(cls._required)} and a `downsample` attribute "
                            f"like torchvision's {cls._reference_name}; "
                            f"{type(block).__name__} lacks {', '.join(missing) or 'downsample'}")
        new = cls.__new__(cls)
        _copy_module_state(new, block)
        new.backend = _check_name(backend)
        new._structure = new.structure()
        return new


class FusedBottleneck(_FusedReference, Bottleneck):
    """Drop-in for Bottleneck (same constructor plus `backend`, same keys); eval runs 3-4 fused op calls."""

    _main = _BOTTLENECK_MAIN
    _required = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    _reference_name = "Bottleneck"
    _reference = Bottleneck  # its forward: the module-by-module path

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None, *,
                 backend: str = "auto") -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self._check_shortcut_fits(inplanes, planes, stride, downsample)
        self.backend = _check_name(backend)
        self._structure = self.structure()


class FusedBasicBlock(_FusedReference, BasicBlock):
    """Drop-in for BasicBlock (same constructor plus `backend`, same keys); eval runs 2-3 fused op calls."""

    _main = _BASIC_MAIN
    _required = ("conv1", "bn1", "conv2", "bn2")
    _reference_name = "BasicBlock"
    _reference = BasicBlock

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None, *,
                 backend: str = "auto") -> None:
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer)
        self._check_shortcut_fits(inplanes, planes, stride, downsample)
        self.backend = _check_name(backend)
        self._structure = self.structure()


def _structure(block: nn.Module, units, hidden=()) -> tuple:
    """What a fused block's plan assumed of it, beyond the units it runs by name: every other module's name, type
    and whether it has hooks (the ReLU modules the plan stands in for, the containers of the units). A unit's conv
    or BN may be replaced or wrapped (unit.decide runs anything else eagerly), a shortcut run as is (`hidden`) may
    change freely."""
    hidden = {name for unit in units for name in (unit.conv, unit.bn) if name} | set(hidden)
    found = []

    def walk(module: nn.Module, prefix: str) -> None:  # named_modules() without its memo: 3x faster, on every call
        for name, child in module._modules.items():
            path = prefix + name
            if child is not None and path not in hidden:
                found.append((path, type(child), has_hooks(child)))
                walk(child, path + ".")

    walk(block, "")
    return tuple(found)


class FusedResidualBlock(_FusedResidual, nn.Module):
    """Any residual block whose dataflow is `plan` (proved by fuse_model), keeping the block's own submodules."""

    def __init__(self, plan: ResidualPlan, modules: dict, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(plan, ResidualPlan):
            raise TypeError(f"plan must be a ResidualPlan, got {type(plan).__name__}")
        for name, module in modules.items():
            self.add_module(name, module)
        self.plan = plan
        self.backend = _check_name(backend)
        self.original_class = None
        self._structure = self.structure()

    @classmethod
    def from_block(cls, block: nn.Module, plan: ResidualPlan, backend: str = "auto") -> "FusedResidualBlock":
        new = cls.__new__(cls)
        _copy_module_state(new, block)
        new.plan = plan
        new.backend = _check_name(backend)
        new.original_class = f"{type(block).__module__}.{type(block).__qualname__}"
        new._structure = new.structure()
        return new

    def residual_plan(self) -> ResidualPlan:
        return self.plan

    def structure(self) -> tuple:
        units = self.plan.main + (self.plan.shortcut if isinstance(self.plan.shortcut, tuple) else ())
        shortcut = self.plan.shortcut
        return _structure(self, units, (shortcut.name,) if isinstance(shortcut, ModuleShortcut) else ())


# ---------------------------------------------------------------------------------------------- chains


class _Absorbed:
    """A module whose computation the preceding FusedConvBNAct applies: its forward is the identity. It keeps its
    class's type, parameters, buffers and state_dict keys where the original module was."""

    @classmethod
    def absorb(cls, module: nn.Module):
        return _copy_module_state(cls.__new__(cls), module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        own = super().extra_repr()
        return (own + ", " if own else "") + "absorbed into the preceding FusedConvBNAct"


class AbsorbedBatchNorm2d(_Absorbed, nn.BatchNorm2d):
    """A BatchNorm2d whose normalization the preceding FusedConvBNAct applies. Train/eval and .to() reach it as
    before, and the fused conv updates its running statistics in training."""

    _absorbed_bn = True


class AbsorbedReLU(_Absorbed, nn.ReLU):
    """A ReLU that the preceding FusedConvBNAct applies. It stays an nn.ReLU so that code looking for ReLU modules
    after fusing (swapping activations, hooking every ReLU) finds it, and fuse_model's check then says that such a
    change comes after the ReLU was absorbed."""

    _absorbed_relu = True


class FusedConvBNAct(_Bound, nn.Conv2d):
    """relu?(bn(conv(x))) as one fused op: an nn.Conv2d (same parameters and keys) that also applies the
    AbsorbedBatchNorm2d registered after it (held here by reference, not as a submodule, so keys do not move)."""

    _fused_conv = True

    @classmethod
    def absorb(cls, conv: nn.Conv2d, bn: Optional[AbsorbedBatchNorm2d], relu: bool,
               backend: str = "auto") -> "FusedConvBNAct":
        if bn is not None and not isinstance(bn, AbsorbedBatchNorm2d):
            raise TypeError(f"bn must be an AbsorbedBatchNorm2d (see AbsorbedBatchNorm2d.absorb), "
                            f"got {type(bn).__name__}")
        new = _copy_module_state(cls.__new__(cls), conv)
        new.__dict__["absorbed_bn"] = bn  # a plain reference: registering it would duplicate its state_dict keys
        new.fused_relu = bool(relu)
        new.backend = _check_name(backend)
        return new

    def _units(self) -> list:
        return [(self, self.absorbed_bn)]

    @block_cached
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            bindings = self.__dict__.get(_BINDINGS)
            if bindings is not None and bindings.is_current():
                step = bindings.runs.get(signature(x, self.backend))
                if step is not None:
                    return step(x, None)
        return self._decide_and_run(x)

    def _decide_and_run(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        bindings = None if compiling else self._current_bindings()
        packs = None if compiling else {} if bindings is None else bindings.packs
        key = None if compiling else signature(x, self.backend)
        step, replayable = decide(self, self.absorbed_bn, x, None, self.fused_relu, self.backend, False, packs, "conv")
        if bindings is not None and replayable:
            bindings.runs[key] = step
        return step(x, None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bn={'absorbed' if self.absorbed_bn is not None else None}, " \
                                      f"relu={self.fused_relu}, backend={self.backend!r}"


class FusedSequential(nn.Sequential):
    """An nn.Sequential of fused blocks (fuse_model makes one of each plain nn.Sequential that holds two fused blocks
    or more, by class: same children, same keys): without autograd, each fused block's output, which only the next
    block reads, is donated to that block (ops/donation.py), so its last unit may write into it in place of a fresh
    buffer. A block with hooks, whose hooks could keep its input or output, gets and gives nothing. Otherwise the
    forward of nn.Sequential.

    Where every child is such a block whose bound forward is a C++ BlockProgram (the cpu backend's eval kernels), the
    blocks run as one C++ call (fusion/binding.py's LayerRun) while the change counter, the input's signature and the
    blocks' tensors and module attributes stay as they were: the interpreter no longer runs between two blocks."""

    def forward(self, input):
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or global_module_hooks():
            return super().forward(input)
        layer = self.__dict__.get(_LAYER_RUN)
        if (layer is not None and type(input) is torch.Tensor and layer.epoch == changes.epoch()
                and layer.key == signature(input, layer.backend)):  # (a Tensor subclass: see binding.compose)
            if layer.program is None:  # known not to replay (another backend's calls): nothing to record
                return self._run_blocks(input, None)
            out = layer.program(input)
            if out is not None:
                return out
        return self._run_blocks(input, [])

    def _run_blocks(self, input, inputs):
        """The blocks one by one; with `inputs` (a list), each fused block's input signature recorded there and the
        stage's LayerRun made anew from them."""
        epoch, blocks, first = changes.epoch(), [], input
        owned = False  # input: a fused block's output that nothing else holds
        for module in self:
            fused = isinstance(module, _FusedResidual) and not has_hooks(module)
            if fused and inputs is not None:
                blocks.append(module)
                inputs.append(signature(input, module.backend))
            if owned and fused:
                with donating(input):
                    input = module(input)
            else:
                input = module(input)
            owned = fused
        if epoch != changes.epoch():  # something changed while it ran: decide again at the next call
            self.__dict__.pop(_LAYER_RUN, None)
        elif inputs is not None:
            whole = bool(blocks) and len(blocks) == len(self)
            backend = self[0].backend if whole else "auto"
            program = layer_program(blocks, inputs) if whole else None
            self.__dict__[_LAYER_RUN] = LayerRun(epoch, inputs[0] if whole else signature(first, backend), backend,
                                                 program)
        return input

    def train(self, mode: bool = True):
        self.__dict__.pop(_LAYER_RUN, None)  # the blocks drop their packs: so does the program that holds them
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        self.__dict__.pop(_LAYER_RUN, None)
        return super()._apply(*args, **kwargs)


_LAYER_RUN = "_layer_run"
