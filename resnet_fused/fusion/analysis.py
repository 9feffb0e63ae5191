"""torch.fx proofs about a module's own forward (its submodules are opaque calls, never traced into).

`trace_shallow(module)` gives the dataflow graph of `module.forward` alone. On it:
- `match_residual` proves out = relu(chain(x) + shortcut(x)) with every node accounted for, and returns the
  ResidualPlan (or the reason it is not one);
- `find_chains` lists conv -> BN (-> ReLU) runs whose intermediate values nobody else reads, so the three can
  become one fused op without changing what the forward computes.

Forwards fx cannot trace are read from their bytecode instead (bytecode.py).
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .conv_bn import call_override_reason, has_hooks, plain_bn_reason, plain_conv_reason
from .plan import ModuleShortcut, ResidualPlan, Unit

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, torch.nn.functional.relu}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


_INPLACE_ADDS = {("call_function", operator.iadd), ("call_method", "add_")}


def _context() -> tuple:
    """What fx does not record but a forward may change around its calls: grad mode and autocast."""
    autocast = tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast


@contextlib.contextmanager
def ambient_context(flipped: bool):
    """Trace under grad on + autocast off, or (flipped) grad off + autocast on: a forward that enters no_grad,
    enable_grad, autocast or autocast(enabled=False) then shows a node context that differs from its input's."""
    saved = [(d, torch.is_autocast_enabled(d)) for d in ("cpu", "cuda")]
    try:
        with torch.set_grad_enabled(not flipped):
            for device, _ in saved:
                torch.set_autocast_enabled(device, flipped)
            yield
    finally:
        for device, enabled in saved:
            torch.set_autocast_enabled(device, enabled)


def context_changes(graph: fx.Graph) -> List[fx.Node]:
    """The nodes that ran under another grad mode / autocast state than the forward was called with."""
    start = next((n for n in graph.nodes if n.op == "placeholder"), None)
    if start is None:
        return []
    return [n for n in graph.nodes if n.meta.get("rf_context") != start.meta.get("rf_context")]


class _Proxy(fx.Proxy):
    def __iadd__(self, other):  # fx.Proxy has none: Python would record `a += b` as a + b, hiding the write into a
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class _ShallowTracer(fx.Tracer):
    """fx's graph of `root.forward` alone: every registered descendant is a leaf (a call_module node); a module
    built inside forward (nn.ReLU()(x)) is traced through.

    fx's own `Tracer.trace` patches nn.Module.__call__ and __getattr__ on the class, for every thread of the
    process, for as long as it traces: a module running in another thread then meets this tracer, and two traces
    at once restore each other's patches in the wrong order. This tracer patches nothing shared: it catches the
    calls of root's descendants one instance at a time (nn.Module.__call__ runs an instance's
    `_compiled_call_impl` first, where `module.compile()` puts its compiled call), and fuse_model traces its own
    copy of the model, so no other code ever sees those instances caught. It leaves out what fx's patch adds:
    parameters read in forward are values, not proxies, and `torch.fx.wrap`/math functions are not autowrapped
    (a forward that needs either fails to trace, and is left as it is)."""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["rf_context"] = _context()  # fx records no `with torch.no_grad()` / autocast: keep the state
        return node

    def create_arg(self, a):
        # fx stores a tensor that is no attribute of root (a value computed from parameters) on root as
        # `_tensor_constant<i>`: the graph is only read here, so leave the module as it was
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and a not in self.tensor_attrs \
                and not any(a is b for b in self.root.buffers()):
            return self.create_node("get_attr", "<tensor constant>", (), {})
        return super().create_arg(a)

    def trace(self, root: nn.Module) -> fx.Graph:
        if not (nn.Module.__call__ is _MODULE_CALL and nn.Module.__getattr__ is _MODULE_GETATTR):
            raise RuntimeError(_PATCHED)
        self.root = root
        self.submodule_paths = {m: name for name, m in root.named_modules()}
        self.tensor_attrs = {}  # tensors held as plain attributes, as fx collects them: read as get_attr nodes
        for prefix, m in root.named_modules():
            for key, value in m.__dict__.items():
                if isinstance(value, torch.Tensor):
                    self.tensor_attrs[value] = f"{prefix}.{key}" if prefix else key
        self.graph = fx.Graph(tracer_cls=type(self))
        forward, args = self.create_args_for_root(type(root).forward, True, None)
        descendants = [m for m in root.modules() if m is not root]
        with _on_instances(descendants, "_compiled_call_impl", lambda m: functools.partial(self._leaf_call, m)):
            out = forward(*args)
        if not (nn.Module.__call__ is _MODULE_CALL and nn.Module.__getattr__ is _MODULE_GETATTR):
            raise RuntimeError(_PATCHED)  # patched meanwhile: the calls went elsewhere
        self.create_node("output", "output", (self.create_arg(out),), {})
        return self.graph

    def _leaf_call(self, module: nn.Module, *args, **kwargs):
        return self.call_module(module, module.forward, args, kwargs)


