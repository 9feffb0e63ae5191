"""The fused modules' staleness check of their tensors (resnet_fused/fusion/changes.py): the extension's
TensorWatch and the Python TensorState, each against the changes they must see and those they must not report."""

import pytest
import torch

import resnet_fused as rf
from resnet_fused.fusion import changes


def _cpp_watch(tensors):
    from resnet_fused import _C

    return _C.TensorWatch(list(tensors))


WATCHES = [pytest.param(changes.TensorState, id="python"),
           pytest.param(_cpp_watch, id="extension", marks=pytest.mark.skipif(
               rf.available_backends("cpu")["cpu"] is not None, reason="needs the compiled extension"))]


@pytest.fixture(params=WATCHES)
def watch(request):
    return request.param


def _params():
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.randn(5), torch.zeros((), dtype=torch.long)]


def test_unchanged_tensors_stay_current(watch):
    tensors = _params()
    w = watch(tensors)
    _ = [t + 1 for t in tensors], tensors[0].detach().clone()  # reads and copies change nothing
    assert w.is_current() and w.is_current()


@pytest.mark.parametrize("change", ["in_place", "requires_grad", "swap", "buffer_add"])
def test_each_change_is_seen(watch, change):
    tensors = _params()
    w = watch(tensors)
    with torch.no_grad():
        if change == "in_place":
            tensors[0].mul_(2)
        elif change == "requires_grad":
            tensors[0].requires_grad_(False)
        elif change == "swap":
            tensors[0].data = torch.randn(4, 3)
        else:
            tensors[2].add_(1)
    assert not w.is_current()


def test_a_swap_to_the_old_address_is_seen(watch):
    # The watch holds the storage it saw, so a swapped-in tensor cannot get its address: the data pointer differs.
    p = torch.nn.Parameter(torch.randn(256, 256))
    w = watch([p])
    for _ in range(10):
        p.data = torch.randn(256, 256)
        assert not w.is_current()


def test_inference_tensors_raise(watch):
    with torch.inference_mode():
        t = torch.ones(3)
    with pytest.raises(RuntimeError):
        watch([t])


def test_the_fused_modules_use_the_extensions_watch_where_it_loads():
    w = changes.watch_tensors([torch.ones(2)])
    expected = changes.TensorState if rf.available_backends("cpu")["cpu"] is not None else type(_cpp_watch([]))
    assert isinstance(w, expected)
