"""torch.fx proofs about a module's own forward (its submodules are opaque calls, never traced into).

`trace_shallow(module)` gives the dataflow graph of `module.forward` alone. On it:
- `match_residual` proves out = relu(chain(x) + shortcut(x)) with every node accounted for, and returns the
  ResidualPlan (or the reason it is not one);
- `find_chains` lists conv -> BN (-> ReLU) runs whose intermediate values nobody else reads, so the three can
  become one fused op without changing what the forward computes;
- `plain_chain` proves the forward is y = f_n(... f_1(x)), each f a child's call or a flatten (a model's top level).

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

from .eligibility import call_override_reason, has_hooks, plain_bn_reason, plain_conv_reason
from .plan import ChainStep, ModuleShortcut, ResidualPlan, Unit

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, torch.nn.functional.relu}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


_INPLACE_ADDS = {("call_function", operator.iadd), ("call_method", "add_")}
_CLONES = {("call_function", torch.clone), ("call_method", "clone")}


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
        if module_calls_patched():
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
        if module_calls_patched():
            raise RuntimeError(_PATCHED)  # patched meanwhile: the calls went elsewhere
        self.create_node("output", "output", (self.create_arg(out),), {})
        return self.graph

    def _leaf_call(self, module: nn.Module, *args, **kwargs):
        return self.call_module(module, module.forward, args, kwargs)


_ABSENT = object()
_MODULE_CALL, _MODULE_GETATTR = nn.Module.__call__, nn.Module.__getattr__


def module_calls_patched() -> bool:
    """Whether nn.Module.__call__ or __getattr__ is patched now (torch.fx.symbolic_trace running in another thread)."""
    return not (nn.Module.__call__ is _MODULE_CALL and nn.Module.__getattr__ is _MODULE_GETATTR)


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
    if (node.op, node.target) in _CLONES and len(node.args) == 1 and not node.kwargs:
        return "identity"  # a copy of the value: the residual and the chains read the same numbers
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
    kind: str  # conv, bn, relu, identity, module, or a node's op
    name: Optional[str]  # the module's (None: a function or method call)
    why: Optional[str] = None  # for a "module" step that could have been flattened
    label: str = ""  # how a reason names a function or method call


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
            steps.append(_Step(node_kind(node, root), None, label=describe(node, root)))
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
            what = f"{step.name} ({step.why or step.kind})" if step.name else step.label
            return None, f"{what} is not a conv -> BatchNorm -> ReLU step"
    if current:
        units.append(Unit(*current))
    return tuple(units), None


def _modules_of(units) -> List[str]:
    return [n for u in units for n in (u.conv, u.bn) if n]


def match_residual(module: nn.Module, graph: fx.Graph) -> Tuple[Optional[ResidualPlan], str]:
    """(plan, "") if forward(x) == relu(main(x) + shortcut(x)) exactly; else (None, the reason, naming the node
    that blocks it)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(placeholders) != 1:
        return None, f"forward takes {len(placeholders)} inputs, not one"
    x = placeholders[0]
    last = output.args[0]
    if not isinstance(last, fx.Node):
        return None, f"the output is a {type(last).__name__}, not relu(...) of a tensor"
    if node_kind(last, module) != "relu" or _only_tensor_arg(last) is None:
        return None, f"the output comes from {describe(last, module)}, not from a ReLU"
    add = last.args[0]
    if node_kind(add, module) != "add":
        return None, f"the final ReLU's input comes from {describe(add, module)}, not from an add"
    if list(add.users) != [last]:
        other = next(u for u in add.users if u is not last)
        return None, f"the sum before the final ReLU is also read by {describe(other, module)}"
    constants = [a for a in add.args if not isinstance(a, fx.Node)]
    if constants:
        return None, f"the residual add has an operand that is not a tensor ({constants[0]!r})"
    if add.args[0] is add.args[1]:  # out + out: one branch computed once, not a main branch plus a shortcut
        return None, f"both operands of the add are the same value ({describe(add.args[0], module)})"
    changed = context_changes(graph)
    if changed:  # the fused block runs in its caller's grad mode / autocast state, not the one forward sets
        return None, f"forward changes grad mode or autocast (torch.no_grad, autocast, ...) around " \
                     f"{', '.join(describe(n, module) for n in changed[:4])}"
    # Each operand of the add is tried as the main branch; where neither fits, the reason is the one from the
    # operand that came furthest (the one that really is the main branch).
    best = (-1, "")
    for main_end, short_end in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        found = _as_main_branch(module, graph, x, add, {x, add, last, output}, main_end, short_end)
        if isinstance(found, ResidualPlan):
            return found, ""
        best = max(best, found, key=lambda f: f[0])
    return None, best[1]