_ABSENT = object()
_MODULE_CALL, _MODULE_GETATTR = nn.Module.__call__, nn.Module.__getattr__
_PATCHED = ("nn.Module.__call__ or __getattr__ is patched while fusing (torch.fx.symbolic_trace running in another "
            "thread patches them for every thread)")
_REPLACEABLE = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)  # what chains swap out (exact types)


def trace_shallow(module: nn.Module) -> Tuple[Optional[fx.Graph], Optional[str], Set[int]]:
    """(graph, None, forwarded), or (None, why tracing failed, forwarded).

    forwarded: ids of descendants whose `.forward` the forward calls directly (`self.conv.forward(x)`): that
    call bypasses __call__, leaving no call_module node, so a chain would swap the module without seeing the call.
    """
    forwarded: Set[int] = set()
    wrapped = [m for m in module.modules() if m is not module and type(m) in _REPLACEABLE]
    # a leaf's call never runs its forward: any call of it comes from elsewhere
    try:
        with _on_instances(wrapped, "forward", lambda m: _recording_forward(m, m.forward, forwarded)):
            return _ShallowTracer().trace(module), None, forwarded
    except Exception as error:  # fx raises many types (TraceError, TypeError, NameError, ...): all mean "not provable"
        first_line = (str(error).strip().splitlines() or [""])[0]
        return None, f"forward is not traceable by torch.fx ({type(error).__name__}: {first_line[:120]})", forwarded


@contextlib.contextmanager
def _on_instances(modules, name: str, make):
    """Set `name` in each module's own __dict__ (shadowing its class's attribute) to make(module); then restore."""
    saved = [(m, m.__dict__.get(name, _ABSENT)) for m in modules]
    try:
        for m in modules:
            m.__dict__[name] = make(m)
        yield
    finally:
        for m, value in saved:
            if value is _ABSENT:
                m.__dict__.pop(name, None)
            else:
                m.__dict__[name] = value


def _recording_forward(module: nn.Module, forward, forwarded: Set[int]):
    def recording(*args, **kwargs):
        forwarded.add(id(module))
        return forward(*args, **kwargs)
    return recording


# ------------------------------------------------------------------------------------------- node kinds


def _module_kind(module: nn.Module) -> str:
    if has_hooks(module) or call_override_reason(module) is not None:
        return "module"
    if type(module) is nn.Identity or (type(module) is nn.Sequential and len(module) == 0) \
            or getattr(type(module), "_absorbed_relu", False):  # a ReLU a fused conv applies
        return "identity"
    if type(module) is nn.ReLU:
        return "relu"
    if plain_conv_reason(module) is None and not getattr(type(module), "_fused_conv", False):
        return "conv"
    if plain_bn_reason(module) is None and not getattr(type(module), "_absorbed_bn", False):
        return "bn"
    if type(module) is nn.Sequential:
        return "seq"
    return "module"


def _only_tensor_arg(node: fx.Node) -> Optional[fx.Node]:
    """The node's single Node input, if it has exactly one and nothing else that could change the result."""
    if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return node.args[0] if set(node.kwargs) <= {"inplace"} else None
    return node.args[0] if not node.kwargs else None


