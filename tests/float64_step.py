"""One training step compared with a float64 run of the eager model, without ReLU coin tosses.

A ReLU whose input lies within rounding error of zero passes its gradient in one precision and not in the other:
that one element then changes the gradients by about 1/(N*H*W) of their size, in eager fp32 as in any fused
kernel, and which run it hits is chance. So the inputs are drawn (seed by seed) until no ReLU input of the float64
run lies within `margin` of zero (relative to that call's largest input): every difference measured is then
arithmetic, the same on every machine, and a fused model can be held to a small multiple of eager fp32's error.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.oracle import TOLERANCES

_RELUS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}


class _ReluInputs(TorchDispatchMode):
    """Records, per ReLU call, how close its input comes to zero relative to its largest magnitude."""

    def __init__(self):
        super().__init__()
        self.gaps = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _RELUS and args[0].numel():
            magnitude = args[0].detach().abs()
            self.gaps.append((magnitude.min() / magnitude.max().clamp_min(1e-300)).item())
        return func(*args, **(kwargs or {}))


def smallest_relu_gap(model: torch.nn.Module, x: torch.Tensor) -> float:
    """min over ReLU calls of min|input| / max|input| in a float64 forward of a copy of `model`."""
    recorder = _ReluInputs()
    with torch.no_grad(), recorder:
        copy.deepcopy(model).double()(x.double())
    return min(recorder.gaps, default=1.0)


def draw_without_ties(make: Callable[[int], tuple], margin: float = 2e-5, tries: int = 400):
    """make(seed) -> (model, x, target); the first draw whose float64 run has no ReLU input within `margin`."""
    for seed in range(tries):
        torch.manual_seed(seed)
        model, x, target = make(seed)
        if smallest_relu_gap(model, x) >= margin:
            return model, x, target
    raise AssertionError(f"no draw in {tries} seeds keeps every ReLU input {margin:g} away from zero: make the "
                         f"model or the input smaller")


def one_sgd_step(model, x, target) -> dict:
    """Output, loss, gradients and the state after one SGD step (with momentum and weight decay, so that the
    optimizer's arithmetic runs too), each as a dict of name -> tensor."""
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    out = model(x.to(dtype))
    loss = F.cross_entropy(out, target)
    loss.backward()
    result = {"output": out.detach(), "loss": loss.detach()}
    result.update({f"grad {name}": p.grad.clone() for name, p in model.named_parameters()})
    optimizer.step()
    result.update({f"after {name}": t.clone() for name, t in model.state_dict().items()})
    return result


def assert_step_matches(fused: dict, eager: dict, truth: dict, dtype=torch.float32, factor: float = 10) -> None:
    """Every entry within dtype tolerance of float64, or at most `factor` times eager's own error."""
    assert list(fused) == list(eager) == list(truth)
    tol = TOLERANCES[dtype]
    failures = []
    for key, expected in truth.items():
        if key.endswith("num_batches_tracked"):
            if not fused[key].item() == eager[key].item() == expected.item():
                failures.append(f"{key}: {fused[key].item()} vs eager {eager[key].item()}")
            continue
        expected = expected.double()
        bound = tol["atol"] + tol["rtol"] * expected.abs().max().item()
        eager_err = (eager[key].double() - expected).abs().max().item()
        err = (fused[key].double() - expected).abs().max().item()
        if not (torch.isfinite(fused[key]).all() and err <= max(bound, factor * eager_err)):
            failures.append(f"{key}: error {err:.3g}, bound {bound:.3g}, eager's error {eager_err:.3g}")
    assert not failures, "\n".join(failures)
