"""Differentiable backward of a fused autograd Function, for double backward (create_graph=True)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def differentiable_vjp(function: Callable, inputs: Sequence[Optional[torch.Tensor]], grad_out: torch.Tensor,
                       needs: Sequence[bool]) -> tuple:
    """d function(*inputs) / d inputs applied to grad_out (None where an input is None or not needed), recorded
    by autograd in every input. torch.func.vjp, not autograd.grad: autograd.grad would follow an input's own
    history too (into an earlier unit that made it), and the outer backward then counts that path twice."""
    present = [index for index, t in enumerate(inputs) if t is not None]

    def of_present(*tensors):
        full = list(inputs)
        for index, t in zip(present, tensors):
            full[index] = t
        return function(*full)

    _, vjp = torch.func.vjp(of_present, *(inputs[index] for index in present))
    grads = [None] * len(inputs)
    for index, grad in zip(present, vjp(grad_out)):
        grads[index] = grad
    return tuple(grad if need else None for grad, need in zip(grads, needs))
