"""fuse_model: swap an existing model's residual blocks and conv-BN(-ReLU) chains for fused modules.

Blocks are recognized by structure, not by class name: torch.fx traces each module's own forward (submodules
opaque) and the swap happens only where the graph proves the fused module computes the same thing:

    residual block   out = relu(conv-BN(-ReLU) chain(x) + shortcut(x)), shortcut = x | conv-BN chain | a module
                     -> FusedBottleneck / FusedBasicBlock (torchvision layout) or FusedResidualBlock (any other)
    chain            conv -> BatchNorm2d (-> ReLU module) whose intermediate values nothing else reads
                     -> FusedConvBNAct at the conv, AbsorbedBatchNorm2d at the BN, AbsorbedReLU at the ReLU

With the "cpu" backend (or "auto"), the modules around the blocks that the extension has kernels for, of exactly
these torch classes, become their fused subclasses in place (resnet_fused.edges): nn.MaxPool2d, nn.AdaptiveAvgPool2d
to 1x1 and nn.Linear (the report's `edges`).

Everything else (SE, drop-path, attention, untraceable forwards) stays as it is, and the report says why.
Parameters and buffers are the same tensors under the same names, so state_dicts load both ways.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import nn

from .blocks import (_BASIC_MAIN, _BOTTLENECK_MAIN, AbsorbedBatchNorm2d, AbsorbedReLU, FusedBasicBlock,
                     FusedBottleneck, FusedConvBNAct, FusedResidualBlock, FusedSequential, _FusedResidual,
                     downsample_shortcut)
from .chained import chain_description, make_chained, replayed_kind
from .edges import edge_class, edge_kind
from .fusion.analysis import (_steps_of_module, ambient_context, find_chains, match_residual, module_calls_patched,
                              node_kind, plain_chain, trace_shallow)
from .fusion.bytecode import reached_descendants
from .fusion.eligibility import call_override_reason, global_module_hooks, has_hooks, kernel_unsupported_reason
from .fusion.plan import ChainStep, ModuleShortcut, ResidualPlan
from .ops.registry import _check_name

__all__ = ["fuse_model", "FuseReport", "FusedItem", "LeftItem"]


@dataclass(frozen=True)
class FusedItem:
    name: str       # qualified name in the model ("" for the model itself)
    kind: str       # "bottleneck", "basic", "residual" or "conv-bn-relu" / "conv-bn" / "conv-relu"
    detail: str


@dataclass(frozen=True)
class LeftItem:
    name: str
    module_type: str
    reason: str


@dataclass
class FuseReport:
    backend: str
    fused: List[FusedItem] = field(default_factory=list)
    left: List[LeftItem] = field(default_factory=list)
    edges: List[FusedItem] = field(default_factory=list)  # pooling and classifier modules on the extension's kernels
    chain: Optional[str] = None  # the model's forward replayed in C++ as these steps (chained.py), if it is

    @property
    def blocks(self) -> List[FusedItem]:
        return [f for f in self.fused if f.kind in ("bottleneck", "basic", "residual")]

    @property
    def chains(self) -> List[FusedItem]:
        return [f for f in self.fused if f not in self.blocks]

    def summary(self) -> str:
        kinds = Counter(f.kind for f in self.fused)
        lines = [f"fuse_model (backend={self.backend!r}): fused "
                 + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "nothing")
                 + f"; left {len(self.left)} module(s) as they were"]
        for item in self.fused:
            lines.append(f"  fused  {item.name or '<model>'} [{item.kind}] {item.detail}")
        for item in self.edges:
            lines.append(f"  edge   {item.name or '<model>'} [{item.kind}] {item.detail}")
        if self.chain:
            lines.append(f"  chain  <model> {self.chain} (one C++ call for inference on the extension's kernels)")
        for item in self.left:
            lines.append(f"  left   {item.name or '<model>'} ({item.module_type}): {item.reason}")
        return "\n".join(lines)

    __str__ = summary


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Fuser:
    def __init__(self, root: nn.Module, backend: str):
        self.backend = backend
        self.report = FuseReport(backend)
        self.occurrences = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
        self.escaped: set = set()  # modules some other module's forward calls directly
        self.held = _held_outside_modules(root)  # also referenced from a plain attribute: swapping would split them
        self.escaped |= self.held
        self.why: dict = {}        # id(conv or bn) -> why it was left unfused
        self.root_chain = None     # the root forward's steps where it is a plain chain (analysis.plain_chain)

    # ------------------------------------------------------------------------------------------ blocks

    def fused_block(self, block: nn.Module, plan: ResidualPlan):
        for kind, main, cls in (("bottleneck", _BOTTLENECK_MAIN, FusedBottleneck),
                                ("basic", _BASIC_MAIN, FusedBasicBlock)):
            if (plan.main == main and hasattr(block, "downsample")
                    and plan == ResidualPlan(main, downsample_shortcut(block, after=len(main) - 1))):
                return kind, cls.from_block(block, backend=self.backend)
        return "residual", FusedResidualBlock.from_block(block, plan, backend=self.backend)

    def describe_block(self, block: nn.Module, plan: ResidualPlan) -> str:
        notes = []
        for unit in plan.main + (plan.shortcut if isinstance(plan.shortcut, tuple) else ()):
            reason = kernel_unsupported_reason(block.get_submodule(unit.conv))
            if reason:
                notes.append(f"{unit.conv} runs as F.conv2d + fused epilogue: {reason}")
        text = plan.describe()
        return text + (f" ({'; '.join(notes)})" if notes else "")

    # ------------------------------------------------------------------------------------------ walk

    def visit(self, module: nn.Module, name: str) -> nn.Module:
        """Fuse inside `module`; return what should stand in its place (itself, or a fused block)."""
        if isinstance(module, (_FusedResidual, FusedConvBNAct)) or not module._modules:
            return module
        if isinstance(module, torch.jit.ScriptModule):  # torch.jit.script / trace: it runs its compiled code
            self.report.left.append(LeftItem(name, type(module).__name__, _SCRIPTED))
            return module
        overridden = call_override_reason(module)
        if overridden:  # fx traces type(module).forward: what a call really runs is unknown, as is what it reaches
            self.escaped |= {id(m) for m in module.modules() if m is not module}
            if _has_convs(module):
                self.report.left.append(LeftItem(name, type(module).__name__, overridden))
            self.visit_children(module, name)
            return module
        graphs, trace_error, forwarded = _trace_both_modes(module)
        self.escaped |= forwarded
        if graphs and not name:
            chains = [plain_chain(module, g) for g in graphs]
            self.root_chain = chains[0] if all(c == chains[0] for c in chains) else None
        if graphs:
            for node in (n for g in graphs for n in g.nodes):
                if node.op == "call_module" and "." in node.target:
                    self.escaped.add(id(module.get_submodule(node.target)))
            matches = [match_residual(module, g) for g in graphs]
            plan, reason = matches[0]
            if plan is not None and id(module) in self.held:
                plan, reason = None, "another module holds it as a plain attribute (it would keep the original)"
            if plan is not None and all(m[0] == plan for m in matches) and not has_hooks(module):
                kind, fused = self.fused_block(module, plan)
                self.report.fused.append(FusedItem(name, kind, self.describe_block(module, plan)))
                if isinstance(plan.shortcut, ModuleShortcut):  # fuse what can be inside the opaque shortcut
                    self.visit_children(fused.get_submodule(plan.shortcut.name), _join(name, plan.shortcut.name))
                return fused
            if any(_looks_residual(module, g) for g in graphs):
                if plan is not None:
                    reason = "forward differs between train and eval mode"
                self.report.left.append(LeftItem(name, type(module).__name__, f"not fused as a whole: {reason}"))
                for child in _opaque_calls(module, graphs):
                    sub = module.get_submodule(child)
                    self.report.left.append(LeftItem(_join(name, child), type(sub).__name__,
                                                     "not a conv, BatchNorm or ReLU: runs as is"))
            self.absorb_chains(module, graphs, name)
        else:  # no graph: what its forward reaches in its children must stay as it is
            self.escaped |= reached_descendants(module)
            if _has_convs(module):
                self.report.left.append(LeftItem(name, type(module).__name__, trace_error))
        self.visit_children(module, name)
        if type(module) is nn.Sequential and sum(isinstance(m, _FusedResidual) for m in module) >= 2:
            module.__class__ = FusedSequential  # its blocks hand their outputs on without a copy (no autograd)
        return module

    def visit_children(self, module: nn.Module, name: str) -> None:
        for child_name, child in list(module.named_children()):
            replacement = self.visit(child, _join(name, child_name))
            if replacement is not child:
                setattr(module, child_name, replacement)

    def absorb_chains(self, module: nn.Module, graphs, name: str) -> None:
        def blocker(child: str) -> Optional[str]:
            sub = module.get_submodule(child)
            what = f"{_join(name, child)} ({type(sub).__name__})"
            if self.occurrences[id(sub)] > 1:
                return f"{what} is registered in more than one place of the model"
            if id(sub) in self.escaped:
                return f"{what} is also reached other than by this forward's calls (held in a plain attribute, " \
                       f"its .forward called directly, or reached into by an untraceable parent)"
            return f"{what} has hooks" if has_hooks(sub) else None

        found = [find_chains(module, g, blocker, name) for g in graphs]
        chains = [c for c in found[0][0] if all(c in other for other, _ in found)]  # proven in every mode
        why = {k: v for _, other_why in reversed(found) for k, v in other_why.items()}
        for conv_name, reason in why.items():
            self.why[id(module.get_submodule(conv_name))] = reason
        for chain in chains:
            conv = module.get_submodule(chain.conv)
            bn = AbsorbedBatchNorm2d.absorb(module.get_submodule(chain.bn)) if chain.bn else None
            if bn is not None:
                setattr(module, chain.bn, bn)
            setattr(module, chain.conv, FusedConvBNAct.absorb(conv, bn, chain.relu is not None, self.backend))
            if bn is not None or chain.relu is not None:
                module.register_forward_pre_hook(functools.partial(_check_absorbed_bn, chain.conv, chain.bn,
                                                                   relu_name=chain.relu))
            if chain.relu is not None:
                setattr(module, chain.relu, AbsorbedReLU.absorb(module.get_submodule(chain.relu)))
            parts = [chain.conv] + ([chain.bn] if chain.bn else []) + ([chain.relu] if chain.relu else [])
            kind = "conv" + ("-bn" if chain.bn else "") + ("-relu" if chain.relu else "")
            unsupported = kernel_unsupported_reason(conv)
            notes = [note for note in (unsupported and f"conv runs as F.conv2d: {unsupported}", chain.note) if note]
            detail = " + ".join(_join(name, p) for p in parts) + (f" ({'; '.join(notes)})" if notes else "")
            self.report.fused.append(FusedItem(_join(name, chain.conv), kind, detail))

    def swap_edges(self, root: nn.Module) -> None:
        """The pooling and classifier modules the extension has kernels for, turned into their fused classes in
        place (only the class changes; inside fused blocks there are none). Not while another thread's torch.fx
        trace patches nn.Module: then fuse_model changes nothing."""
        if self.backend not in ("auto", "cpu") or module_calls_patched():
            return
        for name, module in _named_modules_outside_fused(root):
            cls = edge_class(module)
            if cls is not None:
                module.__class__ = cls
                module.backend = self.backend
                detail = f"{type(module).__bases__[-1].__name__} runs the extension's CPU kernel for inference calls"
                self.report.edges.append(FusedItem(name, edge_kind(cls), detail))

    def chain_root(self, root: nn.Module) -> None:
        """The model made a chained_class where its forward is a proven plain chain (chained.py) and the fused modules
        may run the extension's kernels."""
        if self.root_chain is None or self.backend not in ("auto", "cpu") or module_calls_patched() \
                or isinstance(root, (nn.Sequential, _FusedResidual, FusedConvBNAct)):
            return
        steps = _nested_chain(root, self.root_chain)
        if make_chained(root, steps):
            self.report.chain = chain_description(steps)

    def list_leftovers(self, root: nn.Module) -> None:
        """Every conv and BatchNorm that runs eagerly after all, with the reason."""
        already = {item.name for item in self.report.left}
        for name, module in _named_modules_outside_fused(root):
            if name in already:
                continue
            if type(module) is nn.Conv2d or (isinstance(module, nn.modules.batchnorm._BatchNorm)
                                             and not isinstance(module, AbsorbedBatchNorm2d)):
                reason = self.why.get(id(module), "not in a conv -> BatchNorm (-> ReLU) chain that torch.fx "
                                                  "could prove (see the entries above)")
                self.report.left.append(LeftItem(name, type(module).__name__, reason))


