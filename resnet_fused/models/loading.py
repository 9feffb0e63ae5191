"""Loading torchvision-format checkpoints from local disk (safely: weights_only=True)."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import torch
from torch import nn


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model; the message lists every difference."""


class CheckpointReadError(ValueError):
    """The file is not a checkpoint this loader reads: not torch.save's format, damaged, or holding objects that
    loading would have to unpickle (run code) to build. The message is one line."""


def load_state_dict_file(path) -> dict:
    """Read a state_dict saved with torch.save (a bare state_dict, or one under 'state_dict' / 'model')."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path} is a directory, not a file saved by torch.save")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    _check_torch_save_format(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text: a paragraph that suggests weights_only=False (unsafe)
        found = str(exc).split("Unsupported global:", 1)[-1].strip().splitlines()[0] if "Unsupported global:" \
            in str(exc) else "an object that is not a tensor or a container"
        raise CheckpointReadError(f"checkpoint {path} holds Python objects besides tensors ({found[:200]}), which "
                                  f"are not unpickled here since that runs code: save model.state_dict()") from None
    except (EOFError, RuntimeError) as exc:  # truncated, or a damaged zip archive
        detail = (str(exc).strip().splitlines() or ["the file ended early"])[0][:200]
        raise CheckpointReadError(f"checkpoint {path} is damaged or truncated ({detail})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _check_torch_save_format(path) -> None:
    """torch.save writes a zip archive (PyTorch 1.6+: it opens with "PK\\3\\4") or, before that, a pickle stream
    (protocol 2+ opens with byte 0x80): anything else is some other file, and torch.load's advice for it would be
    wrong (and unsafe)."""
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        raise CheckpointReadError(f"checkpoint {path} is an empty file")
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointReadError(f"{path} is not a checkpoint saved by torch.save (neither its zip archive nor its "
                                  f"legacy pickle format)")


def _with_batch_counters(state: dict, model: nn.Module) -> dict:
    """The state with every BatchNorm's `num_batches_tracked` that it lacks (checkpoints saved before PyTorch 0.4.1
    have none) set to the model's own, as BatchNorm's loader does for such checkpoints."""
    filled = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        filled._metadata = metadata
    for name, module in model.named_modules():
        counter = getattr(module, "num_batches_tracked", None)
        key = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        if isinstance(module, nn.modules.batchnorm._NormBase) and counter is not None and key not in filled:
            filled[key] = counter.detach().clone()
    return filled


def load_checkpoint(model: nn.Module, path) -> nn.Module:
    """Load a torchvision-format checkpoint into `model` strictly; raise one error listing every mismatch.

    BatchNorms' `num_batches_tracked` counters are optional, as BatchNorm itself treats them."""
    state = _with_batch_counters(load_state_dict_file(path), model)
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
