"""A fused model whose own forward is a plain chain of its children, run as one C++ call.

torchvision's ResNet forward is such a chain: y = fc(flatten(avgpool(layer4(... maxpool(relu(bn1(conv1(x)))))))).
Between two of its stages the interpreter ran about 0.25 ms per inference call on the "cpu" backend (Python with the
caches the convolutions had just evicted: the stage's checks, nn.Module.__call__, the next stage's entry), some
1.2 ms of a 48 ms resnet50 forward at batch 1 on 2 cores of an AMD EPYC (Zen 3).

fuse_model proves the chain with torch.fx (fusion/analysis.plain_chain, in train and eval mode; a child whose own
forward is such a chain counts as its steps, as timm's pooling module: pool, then flatten) and gives the model
`chained_class(type(model))`: a subclass of its own class (isinstance holds, the name and state_dict are the same;
pickles and copies come back as it) whose forward, for an inference call on a plain tensor, replays the chain as one
_C.ChainProgram made from what the steps' own forwards bound: the fused conv's bound call, each FusedSequential's
layer program, the edges' kernels (edges.py), identities skipped, flattens. The program is made on the first such
call per input signature (shape, strides, dtype, grad mode, autocast, default backend) and used while nothing it was
made from changed: the change counter (fusion/changes.py), the children the chain calls, their forwards, backends and
attributes, the tensors they read, and the plain attributes of the forwards the proof was made on (one changed, a
flag the forward branches on, and the model's own forward runs). A step that binds no C++ call (another backend,
hooks, a module of another kind) leaves the model's own forward running, as does any other call (autograd,
torch.compile, a Tensor subclass). As with fused blocks, what torch.fx cannot see of a forward (Python side effects
such as a call counter) is not replayed.
"""

from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
from torch import nn

from . import _extension
from .blocks import _BINDINGS, _LAYER_RUN, FusedConvBNAct, FusedSequential, _Absorbed
from .edges import _Edge
from .fusion import changes
from .fusion.binding import NotCarried, signature
from .fusion.eligibility import call_override_reason, global_module_hooks, has_hooks
from .fusion.plan import ChainStep

__all__ = ["ChainedModel", "chained_class", "make_chained", "replayed_kind"]

_CHAIN_STEPS = "_chain_steps"  # the proven steps, a tuple of ChainStep (pickled with the model)
_CHAIN_RUN = "_chain_run"      # the ChainRun of the last input signature (never pickled or copied)
# {container path ("" the model): its plain attributes when the chain was proven}: a forward may branch on them
_CHAIN_PROOF = "_chain_proof"
_MODULE_STATE = frozenset(nn.Module().__dict__) | {"forward", _CHAIN_STEPS, _CHAIN_RUN, _CHAIN_PROOF}
_FUSED_CONV_ATTRS = ("forward", "backend", "fused_relu", "absorbed_bn")
_SKIPPED = object()  # a step whose forward is the identity


class ChainRun(NotCarried):
    """The chain as one _C.ChainProgram (None: it does not replay) for inputs of `key` while the change counter
    reads `epoch`. Copies and pickles carry none."""

    __slots__ = ("epoch", "key", "program")

    def __init__(self, epoch, key, program):
        self.epoch, self.key, self.program = epoch, key, program


def _key(x: torch.Tensor) -> tuple:
    # strides too: the edges' kernels and the programs' layouts follow the input's
    return signature(x, "auto"), x.stride()


