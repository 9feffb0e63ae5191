"""What a fused model keeps for backward in training: each unit's conv output and the stage's first input, the
residual stream recomputed elementwise (fusion/training.py's Produced), never a convolution."""

from __future__ import annotations

import copy

import torch
from torch import nn

import resnet_fused as rf
from tests.test_blocks import _randomize_bn


def _saved_activation_bytes(model, x) -> int:
    """Unique storages autograd saves during one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())




def test_resnet50_saves_at_most_two_thirds_of_eager_activations():
    torch.manual_seed(0)
    model = _randomize_bn(rf.resnet50()).train()
    fused, _ = rf.fuse_model(model)
    x = torch.randn(2, 3, 64, 64)
    eager_bytes, fused_bytes = _saved_activation_bytes(model, x), _saved_activation_bytes(fused, x)
    assert fused_bytes <= 0.67 * eager_bytes, (fused_bytes, eager_bytes)


class _Halve(nn.Module):
    """Halves the stream between two blocks, in place (the next fused block must then save what it read, since
    recomputing it would give the value before the edit) or out of place."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place

    def forward(self, x):
        return x.mul_(0.5) if self.in_place else x * 0.5


def _stage() -> nn.Sequential:
    blocks = [rf.BasicBlock(8, 8) for _ in range(3)]
    return _randomize_bn(nn.Sequential(blocks[0], _Halve(False), *blocks[1:])).train()


def _grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().mean().backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(), x.grad.zero_()
    out.square().mean().backward()  # a second backward through the same graph recomputes again
    second = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    return first, second


def test_recomputed_stream_gives_eager_gradients_even_after_an_in_place_edit():
    """Eager's ReLU saves its output, so eager cannot run the in-place edit: its reference halves out of place."""
    for in_place in (False, True):
        torch.manual_seed(1)
        model = _stage()
        fused, report = rf.fuse_model(model)
        assert len(report.blocks) == 3
        fused[1].in_place = in_place
        x = torch.randn(2, 8, 10, 10)
        (eager, _), (first, second) = _grads(copy.deepcopy(model), x), _grads(fused, x)
        for e, a, b in zip(eager, first, second):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_saved_tensors_are_freed_by_backward_while_the_output_lives():
    """The usual loop keeps `loss` (and through it the graph) until the next step: what the fused blocks saved must
    be freed by backward anyway, as eager's saved tensors are."""
    import gc
    import weakref

    torch.manual_seed(2)
    fused, _ = rf.fuse_model(_stage())
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused(x)
    loss = out.square().mean()
    loss.backward()
    gc.collect()
    params = {id(p) for p in fused.parameters()}
    alive = [r() for r in saved if r() is not None and id(r()) not in params and r() is not x]
    assert out.grad_fn is not None and not alive, [tuple(t.shape) for t in alive]