_SCRIPTED = ("a TorchScript module (torch.jit.script / torch.jit.trace) runs its compiled code, not its Python "
             "submodules: fuse the eager model before scripting it")


def _trace_both_modes(module: nn.Module):
    """Graphs of module.forward with every module under it in training and in eval mode (a proof must hold in
    both), and with the flags as they are where they are mixed (e.g. frozen BatchNorms); or the error.

    Also the ids of modules whose .forward it calls directly. The flags are set as attributes (a forward may
    branch on a child's flag; .train() may be overridden) and restored; each trace runs under another grad
    mode and autocast state (analysis.ambient_context), so that a forward that changes them shows it."""
    modules = list(module.modules())
    saved = [m.training for m in modules]
    modes = [saved[0], not saved[0]] + ([None] if len(set(saved)) > 1 else [])  # saved[0]: module's own
    graphs, forwarded = [], set()
    try:
        for index, mode in enumerate(modes):
            for m, flag in zip(modules, saved):
                m.training = flag if mode is None else mode
            with ambient_context(flipped=index % 2 == 1):
                graph, error, called = trace_shallow(module)
            forwarded |= called
            if graph is None:
                return [], error + ("" if index == 0 else f" (with training={mode})" if mode is not None
                                   else " (with the training flags as they are)"), forwarded
            graphs.append(graph)
    finally:
        for m, flag in zip(modules, saved):
            m.training = flag
    return graphs, None, forwarded