class ChainedModel:
    """Mixin of chained_class: the model's forward replayed in C++ where its chain binds (module docstring)."""

    _chained_base: type

    def forward(self, x):
        if not torch.compiler.is_compiling() and type(x) is torch.Tensor and not torch.is_grad_enabled():
            run = self.__dict__.get(_CHAIN_RUN)
            if run is not None and run.epoch == changes.epoch() and run.key == _key(x):
                if run.program is None:  # known not to replay
                    return super().forward(x)
                out = run.program(x)
                if out is not None:
                    return out
            return self._record_chain(x)
        return super().forward(x)

    def _record_chain(self, x: torch.Tensor) -> torch.Tensor:
        """The chain run step by step (what the forward computes, as fuse_model proved), its program made from what
        each step bound and kept for x's signature unless something changed meanwhile. Where the proof may no longer
        hold (a plain attribute of a forward it read changed, a container of nested steps hooked or its forward
        replaced), or a step is hooked, the model's own forward runs instead and nothing replays."""
        epoch, key, steps = changes.epoch(), _key(x), self.__dict__.get(_CHAIN_STEPS)
        proof = self.__dict__.get(_CHAIN_PROOF) or {}
        try:
            containers = {path: self.get_submodule(path) for path in proof}
            modules = [None if step.module is None else self.get_submodule(step.module) for step in steps or ()]
        except AttributeError:  # a container's child removed or replaced by a module without it
            containers, modules = None, None
        if not steps or containers is None or global_module_hooks() \
                or any(m is not None and has_hooks(m) for m in modules) \
                or any(path and (has_hooks(c) or call_override_reason(c)) for path, c in containers.items()) \
                or any(not _same_attributes(_plain_attributes(c), proof[path]) for path, c in containers.items()):
            return super().forward(x)  # asked again at the next call: hooks go, attributes change back
        bound, out = [], x
        for step, module in zip(steps, modules):
            if module is None:
                out = out.flatten(*step.flatten)
                bound.append((step.flatten, []))
            else:
                before, out = out, module(out)
                bound.append(_bound_step(module, before))
        program = None
        if all(b is not None for b in bound):
            children = _children_called(steps)
            watches = [changes.watch_attrs([c], [children.get(path, ()) + tuple(proof[path])])
                       for path, c in containers.items()]
            program = _program([native for native, _ in bound if native is not _SKIPPED],
                               watches + [w for _, ws in bound for w in ws])
        if epoch == changes.epoch():
            self.__dict__[_CHAIN_RUN] = ChainRun(epoch, key, program)
        return out

    def train(self, mode: bool = True):
        self.__dict__.pop(_CHAIN_RUN, None)  # its program holds the blocks' packs, which train mode drops
        return super().train(mode)

    def _apply(self, *args, **kwargs):
        self.__dict__.pop(_CHAIN_RUN, None)
        return super()._apply(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # pickled and copied as the base class's object made chained again: the class itself is made at run time
        getstate = getattr(self, "__getstate__", None)  # object has one from Python 3.11 on
        return _new_chained, (self._chained_base,), self.__dict__ if getstate is None else getstate()


def _plain_attributes(module: nn.Module) -> dict:
    """The attributes a forward may branch on: the instance's own, but nn.Module's state (registries, hooks, the
    training flag, which the proof covers both ways) and the chain's."""
    return {k: v for k, v in module.__dict__.items() if k not in _MODULE_STATE}


def _same_attributes(now: dict, then: dict) -> bool:
    if now.keys() != then.keys():
        return False
    for key, value in now.items():
        old = then[key]
        if value is old:
            continue
        try:
            if type(value) is not type(old) or isinstance(value, torch.Tensor) or not bool(value == old):
                return False
        except Exception:  # no plain equality: taken as changed
            return False
    return True


def _children_called(steps) -> dict:
    """{container path: the names of its children the steps call or reach into}."""
    children: dict = {}
    for step in steps:
        if step.module is None:
            continue
        parts = step.module.split(".")
        for depth in range(len(parts)):
            names = children.setdefault(".".join(parts[:depth]), ())
            if parts[depth] not in names:
                children[".".join(parts[:depth])] = names + (parts[depth],)
    return children


def _program(natives, watches):
    """The steps as a _C.ChainProgram, or None where the extension has none (not built, or built before it)."""
    if _extension.load() is not None:
        return None
    from . import _C

    if not hasattr(_C, "ChainProgram") or not all(isinstance(w, (_C.TensorWatch, _C.AttrWatch)) for w in watches):
        return None
    return _C.ChainProgram(natives, watches)


def _bound_step(module: nn.Module, x: torch.Tensor) -> Optional[tuple]:
    """(what the step replays as: a BoundCall, a LayerProgram or _SKIPPED, the watches it needs besides the change
    counter) for `module` just called on x; None where its call binds none, or runs another forward than its class's
    (its bound runs would be left over from before)."""
    if call_override_reason(module) is not None:
        return None
    watch_forward = changes.watch_attrs([module], [("forward",)])
    if isinstance(module, FusedSequential):
        run = module.__dict__.get(_LAYER_RUN)
        if run is None or run.program is None or run.epoch != changes.epoch() \
                or run.key != signature(x, run.backend):
            return None
        return run.program, [watch_forward]  # the program checks its blocks' watches
    if isinstance(module, FusedConvBNAct):
        bindings = module.__dict__.get(_BINDINGS)
        step = None if bindings is None or not bindings.is_current() \
            else bindings.runs.get(signature(x, module.backend))
        native = getattr(step, "native", None)
        if native is None:
            return None
        return native[0], [bindings.tensors, bindings.attrs,
                           changes.watch_attrs([module], [_FUSED_CONV_ATTRS])]
    if isinstance(module, _Edge):
        bound = module.bound_call(x)
        if bound is None:
            return None
        call, tensors = bound
        watches = [changes.watch_attrs([module], [module.watched_attrs])]
        return call, watches + ([changes.watch_tensors(tensors)] if tensors else [])
    if isinstance(module, _Absorbed) or type(module) is nn.Identity:
        return _SKIPPED, [watch_forward]
    if type(module) is nn.Dropout:  # in eval, F.dropout returns its input
        watch = changes.watch_attrs([module], [("forward", "training")])
        return None if module.training else (_SKIPPED, [watch])
    if type(module) is nn.ReLU:  # F.relu's op, in place where the module is
        bound = _extension.bound_call("aten::relu_" if module.inplace else "aten::relu", "", (torch.empty(0),))
        return None if bound is None else (bound, [changes.watch_attrs([module], [("forward", "inplace")])])
    if type(module) is nn.Flatten:
        watch = changes.watch_attrs([module], [("forward", "start_dim", "end_dim")])
        return (module.start_dim, module.end_dim), [watch]
    return None


_CLASSES: dict = {}


def chained_class(base: type) -> type:
    """`base` with ChainedModel's forward (one class per base)."""
    if issubclass(base, ChainedModel):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (ChainedModel, base), {"_chained_base": base, "__module__": __name__,
                                                         "__doc__": base.__doc__})
        _CLASSES[base] = cls
    return cls


