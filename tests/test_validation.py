"""The backend argument of the public ops: an unknown name lists the known ones, a backend that cannot run the call
says why, "auto" always resolves and use_backend scopes. Bad arguments to the ops themselves are tested in
tests/ops/, on every backend."""

import pytest
import torch

from resnet_fused import ops


def _args(**over):
    args = dict(x=torch.randn(2, 4, 8, 8), weight=torch.randn(8, 4, 3, 3), scale=torch.ones(8),
                shift=torch.zeros(8), residual=None, stride=1, padding=1)
    args.update(over)
    return args


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        _call_with_backend("nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        _call_with_backend(3)


def _call_with_backend(backend):
    a = _args()
    return ops.conv_bn_act(a["x"], a["weight"], a["scale"], a["shift"], padding=1, backend=backend)


def test_named_backend_that_cannot_run_says_why():
    reasons = ops.available_backends("cpu")
    assert reasons["torch"] is None
    blocked = [name for name, why in reasons.items() if why is not None]
    for name in blocked:
        with pytest.raises(ValueError, match=f"backend '{name}' cannot run this call"):
            _call_with_backend(name)


def test_auto_always_resolves_and_use_backend_scopes():
    assert ops.resolve_name("auto", "cpu") in ops.backend_names()
    with ops.use_backend("torch"):
        assert ops.get_backend() == "torch"
        assert ops.resolve_name(None, "cpu") == "torch"
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError):
        ops.set_backend("nope")