def _nested_chain(root: nn.Module, steps, depth: int = 0) -> Tuple[ChainStep, ...]:
    """`steps` with each step whose module binds no C++ call but is itself a proven plain chain (timm's
    SelectAdaptivePool2d: pool, then flatten) replaced by its own steps, named by their dotted paths."""
    out = []
    for step in steps:
        module = None if step.module is None else root.get_submodule(step.module)
        inner = None
        if module is not None and not replayed_kind(module) and depth < 3 and not has_hooks(module) \
                and call_override_reason(module) is None and not isinstance(module, torch.jit.ScriptModule):
            graphs, _, _ = _trace_both_modes(module)
            chains = [plain_chain(module, g) for g in graphs]
            if chains and chains[0] is not None and all(c == chains[0] for c in chains):
                inner = [ChainStep(f"{step.module}.{s.module}" if s.module else None, s.flatten) for s in chains[0]]
        out += _nested_chain(root, inner, depth + 1) if inner else [step]
    return tuple(out)


def _opaque_calls(module: nn.Module, graphs) -> List[str]:
    """The submodules a forward calls that are not conv / BN / ReLU / identity: what blocks a whole-block fusion."""
    names = []
    for node in (n for g in graphs for n in g.nodes):
        if (node.op == "call_module" and node_kind(node, module) in ("module", "seq") and node.target not in names
                and not all(step.kind in ("conv", "bn", "relu", "identity")
                            for step in _steps_of_module(module.get_submodule(node.target), node.target))):
            names.append(node.target)
    return names