def node_kind(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return _module_kind(root.get_submodule(node.target))
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return "relu"
        if node.target in _ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
            return "add"
    if node.op == "call_method":
        if node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs:
            return "relu"
        if node.target in _ADD_METHODS and len(node.args) == 2 and not node.kwargs:
            return "add"
    return node.op


# ------------------------------------------------------------------------------------------- residual blocks


@dataclass(frozen=True)
class _Step:
    kind: str  # conv, bn, relu, identity, module
    name: Optional[str]
    why: Optional[str] = None  # for a "module" step that could have been flattened


def _sequential_entries(module: nn.Sequential, name: str) -> List[Tuple[str, Optional[nn.Module]]]:
    """What nn.Sequential.forward calls, in order, nested plain Sequentials flattened: every entry of _modules
    (named_children() would list an instance entered twice only once)."""
    entries = []
    for child_name, child in module._modules.items():
        if child is not None and _module_kind(child) == "seq":
            entries += _sequential_entries(child, f"{name}.{child_name}")
        else:
            entries.append((f"{name}.{child_name}", child))
    return entries


def _steps_of_module(module: nn.Module, name: str) -> List[_Step]:
    kind = _module_kind(module)
    if kind != "seq":
        return [_Step(kind, name)]
    entries = _sequential_entries(module, name)
    ids = Counter(id(child) for _, child in entries)
    if any(child is None for _, child in entries) or any(n > 1 for n in ids.values()):
        return [_Step("module", name, "an nn.Sequential that calls one module instance twice")]
    return [_Step(_module_kind(child), child_name) for child_name, child in entries]


def _linear_path(end: fx.Node, start: fx.Node) -> Optional[List[fx.Node]]:
    """Nodes from just after `start` to `end`, each feeding only the next; None if not such a chain."""
    path = []
    node = end
    while node is not start:
        previous = _only_tensor_arg(node) if node.op != "placeholder" else None
        if previous is None:
            return None
        path.append(node)
        node = previous
    path.reverse()
    for node, following in zip(path, path[1:]):
        if list(node.users) != [following]:
            return None
    return path


def _steps(path: List[fx.Node], root: nn.Module) -> List[_Step]:
    steps = []
    for node in path:
        if node.op == "call_module":
            steps += _steps_of_module(root.get_submodule(node.target), node.target)
        else:
            steps.append(_Step(node_kind(node, root), None))
    return steps


def _units(steps: List[_Step]) -> Tuple[Optional[Tuple[Unit, ...]], Optional[str]]:
    units, current = [], None
    for step in steps:
        if step.kind == "identity":
            continue
        if step.kind == "conv":
            if current:
                units.append(Unit(*current))
            current = [step.name, None, False]
        elif step.kind == "bn" and current is not None and current[1] is None and not current[2]:
            current[1] = step.name
        elif step.kind == "relu" and current is not None:
            current[2] = True
        else:
            what = step.name or "a function call"
            return None, f"{what} ({step.why or step.kind}) is not a conv -> BatchNorm -> ReLU step"
    if current:
        units.append(Unit(*current))
    return tuple(units), None


def _modules_of(units) -> List[str]:
    return [n for u in units for n in (u.conv, u.bn) if n]


def match_residual(module: nn.Module, graph: fx.Graph) -> Tuple[Optional[ResidualPlan], str, List[str]]:
    """(plan, "", []) if forward(x) == relu(main(x) + shortcut(x)) exactly; else (None, reason, blocking names)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(placeholders) != 1:
        return None, f"forward takes {len(placeholders)} inputs, not one", []
    x = placeholders[0]
    last = output.args[0]
    if not isinstance(last, fx.Node) or node_kind(last, module) != "relu" or _only_tensor_arg(last) is None:
        return None, "the output is not relu(...)", []
    add = last.args[0]
    if node_kind(add, module) != "add" or list(add.users) != [last]:
        return None, "the output is not relu(a + b)", []
    if not all(isinstance(a, fx.Node) for a in add.args):
        return None, "the residual add has a non-tensor operand", []
    if add.args[0] is add.args[1]:  # out + out: one branch computed once, not a main branch plus a shortcut
        return None, "both operands of the add are the same value", []
    changed = context_changes(graph)
    if changed:  # the fused block runs in its caller's grad mode / autocast state, not the one forward sets
        return None, f"forward changes grad mode or autocast (torch.no_grad, autocast, ...) around " \
                     f"{', '.join(str(n.target) for n in changed[:4])}", []
    inplace = (add.op, add.target) in _INPLACE_ADDS
    reason, blocking = "neither operand of the add is a conv-BN chain from the input", []
    for main_end, short_end in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        main_path = _linear_path(main_end, x)
        if main_path is None or not main_path or list(main_path[-1].users) != [add]:
            continue
        if inplace and add.args[0] is not main_end:
            # x += out writes into the block's input (or the shortcut's output, which may be it): the caller sees
            # that change; the fused block writes into nothing
            reason = "the in-place add writes into the shortcut's value, not into the main branch's"
            continue
        main, why = _units(_steps(main_path, module))
        if main is None:
            reason = f"main branch: {why}"
            blocking = [s.name for s in _steps(main_path, module) if s.kind in ("module",) and s.name]
            continue
        if not main or main[-1].relu:
            reason = "main branch does not end in conv(-BN) before the add"
            continue
        shortcut, short_path = _shortcut(short_end, x, add, module)
        if shortcut == "fail":
            reason = "the shortcut is not the input, a conv-BN chain or one module applied to the input"
            continue
        if set(main_path) & set(short_path):
            reason = "the main branch and the shortcut share nodes"
            continue
        used = set(main_path) | set(short_path) | {add, last, x, output}
        extra = [n for n in graph.nodes if n not in used]
        if extra:
            return None, f"forward also computes {', '.join(str(n.target) for n in extra[:4])}", \
                [str(n.target) for n in extra if n.op == "call_module"]
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        names = _modules_of(main) + (_modules_of(shortcut) if isinstance(shortcut, tuple) else [])
        roots = {name.split(".")[0] for name in names}
        if any(calls[r] > 1 for r in roots):
            return None, "a conv or BatchNorm module is called more than once", []
        ids = [id(module.get_submodule(name)) for name in names]
        if isinstance(shortcut, ModuleShortcut):
            ids += [id(m) for m in module.get_submodule(shortcut.name).modules()]
        if len(set(ids)) != len(ids):  # the fused block would change the order of its calls (BN statistics)
            return None, "a conv or BatchNorm module is used twice in the block", []
        if isinstance(shortcut, ModuleShortcut):
            shortcut, why = _ordered(shortcut, short_path[0], main_path, main, graph, module)
            if shortcut is None:
                return None, why, []
        return ResidualPlan(main, shortcut, promote=not inplace), "", []
    return None, reason, blocking


def _ordered(shortcut: ModuleShortcut, node: fx.Node, main_path, main, graph: fx.Graph, module: nn.Module):
    """The shortcut module where the fused block must run it: after the main units whose convs read the input
    before it in the forward (it may modify the input in place). The last unit needs its output first; that swap
    is exact unless the last unit itself reads the input (a one-unit main branch), which is refused."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    before = sum(step.kind == "conv" for n in main_path if order[n] < order[node] for step in _steps([n], module))
    if before >= len(main) == 1:
        return None, "the shortcut module runs after the one-unit main branch read the input (it may modify " \
                     "the input in place, and the unit's epilogue needs its output first)"
    return ModuleShortcut(shortcut.name, min(before, len(main) - 1)), ""


def _shortcut(end: fx.Node, x: fx.Node, add: fx.Node, module: nn.Module):
    if end is x:
        return None, []
    path = _linear_path(end, x)
    if path is None or list(path[-1].users) != [add]:
        return "fail", []
    steps = _steps(path, module)
    if all(s.kind == "identity" for s in steps):
        return None, path
    units, _ = _units(steps)
    if units:
        return units, path
    if len(path) == 1 and path[0].op == "call_module":
        return ModuleShortcut(path[0].target), path
    return "fail", []


# ------------------------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class Chain:
    conv: str
    bn: Optional[str]
    relu: Optional[str]  # the nn.ReLU child that becomes an AbsorbedReLU (None: no ReLU fused)


def find_chains(module: nn.Module, graph: fx.Graph, usable) -> Tuple[List[Chain], dict]:
    """conv -> BN (-> ReLU module) runs among `module`'s direct children, with each value read only by the next.

    usable(name) says whether the direct child `name` may be swapped (not shared, not called from elsewhere).
    Returns the chains and, for convs that could not be fused, the reason (by child name).
    """
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    single = lambda n: n.op == "call_module" and "." not in n.target and calls[n.target] == 1 and usable(n.target)
    chains, why = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or node_kind(node, module) != "conv":
            continue
        if type(module.get_submodule(node.target)) is not nn.Conv2d or not single(node):
            why[node.target] = "shared, called more than once or a conv subclass"
            continue
        # the fused conv runs the BN and ReLU in its own call's grad mode / autocast state: they must share it
        same_context = lambda n: n.meta.get("rf_context") == node.meta.get("rf_context")
        users = list(node.users)
        bn_node = users[0] if len(users) == 1 and users[0].op == "call_module" else None
        if bn_node is not None and not (node_kind(bn_node, module) == "bn" and single(bn_node)
                                        and _only_tensor_arg(bn_node) is node and same_context(bn_node)
                                        and type(module.get_submodule(bn_node.target)) is nn.BatchNorm2d):
            bn_node = None
        tail = bn_node or node
        relu = _following_relu(tail, module, lambda n: single(n) and same_context(n))
        if bn_node is None and relu is None:
            why[node.target] = "not followed by a BatchNorm2d or ReLU module that only it feeds"
            continue
        chains.append(Chain(node.target, bn_node.target if bn_node else None, relu))
    return chains, why


def _following_relu(node: fx.Node, module: nn.Module, single) -> Optional[str]:
    while len(node.users) == 1:
        previous, node = node, next(iter(node.users))
        if _only_tensor_arg(node) is not previous:
            return None
        kind = node_kind(node, module) if node.op == "call_module" else None
        if kind == "identity":
            continue
        if kind == "relu" and single(node):
            return node.target
        return None
    return None
