"""The fused modules' staleness check of their tensors (resnet_fused/fusion/changes.py): the extension's
TensorWatch and the Python TensorState, each against the changes they must see and those they must not report."""

import pytest
import torch

from resnet_fused import _extension
from resnet_fused.fusion import changes


def _has_cpp_watch() -> bool:
    if _extension.load() is not None:
        return False
    from resnet_fused import _C

    return hasattr(_C, "TensorWatch")


def _cpp_watch(tensors):
    from resnet_fused import _C

    return _C.TensorWatch(list(tensors))


WATCHES = [pytest.param(changes.TensorState, id="python"),
           pytest.param(_cpp_watch, id="extension", marks=pytest.mark.skipif(
               not _has_cpp_watch(), reason="needs the compiled extension with its TensorWatch"))]


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


@pytest.mark.parametrize("change", ["in_place", "requires_grad", "swap", "swap_tensors", "buffer_add"])
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
        elif change == "swap_tensors":  # load_state_dict's path under swap_module_params_on_conversion
            torch.utils.swap_tensors(tensors[0], torch.nn.Parameter(torch.randn(4, 3)))
        else:
            tensors[2].add_(1)
    assert not w.is_current()


def test_a_swap_to_the_old_address_is_seen(watch):
    # The watch holds the storage it saw, so a swapped-in tensor cannot get its address: the data pointer differs.
    # Best effort: it fails without that hold only where the allocator hands the freed block out again.
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
    assert isinstance(w, type(_cpp_watch([])) if _has_cpp_watch() else changes.TensorState)


def test_a_watched_parameter_can_still_be_swapped_in_a_fused_model():
    # load_state_dict with swap_module_params_on_conversion swaps each parameter (torch.utils.swap_tensors refuses a
    # tensor something else holds a reference to); the next forward must see the swapped-in weights.
    import resnet_fused as rf
    from tests.oracle import assert_matches

    torch.manual_seed(0)
    model = rf.BasicBlock(8, 8).eval()
    fused, _ = rf.fuse_model(model)
    x = torch.randn(2, 8, 6, 6)
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with torch.no_grad():
        fused(x)
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            fused.load_state_dict(state)
            model.load_state_dict(state)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)
        assert_matches(fused(x), model(x), torch.float32)


def _cpp_attr_watch(modules, names):
    from resnet_fused import _C

    return _C.AttrWatch(list(modules), [list(n) for n in names])


ATTR_WATCHES = [pytest.param(changes.AttrState, id="python"),
                pytest.param(_cpp_attr_watch, id="extension", marks=pytest.mark.skipif(
                    not _has_cpp_watch(), reason="needs the compiled extension with its AttrWatch"))]


@pytest.mark.parametrize("attr_watch", ATTR_WATCHES)
def test_module_attributes_are_watched_by_value(attr_watch):
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    w = attr_watch([conv, bn], [("stride", "padding"), ("eps",)])
    conv.padding = (0, 0)  # the same value, another object: no change
    bn.eps = float("1e-5")
    assert w.is_current()
    conv.padding = (1, 1)
    assert not w.is_current()
    conv.padding = (0, 0)
    assert w.is_current()
    bn.eps = 1e-3
    assert not w.is_current()
    bn.eps = 1e-5
    del conv.stride  # gone
    assert not w.is_current()
    with pytest.raises(AttributeError):
        attr_watch([conv], [("stride",)])


class _Holder(torch.nn.Module):
    kind = "plain"  # a class default, shadowed where an instance sets its own

    def __init__(self):
        super().__init__()
        self.child = torch.nn.ReLU()


@pytest.mark.parametrize("attr_watch", ATTR_WATCHES)
def test_methods_class_defaults_and_children_are_watched_wherever_they_come_from(attr_watch):
    # The extension's watch looks first where each attribute was found (the instance, its class, nn.Module's
    # registries) and compares objects there; whatever moves it elsewhere must still be seen.
    def fresh():
        holder = _Holder()
        return holder, attr_watch([holder], [("forward", "kind", "child")])

    holder, w = fresh()
    for _ in range(2):
        assert w.is_current()
    changes_seen = [
        lambda h: setattr(h, "child", torch.nn.ReLU()),                  # another child
        lambda h: h._modules.__setitem__("child", torch.nn.Identity()),  # behind __setattr__'s back
        lambda h: h.__dict__.__setitem__("child", torch.nn.ReLU()),      # shadowing the registry
        lambda h: h.register_parameter("extra", None) or h._parameters.__setitem__("child", None),  # found first
        lambda h: setattr(h, "kind", "own"),                             # an instance attribute shadows the class's
        lambda h: setattr(h, "forward", lambda x: x),                    # a forward on the instance
        lambda h: setattr(h, "__class__", type("Other", (_Holder,), {"forward": lambda self, x: x})),
    ]
    for change in changes_seen:
        holder, w = fresh()
        change(holder)
        assert not w.is_current(), change
    holder, w = fresh()
    holder.kind = "plain"  # equal to what getattr gave: no change
    assert w.is_current()
    saved = _Holder.forward
    try:  # the class itself changed
        holder, w = fresh()
        _Holder.forward = lambda self, x: x
        assert not w.is_current()
    finally:
        _Holder.forward = saved
    holder, w = fresh()
    _Holder.unrelated = 1  # any change to the class: compared by value again, still current
    del _Holder.unrelated
    assert w.is_current()


def test_the_fused_modules_watch_attributes_with_the_extension_where_it_loads():
    w = changes.watch_attrs([torch.nn.ReLU()], [("inplace",)])
    assert isinstance(w, type(_cpp_attr_watch([], [])) if _has_cpp_watch() else changes.AttrState)
