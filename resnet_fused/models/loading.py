"""Loading torchvision-format checkpoints from local disk (safely: weights_only=True)."""

from __future__ import annotations

import os

import torch
from torch import nn


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model; the message lists every difference."""


def load_state_dict_file(path) -> dict:
    """Read a state_dict saved with torch.save (a bare state_dict, or one under 'state_dict' / 'model')."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """Load a torchvision-format checkpoint into `model` strictly; raise one error listing every mismatch."""
    state = load_state_dict_file(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected)
                        if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", mismatched)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items))
        raise CheckpointMismatchError(f"checkpoint {path} does not match {type(model).__name__}: "
                                      + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