def _as_main_branch(module, graph, x, add, fixed, main_end, short_end):
    """The plan with main_end as the main branch's output, or (how far the match came, why it failed there)."""
    main_path = _linear_path(main_end, x)
    if main_path is None:
        return 0, f"main branch: {_path_break(main_end, x, module)}"
    if not main_path:
        return 0, "main branch: the add reads the input itself"
    if list(main_path[-1].users) != [add]:
        other = next(u for u in main_path[-1].users if u is not add)
        return 1, f"main branch: its output ({describe(main_end, module)}) is also read by {describe(other, module)}"
    inplace = (add.op, add.target) in _INPLACE_ADDS
    if inplace and add.args[0] is not main_end:
        # x += out writes into the block's input (or the shortcut's output, which may be it): the caller sees
        # that change; the fused block writes into nothing
        return 1, f"the in-place add writes into the shortcut's value ({describe(add.args[0], module)}), not " \
                  f"into the main branch's"
    steps = _steps(main_path, module)
    main, why = _units(steps)
    if main is None:
        return 2, f"main branch: {why}"
    if not main or main[-1].relu:
        return 3, f"main branch: it ends in {describe(main_end, module)}, not in a conv or BatchNorm before the add"
    shortcut, short_path = _shortcut(short_end, x, add, module)
    if isinstance(shortcut, str):
        return 4, f"shortcut: {shortcut}"
    shared = [n for n in main_path if n in set(short_path)]
    if shared:
        return 5, f"the main branch and the shortcut share {describe(shared[0], module)}"
    used = set(main_path) | set(short_path) | fixed
    extra = [n for n in graph.nodes if n not in used]
    if extra:
        return 6, f"forward also computes {', '.join(describe(n, module) for n in extra[:4])}"
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    names = _modules_of(main) + (_modules_of(shortcut) if isinstance(shortcut, tuple) else [])
    repeated = [r for r in dict.fromkeys(name.split(".")[0] for name in names) if calls[r] > 1]
    if repeated:
        return 6, f"a conv or BatchNorm module is called more than once ({repeated[0]})"
    modules = [(name, module.get_submodule(name)) for name in names]
    if isinstance(shortcut, ModuleShortcut):
        modules += [(f"{shortcut.name}.{n}".rstrip("."), m) for n, m in
                    module.get_submodule(shortcut.name).named_modules(remove_duplicate=False)]
    seen = {}
    for name, m in modules:  # the fused block would change the order of its calls (BN statistics)
        if id(m) in seen:
            return 6, f"a conv or BatchNorm module is used twice in the block ({seen[id(m)]} is {name})"
        seen[id(m)] = name
    if isinstance(shortcut, ModuleShortcut):
        shortcut, why = _ordered(shortcut, short_path[0], main_path, main, graph, module)
        if shortcut is None:
            return 6, why
    return ResidualPlan(main, shortcut, promote=not inplace)


def _path_break(end: fx.Node, start: fx.Node, module: nn.Module) -> str:
    """Why the values before `end` are no single chain back to `start`: the node where it breaks, named."""
    node = end
    while node is not start:
        previous = _only_tensor_arg(node) if node.op != "placeholder" else None
        if previous is None:
            others = [describe(a, module) for a in node.args[1:] if isinstance(a, fx.Node)]
            return f"{describe(node, module)} " + (f"also takes {', '.join(others)}" if others else
                                                   "takes arguments besides the value before it")
        if list(previous.users) != [node] and previous is not start:
            other = next(u for u in previous.users if u is not node)
            return f"{describe(previous, module)} is also read by {describe(other, module)}"
        node = previous
    return "it is no chain from the input"  # not reached: _linear_path found no break either


_OPERATORS = {operator.add: "+", operator.iadd: "+=", operator.sub: "-", operator.mul: "*", operator.imul: "*=",
              operator.truediv: "/", operator.matmul: "@", operator.getitem: "[]", operator.neg: "unary -"}


