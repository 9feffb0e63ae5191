"""rf.cuda_graphed: argument errors and staleness detection (CPU), replay against the plain module (GPU)."""

import copy

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused.graphs import _StateSnapshot
from tests.test_blocks import _randomize_bn
from tests.test_models_gpu import _images as gpu_images
from tests.test_models_gpu import _require

CL = torch.channels_last


# ------------------------------------------------------------------------------------------ errors (CPU)


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        rf.cuda_graphed(lambda x: x)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_rejects_bad_max_graphs(bad):
    with pytest.raises(ValueError, match="max_graphs must be a positive int"):
        rf.cuda_graphed(nn.ReLU(), max_graphs=bad)


def test_rejects_cpu_inputs_naming_the_input():
    graphed = rf.cuda_graphed(nn.ReLU())
    with pytest.raises(ValueError, match="input 0 must be a CUDA tensor"):
        graphed(torch.ones(2))


def test_rejects_non_tensors_and_keywords():
    graphed = rf.cuda_graphed(nn.ReLU())
    with pytest.raises(TypeError, match="input 0 must be a torch.Tensor"):
        graphed(3.0)
    with pytest.raises(TypeError, match="keyword arguments"):
        graphed(x=torch.ones(2))
    with pytest.raises(TypeError, match="at least one input"):
        graphed()


# -------------------------------------------------------------------------- staleness detection (CPU)


def _snapshot(model):
    rf.cuda_graphed(model)  # installs the registration hooks, as a runner does
    return _StateSnapshot(model)


def test_snapshot_is_current_until_something_changes():
    model = rf.resnet18(num_classes=10).eval()
    snapshot = _snapshot(model)
    assert snapshot.is_current()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))  # an eval forward changes nothing
    assert snapshot.is_current()


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "assign", "data", "dtype", "new_param",
                                    "new_module", "buffer", "fused_optimizer"])
def test_snapshot_sees_every_kind_of_weight_change(change):
    model = rf.resnet18(num_classes=10).eval()
    snapshot = _snapshot(model)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        if change == "in_place":
            model.layer1[0].conv1.weight.mul_(2)
        elif change == "load_state_dict":
            model.load_state_dict(state)
        elif change == "assign":
            model.load_state_dict(state, assign=True)
        elif change == "data":
            model.fc.weight.data = torch.zeros_like(model.fc.weight)
        elif change == "dtype":
            model.double()
        elif change == "new_param":
            model.fc.weight = nn.Parameter(torch.zeros_like(model.fc.weight))
        elif change == "new_module":
            model.fc = nn.Linear(512, 10)
        elif change == "buffer":
            model.bn1.running_var = torch.ones_like(model.bn1.running_var)
        elif change == "fused_optimizer":  # updates parameters without bumping their version counters
            model.fc.weight.grad = torch.ones_like(model.fc.weight)
            torch.optim.SGD([model.fc.weight], lr=0.1, fused=True).step()
    assert not snapshot.is_current()


def test_snapshot_of_inference_tensors_still_sees_storage_swaps():
    with torch.inference_mode():
        model = nn.Conv2d(3, 4, 3)
    snapshot = _snapshot(model)
    assert snapshot.is_current()
    with torch.inference_mode():
        model.weight.data = torch.zeros_like(model.weight)
    assert not snapshot.is_current()


# -------------------------------------------------------------------------------------- replay (GPU)


def _model(backend, dtype=torch.bfloat16):
    model = _randomize_bn(rf.resnet18(num_classes=10)).eval().cuda().to(dtype).to(memory_format=CL)
    if backend == "eager":
        return model
    _require(backend)
    return rf.fuse_model(model, backend=backend)[0]


def _images(batch, dtype=torch.bfloat16):
    return gpu_images(batch, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["eager", "triton", "cuda"])
def test_replay_matches_the_module(backend, dtype):
    model = _model(backend, dtype)
    graphed = rf.cuda_graphed(model)
    first, second = _images(1, dtype=dtype), _images(1, dtype=dtype)
    with torch.no_grad():
        out_first = graphed(first)
        out_second = graphed(second)  # a replay with new data, not the warm-up's output
        expected_first, expected_second = model(first), model(second)
    assert graphed.num_graphs == 1
    torch.testing.assert_close(out_second, expected_second, rtol=0, atol=0)
    torch.testing.assert_close(out_first, expected_first, rtol=0, atol=0)  # not overwritten by the 2nd call


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_weight_change_after_a_forward_is_seen(backend):
    model = _model(backend)
    graphed = rf.cuda_graphed(model)
    x = _images(2)
    with torch.no_grad():
        before = graphed(x)
        model.layer1[0].conv1.weight.mul_(-1)  # in place: same storage, new values
        model.bn1.running_mean.add_(0.5)
        after = graphed(x)
        expected = model(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


@pytest.mark.gpu
def test_one_graph_per_input_signature_with_lru_eviction():
    model = _model("triton")
    graphed = rf.cuda_graphed(model, max_graphs=2)
    with torch.no_grad():
        for batch in (1, 2, 1, 3):
            x = _images(batch)
            torch.testing.assert_close(graphed(x), model(x), rtol=0, atol=0)
    assert graphed.num_graphs == 2


@pytest.mark.gpu
def test_captured_in_inference_mode_replays_outside_it():
    model = _model("triton")
    graphed = rf.cuda_graphed(model)
    with torch.inference_mode():
        graphed(_images(2))
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(graphed(x), model(x), rtol=0, atol=0)


@pytest.mark.gpu
def test_without_clone_the_static_output_is_returned():
    graphed = rf.cuda_graphed(_model("eager"), clone_output=False)
    with torch.no_grad():
        assert graphed(_images(1)) is graphed(_images(1))


@pytest.mark.gpu
def test_training_mode_is_refused():
    model = _model("eager").train()
    with pytest.raises(ValueError, match="training mode"):
        rf.cuda_graphed(model)(_images(2))