# (named for its first job, and kept so: fused models saved whole hold this function by name in their hooks)
def _check_absorbed_bn(conv_name: str, bn_name: Optional[str], module: nn.Module, args,
                       relu_name: Optional[str] = None) -> None:
    """Forward pre-hook of a module whose conv absorbed the BatchNorm (and/or ReLU) after it: the chain must still
    be what fuse_model left. A replaced BatchNorm (SyncBatchNorm.convert_sync_batchnorm, `model.bn1 = ...`) would
    otherwise normalize a second time, after the fused conv already did; a replaced conv (`model.conv1 = ...`) would
    drop the absorbed BatchNorm and ReLU; hooks registered afterwards on the conv, the BatchNorm or the ReLU (pruning
    a BN weight, a forward hook reading features, guided backprop's hooks on every ReLU) would run at the wrong point
    of the chain."""
    conv = module._modules.get(conv_name)
    bn = module._modules.get(bn_name) if bn_name else None
    relu = module._modules.get(relu_name) if relu_name else None
    if not isinstance(conv, FusedConvBNAct):
        absorbed = [name for name, m in ((bn_name, bn), (relu_name, relu))
                    if isinstance(m, (AbsorbedBatchNorm2d, AbsorbedReLU))]
        if absorbed:
            lost = " and ".join(map(repr, absorbed))
            raise RuntimeError(
                f"{conv_name!r} is now a {type(conv).__name__}, but fuse_model had absorbed {lost} into the fused conv "
                f"it replaced (what is left there passes its input through), so they would not be applied: replace "
                f"modules before fuse_model, not after")
        return
    if conv.absorbed_bn is not None and bn is not conv.absorbed_bn:
        raise RuntimeError(
            f"{conv_name!r} applies the BatchNorm it absorbed from {bn_name!r} when fuse_model ran, but {bn_name!r} "
            f"is now a {type(bn).__name__}: convert or replace modules (e.g. SyncBatchNorm.convert_sync_batchnorm) "
            f"before fuse_model, not after")
    if conv.fused_relu and relu_name and not isinstance(relu, AbsorbedReLU):
        raise RuntimeError(
            f"{conv_name!r} applies the ReLU it absorbed from {relu_name!r} when fuse_model ran, but {relu_name!r} is "
            f"now a {type(relu).__name__}: replace modules before fuse_model, not after")
    # Pre-hooks of the conv see and may change its input or weight as eager's do; any other hook would not.
    hooked = [conv_name] if conv._forward_hooks or conv._backward_hooks or getattr(conv, "_backward_pre_hooks", None) \
        else []
    hooked += [name for name, m in ((bn_name, bn), (relu_name, relu)) if m is not None and has_hooks(m)]
    if hooked:
        raise RuntimeError(
            f"{' and '.join(map(repr, hooked))} got hooks after fuse_model, which absorbed {bn_name or relu_name!r} "
            f"into the fused {conv_name!r}: they would see or change the wrong values (a forward hook on the conv "
            f"gets the normalized output, a BatchNorm's hooks run after the fused conv used its tensors, e.g. "
            f"torch.nn.utils.prune on its weight, and an absorbed ReLU's hooks see its output as input); register "
            f"hooks before fuse_model, which then leaves the chain as it is")