def describe(node, module: nn.Module, prefix: str = "") -> str:
    """A node as a reader of the forward would name it: `se (Sequential)`, `.mean()`, `torch.cat()`, `*`; modules
    by their name in the model when `module` is the model's module `prefix`."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_module":
        name = f"{prefix}.{node.target}" if prefix else node.target
        return f"{name} ({type(module.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        if node.target in _OPERATORS:
            return f"the operator {_OPERATORS[node.target]}"
        owner = getattr(node.target, "__module__", None) or "torch"
        owner = "torch" if owner.startswith("torch._") else owner
        return f"{owner}.{getattr(node.target, '__name__', node.target)}()"
    if node.op == "get_attr":
        return f"the attribute {node.target}"
    return "the forward's input" if node.op == "placeholder" else str(node.target)


def _ordered(shortcut: ModuleShortcut, node: fx.Node, main_path, main, graph: fx.Graph, module: nn.Module):
    """The shortcut module where the fused block must run it: after the main units whose convs read the input
    before it in the forward (it may modify the input in place). The last unit needs its output first; that swap
    is exact unless the last unit itself reads the input (a one-unit main branch), which is refused."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    before = sum(step.kind == "conv" for n in main_path if order[n] < order[node] for step in _steps([n], module))
    if before >= len(main) == 1:
        return None, f"the shortcut module {shortcut.name} runs after the one-unit main branch read the input (it " \
                     f"may modify the input in place, and the unit's epilogue needs its output first)"
    return ModuleShortcut(shortcut.name, min(before, len(main) - 1)), ""


def _shortcut(end: fx.Node, x: fx.Node, add: fx.Node, module: nn.Module):
    """(None for the input itself | conv-BN units | ModuleShortcut, its nodes), or (why it is none of those, [])."""
    if end is x:
        return None, []
    path = _linear_path(end, x)
    if path is None:
        return _path_break(end, x, module), []
    if list(path[-1].users) != [add]:
        other = next(u for u in path[-1].users if u is not add)
        return f"its output ({describe(end, module)}) is also read by {describe(other, module)}", []
    steps = _steps(path, module)
    if all(s.kind == "identity" for s in steps):
        return None, path
    units, why = _units(steps)
    if units:
        return units, path
    if len(path) == 1 and path[0].op == "call_module":
        return ModuleShortcut(path[0].target), path
    calls = [n for n in path if n.op == "call_module"]
    if len(calls) == 1 and all(node_kind(n, module) == "identity" for n in path if n is not calls[0]):
        # x.clone() before a module run as is: that module may write into what it gets, the fused block would
        # hand it the input itself
        copies = ", ".join(describe(n, module) for n in path if n is not calls[0])
        return f"{describe(calls[0], module)} is a module run as is, and gets a copy of the input ({copies}) " \
               f"that the fused block would not make", []
    return f"it is not the input, a conv-BN chain or one module applied to the input: {why}", []


# ------------------------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class Chain:
    conv: str
    bn: Optional[str]
    relu: Optional[str]  # the nn.ReLU child that becomes an AbsorbedReLU (None: no ReLU fused)
    note: str = ""  # why a ReLU that follows stays apart


def find_chains(module: nn.Module, graph: fx.Graph, blocker, prefix: str = "") -> Tuple[List[Chain], dict]:
    """conv -> BN (-> ReLU module) runs among `module`'s direct children, with each value read only by the next.

    blocker(name) says why the direct child `name` may not be swapped (shared, called from elsewhere, hooked), or
    None. Returns the chains and, for convs that could not be fused, the reason (by child name). Reasons name
    modules by their name in the model: `prefix` is `module`'s.
    """
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    describe_ = lambda n: describe(n, module, prefix)  # noqa: E731

    def unswappable(n: fx.Node) -> Optional[str]:
        if "." in n.target:
            return f"{describe_(n)} is called through its parent module, which stays as it is"
        if calls[n.target] > 1:
            return f"{describe_(n)} is called {calls[n.target]} times in forward"
        return blocker(n.target)

    chains, why = [], {}
    for node in graph.nodes:
        conv = module.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or getattr(type(conv), "_fused_conv", False):
            continue
        unplain = plain_conv_reason(conv) or (None if type(conv) is nn.Conv2d else "a subclass of nn.Conv2d")
        reason = unswappable(node) or (f"{describe_(node)}: {unplain}" if unplain else None)
        if reason:
            why[node.target] = reason
            continue
        # the fused conv runs the BN and ReLU in its own call's grad mode / autocast state: they must share it
        same_context = lambda n: n.meta.get("rf_context") == node.meta.get("rf_context")
        bn_node, bn_reason = _following_bn(node, module, prefix, unswappable, same_context)
        tail = bn_node or node
        relu, note = _following_relu(tail, module, prefix, lambda n: unswappable(n) or (
            None if same_context(n) else "runs under another grad mode or autocast state"))
        if bn_node is None and relu is None:
            why[node.target] = f"its output {bn_reason}" if bn_reason else \
                f"its output goes to {describe_(next(iter(node.users)))}: {note}"
            continue
        chains.append(Chain(node.target, bn_node.target if bn_node else None, relu, note))
    absorbed = {chain.bn for chain in chains}
    for node in graph.nodes:
        bn = module.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and node.target not in absorbed \
                and not getattr(type(bn), "_absorbed_bn", False):
            why[node.target] = _bn_left_reason(node, bn, why, unswappable, describe_)
    return chains, why


