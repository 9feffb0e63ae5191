"""Inference through CUDA graphs: one graph launch per call instead of one launch per kernel.

    graphed = rf.cuda_graphed(fused_model.eval())   # any eval-mode nn.Module on a CUDA device
    y = graphed(x)                                  # first call per input signature: warm up, then capture

At small batch a ResNet forward is bound by the host (Python, dispatch, kernel launches), not by the GPU; a graph
replays the whole forward's kernels with one launch. Per call the runner copies the inputs into the graph's
static inputs, replays it, and returns a copy of its static output (so an output stays valid after later calls).

What a graph cannot see, the runner checks on every call, so a replay never computes with stale weights:
    - the module's parameters and buffers changed in place (any optimizer step, copy_, load_state_dict), or their
      storage was swapped (.to(), .half(), `.data =`), or any module had a parameter/buffer/submodule
      (re)assigned (load_state_dict(assign=True), `conv.weight = ...`): every graph is dropped and recaptured;
    - an input signature (shapes, strides, dtypes, device) or the autocast state not seen before: a new graph.
Graphs share one memory pool; a runner keeps at most `max_graphs` of them (least recently used dropped first).
Inference only: the module must be in eval mode, and outputs never require grad.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, List, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .fusion import changes

__all__ = ["CUDAGraphed", "cuda_graphed"]

_WARMUP_CALLS = 3  # lazy work (cuDNN plans, Triton autotuning, fused modules' bindings, allocator) must finish first


class _StateSnapshot:
    """The module's parameters and buffers as a captured graph reads them: the change counter (registrations,
    optimizer steps: fused optimizers change parameters without bumping versions), versions, storages."""

    def __init__(self, module: nn.Module):
        self.epoch = changes.epoch()
        self.tensors = [*module.parameters(), *module.buffers()]
        # Inference tensors have no version counter (in-place changes to them cannot be seen; their storage can)
        self.versioned = [t for t in self.tensors if not t.is_inference()]
        self.versions = [t._version for t in self.versioned]
        self.pointers = [t.data_ptr() for t in self.tensors]

    def is_current(self) -> bool:
        """Cheap (no module traversal): tens of microseconds for a ResNet-50's ~320 tensors."""
        return (self.epoch == changes.epoch() and [t._version for t in self.versioned] == self.versions
                and [t.data_ptr() for t in self.tensors] == self.pointers)


def _signature(args: Tuple[torch.Tensor, ...], device_type: str) -> tuple:
    autocast = torch.is_autocast_enabled(device_type)
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in args) + \
        ((autocast, torch.get_autocast_dtype(device_type) if autocast else None),)


class _Captured:
    """One CUDA graph of module(*static_inputs) with its static inputs and output."""

    def __init__(self, module: nn.Module, args: Tuple[torch.Tensor, ...], pool) -> None:
        with torch.inference_mode(False):  # normal tensors: later calls may copy into them outside inference mode
            self.static_inputs = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
                                       for a in args)
        for static, arg in zip(self.static_inputs, args):
            static.copy_(arg)
        side = torch.cuda.Stream(device=args[0].device)
        side.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(_WARMUP_CALLS):
                module(*self.static_inputs)
        torch.cuda.current_stream(args[0].device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            self.static_output = module(*self.static_inputs)
        self.output_leaves, self.output_spec = pytree.tree_flatten(self.static_output)

    def replay(self, args: Tuple[torch.Tensor, ...], clone_output: bool) -> Any:
        for static, arg in zip(self.static_inputs, args):
            static.copy_(arg)
        self.graph.replay()
        if not clone_output:
            return self.static_output
        leaves = [t.clone() if isinstance(t, torch.Tensor) else t for t in self.output_leaves]
        return pytree.tree_unflatten(leaves, self.output_spec)


class CUDAGraphed:
    """`module` behind CUDA graphs, one per input signature (see the module docstring). Call it like the module
    with tensor arguments; `.module` is the wrapped module, `.reset()` drops every graph."""

    def __init__(self, module: nn.Module, *, clone_output: bool = True, max_graphs: int = 8):
        if not isinstance(module, nn.Module):
            raise TypeError(f"cuda_graphed: module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 1:
            raise ValueError(f"cuda_graphed: max_graphs must be a positive int, got {max_graphs!r}")
        self.module = module
        self.clone_output = bool(clone_output)
        self.max_graphs = max_graphs
        self._graphs: "OrderedDict[tuple, _Captured]" = OrderedDict()
        self._snapshot: _StateSnapshot = None
        self._pool = None

    def reset(self) -> None:
        """Drop every captured graph (and with them the graph memory pool)."""
        self._graphs.clear()
        self._snapshot = None
        self._pool = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, *args: torch.Tensor, **kwargs) -> Any:
        if kwargs:
            raise TypeError(f"cuda_graphed: pass tensors positionally; got keyword arguments {sorted(kwargs)}")
        _check_inputs(args)
        if self.module.training:
            raise ValueError("cuda_graphed: the module is in training mode; CUDA graph replay here is for "
                             "inference: call module.eval() first")
        if self._snapshot is not None and not self._snapshot.is_current():
            self.reset()  # the graphs read the old tensors (or folds/packs of them)
        key = _signature(args, "cuda")
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, args)
        else:
            self._graphs.move_to_end(key)
        return captured.replay(args, self.clone_output)

    def _capture(self, key: tuple, args: Tuple[torch.Tensor, ...]) -> _Captured:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        captured = _Captured(self.module, args, self._pool)
        self._graphs[key] = captured
        # Snapshot after the warm-up: the forward itself must not change the module (eval mode guarantees that
        # for the modules of this package; a module that mutates itself per call is not graph-replayable).
        self._snapshot = _StateSnapshot(self.module)
        return captured

    def __repr__(self) -> str:
        return f"CUDAGraphed({type(self.module).__name__}, graphs={self.num_graphs}, clone_output={self.clone_output})"


def _check_inputs(args: Tuple[Any, ...]) -> None:
    if not args:
        raise TypeError("cuda_graphed: expected at least one input tensor")
    device = None
    for index, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"cuda_graphed: input {index} must be a torch.Tensor, got {type(arg).__name__}")
        if arg.device.type != "cuda":
            raise ValueError(f"cuda_graphed: input {index} must be a CUDA tensor (CUDA graphs replay GPU work), "
                             f"got a {arg.device.type} tensor; call the module directly off the GPU")
        if device is None:
            device = arg.device
        elif arg.device != device:
            raise ValueError(f"cuda_graphed: every input must be on one device; input 0 is on {device}, "
                             f"input {index} on {arg.device}")


def cuda_graphed(module: nn.Module, *, clone_output: bool = True, max_graphs: int = 8) -> Callable:
    """Wrap an eval-mode CUDA module so each call replays a CUDA graph (captured on first use per input
    signature). clone_output=False returns the graph's static output, overwritten by the next call: faster for
    large outputs, for callers that consume each result before calling again."""
    return CUDAGraphed(module, clone_output=clone_output, max_graphs=max_graphs)