def _held_outside_modules(root: nn.Module) -> set:
    """ids of the modules that some module also holds outside _modules (a plain attribute, or in a list, tuple,
    dict or set attribute): that holder keeps calling the original object, which .train()/.eval() of the fused
    model no longer reach once it is swapped out."""
    held, seen = set(), set()

    def collect(value, depth=0):
        if isinstance(value, nn.Module):
            held.add(id(value))
        elif isinstance(value, (list, tuple, set, frozenset, dict)) and depth < 4 and id(value) not in seen:
            seen.add(id(value))
            for item in (value.values() if isinstance(value, dict) else value):
                collect(item, depth + 1)

    for m in root.modules():
        for key, value in m.__dict__.items():
            if key not in ("_modules", "_parameters", "_buffers"):
                collect(value)
    return held


def _looks_residual(module: nn.Module, graph) -> bool:
    return any(n.op in ("call_function", "call_method") and node_kind(n, module) == "add" for n in graph.nodes)


def _has_convs(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) for m in module.modules())


def _named_modules_outside_fused(root: nn.Module, prefix: str = ""):
    yield prefix, root
    if isinstance(root, _FusedResidual):
        return
    for name, child in root.named_children():
        yield from _named_modules_outside_fused(child, _join(prefix, name))


def fuse_model(model: nn.Module, backend: str = "auto", inplace: bool = False) -> Tuple[nn.Module, FuseReport]:
    """Return (model with fused blocks and chains, report). The input model is untouched unless inplace=True.

    backend: the backend the fused modules use ("auto" follows `use_backend` / `set_backend` at call time).
    The result computes what `model` computes (eval and train), with the same parameters, buffers and keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    backend = _check_name(backend)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if inplace:
        target = model
    else:  # copied outside inference mode: inference tensors carry no version counters, so no fold could be cached
        with torch.inference_mode(False):
            target = copy.deepcopy(model)
    fuser = _Fuser(target, backend)
    if global_module_hooks():  # fused modules would skip them (at run time they fall back to their modules)
        fuser.report.left.append(LeftItem("", type(target).__name__, "hooks for all modules are registered "
                                          "(torch.nn.modules.module.register_module_forward_hook and the like)"))
        return target, fuser.report
    result = fuser.visit(target, "")
    fuser.swap_edges(result)
    fuser.chain_root(result)
    fuser.list_leftovers(result)
    return result, fuser.report