def _bn_left_reason(node: fx.Node, bn: nn.Module, why: dict, unswappable, describe_) -> str:
    """Why a BatchNorm stays as it is: what blocks it, or what comes before it instead of a conv it could fold into."""
    unplain = plain_bn_reason(bn)
    own = unswappable(node) or (f"{describe_(node)}: {unplain}" if unplain else None)
    if own:
        return own
    previous = _only_tensor_arg(node)
    if previous is None:
        return f"{describe_(node)} is called with more than the value it normalizes"
    if previous.op == "call_module" and previous.target in why:
        return f"it follows {describe_(previous)}, which stays unfused: {why[previous.target]}"
    return f"what it normalizes comes from {describe_(previous)}, not from a conv it could fold into"


def _following_bn(conv: fx.Node, module: nn.Module, prefix: str, unswappable, same_context):
    """(the BatchNorm2d node that alone reads the conv's output and can be absorbed, "") or (None, why not)."""
    users = list(conv.users)
    if len(users) != 1:
        return None, f"is read by {len(users)} nodes" if users else "is not used"
    user = users[0]
    bn = module.get_submodule(user.target) if user.op == "call_module" else None
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) and node_kind(user, module) != "relu":
        return None, f"goes to {describe(user, module, prefix)}, not to a BatchNorm2d or ReLU module"
    if bn is None:
        return None, ""  # a ReLU: _following_relu decides
    reason = unswappable(user) or plain_bn_reason(bn) or (
        None if type(bn) is nn.BatchNorm2d else "a subclass of nn.BatchNorm2d") or (
        None if _only_tensor_arg(user) is conv else "it is called with other arguments") or (
        None if same_context(user) else "it runs under another grad mode or autocast state")
    if reason:
        return None, f"goes to {describe(user, module, prefix)}, which cannot be absorbed: {reason}"
    return user, ""


def _following_relu(node: fx.Node, module: nn.Module, prefix: str, unswappable) -> Tuple[Optional[str], str]:
    """(the ReLU module that alone reads the node's value, through identities, "") or (None, why a ReLU that does
    stays apart: "" if none does)."""
    while len(node.users) == 1:
        previous, node = node, next(iter(node.users))
        if _only_tensor_arg(node) is not previous:
            return None, ""
        kind = node_kind(node, module)
        if kind == "identity" and node.op == "call_module":
            continue
        if kind != "relu":
            return None, ""
        if node.op != "call_module":
            return None, f"the ReLU after it, {describe(node, module)} in {type(module).__name__}.forward, runs on " \
                         f"its own: fuse_model swaps modules, it does not rewrite forward (an nn.ReLU module there " \
                         f"would be fused)"
        reason = unswappable(node)
        return (None, f"the ReLU after it stays apart: {reason}") if reason else (node.target, "")
    return None, ""


# ------------------------------------------------------------------------------------------- plain chains


def plain_chain(module: nn.Module, graph: fx.Graph) -> Optional[Tuple[ChainStep, ...]]:
    """The forward's steps where it is y = f_n(... f_1(x)) on its one input x, each f a call of a direct child on
    the previous value alone or a flatten of it with constant dims, each value read by the next step only, under one
    grad mode and autocast state, returning the last value; else None."""
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or context_changes(graph):
        return None
    steps, previous = [], nodes[0]
    for node in nodes[1:]:
        if len(previous.users) != 1 or node not in previous.users:
            return None
        if node.op == "output":
            return tuple(steps) if node.args == (previous,) and steps else None
        if node.op == "call_module" and "." not in node.target and node.args == (previous,) and not node.kwargs:
            steps.append(ChainStep(node.target))
        else:
            dims = _flatten_dims(node, previous)
            if dims is None:
                return None
            steps.append(ChainStep(None, dims))
        previous = node
    return None


def _flatten_dims(node: fx.Node, previous: fx.Node) -> Optional[Tuple[int, int]]:
    """(start_dim, end_dim) where the node is torch.flatten(previous, ...) or previous.flatten(...) with int dims."""
    if not ((node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target == "flatten")):
        return None
    if not node.args or node.args[0] is not previous or len(node.args) > 3 \
            or set(node.kwargs) - {"start_dim", "end_dim"}:
        return None
    dims = dict(zip(("start_dim", "end_dim"), node.args[1:]), **node.kwargs)
    start, end = dims.get("start_dim", 0), dims.get("end_dim", -1)
    if type(start) is not int or type(end) is not int:
        return None
    return start, end
