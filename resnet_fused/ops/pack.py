"""ConvBNPack: a conv weight and its folded BN, prepared once by one backend (ops.pack_conv_bn)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ConvBNPack:
    """A conv weight and its folded BN, laid out once by one backend for all later calls, with everything the
    call needs besides its input: the conv's geometry (stride, padding), dtype and device."""

    backend: str
    payload: Any
    out_channels: int
    in_channels: int
    kernel_size: tuple
    stride: int
    padding: int
    dtype: torch.dtype
    device: torch.device