# what _bound_step binds (nn.Dropout in eval only): these classes and their subclasses, those torch classes exactly
_REPLAYED_KINDS = (FusedSequential, FusedConvBNAct, _Edge, _Absorbed)
_REPLAYED_TORCH_CLASSES = (nn.Identity, nn.Flatten, nn.ReLU, nn.Dropout)


def replayed_kind(module: nn.Module) -> bool:
    """Whether a chain step of this module binds a C++ call where it runs the extension's kernels."""
    return isinstance(module, _REPLAYED_KINDS) or type(module) in _REPLAYED_TORCH_CLASSES


def make_chained(model: nn.Module, steps: Tuple[ChainStep, ...]) -> bool:
    """Give `model` (whose forward fuse_model proved to be `steps`, a dotted name a step of a child's proven chain)
    chained_class(type(model)) in place; False where a step's module is of a kind that binds no C++ call, or its
    class cannot take ChainedModel's forward(self, x): another signature, or a class that refuses subclassing."""
    if not all(step.module is None or replayed_kind(model.get_submodule(step.module)) for step in steps):
        return False
    base = type(model)
    if isinstance(model, ChainedModel):
        base = model._chained_base
    try:
        parameters = list(inspect.signature(base.forward).parameters.values())
        cls = chained_class(base)
    except (TypeError, ValueError):
        return False
    if [(p.name, p.kind, p.default) for p in parameters] != [
            (name, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty) for name in ("self", "x")]:
        return False
    containers = list(_children_called(steps))
    model.__class__ = cls
    model.__dict__[_CHAIN_STEPS] = tuple(steps)
    model.__dict__[_CHAIN_PROOF] = {path: _plain_attributes(model.get_submodule(path)) for path in containers}
    model.__dict__.pop(_CHAIN_RUN, None)
    return True


def _new_chained(base: type):
    return object.__new__(chained_class(base))


def chain_description(steps: Tuple[ChainStep, ...]) -> str:
    return " -> ".join(step.describe() for step in steps)
