"""Shared CLI plumbing: argument types, device/dtype/backend choice, the model a command runs and whether it fits."""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Optional

import torch

from ..benchmarking.environment import DTYPE_NAMES, DTYPES
from ..benchmarking.models import MODELS, for_inference, reference_model


def positive_int(text: str) -> int:
    """argparse type for counts (--batch, --iters): a value of 0 would otherwise fall back to the default."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def image_size(text: str) -> int:
    """argparse type for --image-size: ResNet's five stride-2 stages need 32 pixels."""
    return _int_at_least(text, 32)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def pick_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `name` resolves to for this device and dtype; an unknown one, or one that cannot run here, is a
    one-line error."""
    from .. import ops

    try:
        return ops.resolve_name(name, device, dtype)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--backend: {exc}") from None


def output_dir(path) -> Path:
    """Create the output folder (and its parents) up front, or fail in one line before any work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"--out: cannot create the folder {str(path)!r}: {exc.strerror or exc}") from None
    return path


def pick_device(name: Optional[str]) -> torch.device:
    """The requested device, or cuda when present else cpu. Asking for cuda without one is a clear error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA GPU here (use --device cpu)")
    return torch.device(name)


def pick_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """fp32 on the CPU and bf16 on a GPU unless asked otherwise."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SystemExit(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_model(name: str, weights: Optional[str], device, dtype) -> torch.nn.Module:
    """An eval-mode reference model in channels_last: a local torchvision checkpoint, or random weights (with
    random BN statistics); a bad --model or --weights is a one-line error."""
    if name not in MODELS:
        raise SystemExit(f"--model must be one of {list(MODELS)}, got {name!r}")
    try:
        model = reference_model(name, weights)
    except Exception as exc:  # noqa: BLE001
        if weights is None:
            raise
        # missing, a directory, not a checkpoint, truncated, a pickled object rather than a state_dict, another
        # model's keys: the user's file, so one line (the loader says each in one; a mismatch lists every key)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        reason = reason if len(reason) <= 300 else reason[:300] + " ..."
        raise SystemExit(f"--weights: cannot load {weights!r} into {name} ({type(exc).__name__}: {reason})") from None
    return for_inference(model, device, dtype)


# A forward in inference mode holds a few activations at once (a block's input, its branch, the sum): measured on
# resnet50 here, the peak is about 4x the largest activation; 5x leaves some room.
ACTIVATION_COPIES = 5


def check_fits(model: torch.nn.Module, batch: int, image_size: int, *, models_held: int) -> None:
    """Refuse, in one line naming --batch, a run whose forward cannot fit in the memory free on the model's
    device; decided from its shapes (a copy on the meta device, no memory) before any input is made or fused."""
    parameter = next(model.parameters())
    meta = copy.deepcopy(model).to("meta")
    largest = 0

    def record(module, inputs, output):
        nonlocal largest
        largest = max(largest, output.numel())

    for module in meta.modules():
        if not module._modules:
            module.register_forward_hook(record)
    try:
        with torch.no_grad():
            meta(torch.empty(1, 3, image_size, image_size, device="meta"))
    except RuntimeError as exc:  # sizes past what a tensor can hold
        raise SystemExit(f"--image-size {image_size}: too large for this model ({exc})") from None
    element = parameter.element_size()
    weights = sum(p.numel() for p in model.parameters()) * element * models_held
    per_image = (largest * ACTIVATION_COPIES + 3 * image_size**2) * element
    need, free = batch * per_image + weights, free_memory(parameter.device)
    limit = free if free is not None else 2**63  # unknown: still refuse what no machine has
    if need > limit:
        fits = max(0, (limit - weights) // per_image)
        raise SystemExit(f"--batch {batch}: a forward at {image_size}x{image_size} in {DTYPE_NAMES[parameter.dtype]} "
                         f"needs about {need / 2**30:.3g} GiB (its largest activation x {ACTIVATION_COPIES}, and the "
                         f"weights), but {limit / 2**30:.3g} GiB are free on {parameter.device.type}: use --batch "
                         f"{fits} or less")


def free_memory(device) -> Optional[int]:
    """Bytes that can still be allocated on the device (None: unknown here)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
