"""The "cpu" backend: the C++ extension's CPU kernels (csrc/cpu): oneDNN convolution with the BN fold in the
weight and the epilogue as oneDNN post-ops.

    y = act(conv2d(x, weight * scale[c], stride, padding) + shift[c] (+ residual))

Its pack is the folded weight w * scale[c] (channels_last) and the folded shift as the conv bias, both in the
convolution's dtype (x's, or fp32 for bf16/fp16 on a CPU without native kernels for them), run by the internal op
conv_bias_act: nothing is re-laid-out per call. fp32 3x3 stride-1 convs over enough output tiles run as Winograd
F(4x4, 3x3) instead (csrc/cpu/winograd.cpp, the internal op conv3x3_winograd), its 36 products by MKL or oneDNN as
measured per CPU vendor (WINOGRAD_RULES); on CPUs whose widest vector unit is AVX2, fp32 1x1 convs and the strided
larger kernels (stem, stride-2 3x3s) run as the extension's own implicit GEMM (csrc/cpu/conv_gemm.h, the internal op
conv_gemm; CONV_GEMM_RULES), and so do the Winograd products of convs with few channels, one block of tiles at a
time, and there fp32 3x3 stride-1 convs over few tiles with many channels run as Winograd F(2x2, 3x3) instead
(csrc/cpu/winograd_f2.h, the internal op conv3x3_winograd2), its 16 products by the same GEMM. A fold that is not
finite runs unfolded, as the public conv_bn_act (CpuUnfoldedPack).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ... import _extension
from ..donation import donated
from ..geometry import conv_output_shape
from ..registry import register_backend
from ..validation import SUPPORTED_DTYPES
from .cpu_conv_products import conv_backward, pointwise_conv
from .cpu_info import cpu_vendor
from .extension import EXTENSION_REASON, ExtensionBackend


def _onednn_reason() -> Optional[str]:
    """None if torch has oneDNN, which the convolution runs on."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn), which the cpu backend's convolution runs on"
    return None


def onednn_conv_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cpu backend convolves `dtype` inputs in: their own where this CPU convolves them in hardware
    (bf16: AVX512-BF16 or AMX-BF16; fp16: AVX512-FP16 or AMX-FP16), else fp32, rounding the output once. The C++
    kernels decide (csrc/cpu/conv_dtype.cpp); the pack folds into the same dtype once."""
    from ... import _C

    return _C.cpu_conv_dtype(dtype)


_ONEDNN_REASON = _onednn_reason()
_CONV_DTYPE = {dtype: onednn_conv_dtype(dtype) for dtype in SUPPORTED_DTYPES} \
    if _ONEDNN_REASON is None and EXTENSION_REASON["CPU"] is None else {}


class CpuConvPack(NamedTuple):
    """The BN fold applied once: weight * scale[c] (x's dtype, channels_last) and bias = shift (x's dtype).

    `onednn_weights` holds the same weight reordered into oneDNN's blocked layout (opaque mkldnn tensors), one
    per input shape, made on first use (or, for convs that run as Winograd, a WinogradWeight): without it oneDNN
    reorders the weight on every call, which dominates small-spatial layers (batch 1, late stages). The layout
    depends on the input shape: one chosen without it was measured 10-20x slower on some 1x1 convs at 14x14.
    Autograd and torch.compile take `weight` instead.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    onednn_weights: dict


class CpuUnfoldedPack(NamedTuple):
    """The pack of a fold that is not finite (an infinite or NaN scale, or w * scale overflowing the convolution's
    dtype): folded, an infinite scale would put inf into the weight and give NaN across its channel where eager
    gives +-inf. It runs as the public conv_bn_act, which convolves the unfolded weight and applies scale, shift,
    residual and ReLU after it, as eager does."""

    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


class ConvGemmWeight(NamedTuple):
    """A conv's weight packed for the implicit GEMM (conv_gemm_weight: 16-channel panels), made once per pack and
    shared by its input shapes."""

    packed: torch.Tensor


_ONEDNN_SHAPES_PER_PACK = 4  # distinct input shapes kept per pack (bounds memory when shapes vary)


class Winograd2Weight(NamedTuple):
    """A Winograd F(2x2, 3x3) conv's prepared weight: its transform G w G^T as the implicit GEMM's panels, (16,
    C_out rounded up to 16 x C_in), made once per pack and shared by its input shapes."""

    panels: torch.Tensor


class WinogradRule(NamedTuple):
    """When fp32 3x3 convs with stride 1 and padding 1 run as Winograd F(4x4, 3x3) (csrc/cpu/winograd.cpp) instead
    of oneDNN's direct convolution, and in which layout its transformed buffers lie; counted in 4x4 output tiles,
    N * ceil(H / 4) * ceil(W / 4)."""

    min_tiles: int                   # fewer tiles: oneDNN
    position_major_max_tiles: float  # more tiles: tile-major buffers (with MKL's products)
    onednn_products: bool = False    # the 36 products by oneDNN (tile-major) instead of MKL's batched GEMM


class WinogradWeight(NamedTuple):
    """A Winograd conv's prepared weight, what its 36 products read: the transform G w G^T, (36, C_in, C_out), for
    MKL's (one per pack, shared by its input shapes), for oneDNN's the transform as the weight of a 36-group 1x1
    convolution, reordered for the input shape (each shape's made from another's, not from a kept transform: at 512
    channels each copy is 38 MB), or for the implicit GEMM's the transform as its panels, (36, C_in * C_out rounded up
    to 16), one per pack."""

    products: torch.Tensor


# Measured per conv, each candidate interleaved with the others in one process (2 cores, fp32, resnet50's 3x3 shapes
# at batch 1, 2, 4 and 8):
#   Intel Xeon (AVX-512, AMX): Winograd 1.5-2.3x faster than oneDNN from 8 tiles up (7x7 at batch 2), level at 4
#     (7x7 at batch 1); position-major buffers 1.2-1.6x faster than tile-major at every size up to 1568 tiles.
#     Whole models against the other rule, interleaved: resnet18 batch 8 86.0 -> 70.6 ms, resnet50 batch 8
#     260.8 -> 254.7, batch 1 level (there the 4x larger transformed weights are read from memory).
#   AMD EPYC (AVX-512): Winograd 1.6-2.3x faster at 56x56, 28x28 and 14x14, 2.4x slower at 7x7 (batch 8's 32 tiles);
#     position-major 1.1-1.6x faster up to 256 tiles, 1.0-1.6x slower beyond (56x56 at batch 2-8).
#   Then with the 36 products by oneDNN (a grouped 1x1 convolution) instead of MKL, whose batched GEMM runs at about
#     half this CPU's FLOP/s peak: the Winograd conv 1.0-1.5x faster than with MKL's (512 channels at 7x7, batch 8:
#     5.70 -> 3.75 ms; 256 at 14x14, batch 8: 5.25 -> 4.10), so 1.9x faster than oneDNN's direct convolution at 7x7
#     batch 8 and 2.1x at 14x14 batch 1 (0.97 -> 0.45 ms), 0.9x at 7x7 batch 1 (4 tiles). Whole models against the
#     MKL rule (48 tiles, position-major up to 256), each its own fused model, interleaved: resnet50 batch 1
#     44.2 -> 40.6 ms, batch 8 301.2 -> 279.4; resnet18 batch 1 15.8 -> 14.9, batch 8 111.9 -> 96.2 (from 8 or 32
#     tiles instead of 16: within 1-4%). MKL on Intel: kept as measured there.
#   AMD EPYC (Zen 3, AVX2 only), each rule its own fused model, all made before any ran (making one re-binds the
#     others at their next call): this rule against from 4 tiles, from 48, MKL's products from 8 (the Xeon's rule) and
#     no Winograd: resnet50 batch 1 1.000 / 0.985 / 0.932 / 0.933 / 0.889x, batch 8 1.000 / 0.961 / 0.812 / 0.851 /
#     0.786x.
# Other CPUs take the EPYC rule.
WINOGRAD_RULES = {"GenuineIntel": WinogradRule(8, math.inf),
                  "AuthenticAMD": WinogradRule(16, 0, onednn_products=True)}
DEFAULT_WINOGRAD_RULE = WINOGRAD_RULES["AuthenticAMD"]
WINOGRAD_RULE = WINOGRAD_RULES.get(cpu_vendor(), DEFAULT_WINOGRAD_RULE)


class ConvGemmRule(NamedTuple):
    """Which fp32 convs run as the implicit GEMM (csrc/cpu/conv_gemm.h: AVX2 6x16 register tiles, the epilogue in
    registers, x read in place) instead of oneDNN: 1x1 convs (padding 0, any stride) with at least
    min_pointwise_in_channels input channels, or min_residual_pointwise_in_channels when the call adds a residual;
    where strided_kernels, the convs with a larger kernel and a stride of 2 or more (the stem, the stride-2 3x3s); and
    stride-1 convs with a larger kernel that Winograd does not take, where the output has at most max_kernel_pixels
    pixels (all images)."""

    min_pointwise_in_channels: float
    strided_kernels: bool = False
    min_residual_pointwise_in_channels: float = math.inf
    max_kernel_pixels: float = 0
    # Winograd convs with at most this many input and output channels: their 36 products by the GEMM's register tile,
    # the three stages per block of tiles (csrc/cpu/winograd.cpp, winograd_in_cache)
    max_in_cache_winograd_channels: float = 0
    # fp32 3x3 stride-1 convs with more channels than that, at most max_winograd2_tiles F(4x4) output tiles (all
    # images) and at most max_winograd2_work of those tiles times input channels: Winograd F(2x2, 3x3) instead
    # (csrc/cpu/winograd_f2.h), its 16 products by the GEMM's register tile
    max_winograd2_tiles: float = 0
    max_winograd2_work: float = 0


# Measured per conv on 2 cores of an AMD EPYC (Zen 3, AVX2 only; oneDNN runs its AVX2 kernels there), each against
# oneDNN's conv with the same fused epilogue, alternating in one process, ResNet-50's 1x1 shapes: batch 1 1.09-1.26x
# faster from 128 input channels (0.96x at 64); batch 8 1.00-1.14x, 1.6x at 7x7, 0.84-0.94x at 64 input channels.
# Inside resnet50 at batch 1 those convs ran 1.05-1.33x faster; whole models 1.036x (batch 1) and 1.032x (batch 8).
# From 64 input channels instead: layer1's 1x1 convs 1.10-1.22x faster there, but the Winograd convs after them
# 0.83-0.86x, all convolutions 65.0 ms either way; so 128.
# With A read straight from x (only the border pixels' rows gathered), each conv against oneDNN's with the same
# epilogue, alternating: the 7x7 stem 1.23x (batch 1) and 1.26x (batch 8) faster, the stride-2 3x3s 1.05-1.08x and
# 1.01-1.11x, stride-1 3x3s not taken by Winograd level or slower (1.00x at 7x7 batch 1, 0.95x batch 8): so the
# strided larger kernels take it too. Whole models, the 1x1-only rule against this one, interleaved (25, 25, 6 and 8
# rounds): resnet50 batch 1 1.050x and 1.026x, batch 8 1.043x; resnet18 batch 1 1.019x (20), batch 8 1.033x.
# CPUs with AVX-512 keep oneDNN's AVX-512 kernels (measured as fast as ONNX Runtime's on a Zen 4 EPYC); keyed by
# ATen's CPU capability.
# A 1x1 conv that adds a residual reads it in the epilogue, and the GEMM asks for those rows as a tile starts its last
# K block: layer1's 64 -> 256 convs with a cold residual 1.44x (batch 1) and 1.16x (batch 8) faster than oneDNN's
# (without a residual 0.96x and 0.91x), so from 64 input channels there. Inside resnet50 (two fused models
# interleaved, either one first): those three convs 1.04-1.18x (batch 1) and 1.09-1.18x (batch 8) faster.
# The same for a stride-1 3x3 that adds a residual where Winograd does not take it: layer4's 512-channel 7x7 (a basic
# block's second conv) at batch 1 1.13-1.15x faster than oneDNN's (cold weights and residuals, either one first),
# 256-channel 14x14 1.06-1.07x; at batch 8 (392 pixels) 0.90-0.94x. So up to 256 output pixels: one row block, where
# the next weight slice is fetched ahead. Without a residual the same: two fused models, each conv timed where it runs,
# interleaved, either model first: resnet50's 512-channel 7x7 conv2s at batch 1 1.15-1.22x and 1.05-1.09x faster than
# oneDNN's, at batch 2 (98 pixels) 1.25-1.33x and 1.05-1.08x; resnet18's at batch 1 1.07x and 1.17x.
# Winograd's products by this kernel, the three stages per block of 6 tiles so that the transformed tiles stay in L2,
# against the oneDNN products (interleaved in one process): 64 channels at 56x56 1.86x faster at batch 1, 2.64x at
# batch 8; 128 at 28x28 1.59x and 1.50x; 256 at 14x14 0.68x and 0.99x (each block reads all of the 9.4 MB transformed
# weight); blocks of 12-36 tiles were 5-45% slower than 6 at 64 and 128 channels. Inside the models (two fused models
# interleaved, either one first; each conv timed where it runs): resnet50 layer1's 3x3s 1.30-1.73x faster at batch 1
# and 1.52-1.74x at batch 8, layer2's 1.00-1.21x and 1.24-1.39x; the forward at batch 8 1.03x and 1.06x, resnet18's at
# batch 8 1.17x both ways. Three models rotated (off / up to 64 / up to 128 channels): layer2's 3x3s summed 3.71 /
# 3.59 / 3.40 ms (resnet50, batch 1), 3.19 / 3.20 / 3.26 (resnet18, batch 1), 5.01 / 4.95 / 4.66 (resnet18, batch 2).
# So up to 128 channels.
# With those Winograd blocks after them, layer1's 64-channel 1x1s without a residual (the downsample, resnet50's first
# conv1) on the GEMM too (two fused models interleaved, each conv timed where it runs): 1.14x and 1.23x faster than
# oneDNN's at batch 1, 1.07x and 1.13x at batch 8, the Winograd conv after them 1.05x and 1.10x; resnet18's 64 -> 128
# stride-2 downsample 1.31x at batch 8. Whole resnet50 forwards 1.011x, 1.023x, 1.016x, 0.963x (batch 1), 1.012x,
# 1.013x, 1.029x (batch 8). So from 64 input channels with or without a residual.
# Winograd F(2x2, 3x3) where the F(4x4) transform (36/9 of the weight) is read from memory for few tiles: its own is
# 16/9, its products take 4 multiply-adds per output and input channel against 2.25. Each candidate on its own, cold
# caches, alternating (ms): 256 channels at 14x14 batch 1 (16 F(4x4) tiles) F(4x4) with oneDNN's products 1.68,
# F(2x2) 1.57, the direct GEMM 2.65; at batch 2 2.81 / 2.83 / 5.43, batch 4 3.07 / 3.25 / 5.51; 512 channels at 7x7
# batch 1 (4 tiles) 2.15 / 1.61 / 1.83, batch 2 2.88 / 2.80 / 3.49. Inside the models (two fused models, both made
# before either ran, whole forwards alternating, median of the per-round ratios; each conv timed where it runs):
# resnet50 batch 1 1.014x and 1.018x faster (200 and 150 rounds; layer3's 3x3s 1.16-1.37x, layer4's 0.93-1.25x against
# the direct GEMM), resnet18 batch 1 1.022x (layer3's 1.09-1.34x, layer4's 1.01-1.09x), resnet50 batch 2 1.012x
# (layer4's 1.16x); resnet50 batch 4, with layer4's 16 tiles of 512 channels as well, 0.986x (those two 0.88x and
# 0.96x): so up to 16 tiles and 16 tiles x 256 channels.
CONV_GEMM_RULES = {"AVX2": ConvGemmRule(64, strided_kernels=True, max_kernel_pixels=256,
                                        max_in_cache_winograd_channels=128, max_winograd2_tiles=16,
                                        max_winograd2_work=4096)}
NO_CONV_GEMM = ConvGemmRule(math.inf)


def _conv_gemm_rule() -> ConvGemmRule:
    if EXTENSION_REASON["CPU"] is not None:
        return NO_CONV_GEMM
    from ... import _C

    if not _C.cpu_conv_gemm_available():
        return NO_CONV_GEMM
    return CONV_GEMM_RULES.get(torch.backends.cpu.get_cpu_capability(), NO_CONV_GEMM)


CONV_GEMM_RULE = _conv_gemm_rule()


def _runs_conv_gemm(pack, input_shape, residual: bool = False) -> bool:
    if pack.dtype != torch.float32 or pack.payload.weight.dtype != torch.float32:
        return False
    if pack.kernel_size == (1, 1):
        rule = CONV_GEMM_RULE
        least = min(rule.min_pointwise_in_channels, rule.min_residual_pointwise_in_channels if residual else math.inf)
        return pack.padding == 0 and input_shape[1] >= least
    if pack.stride >= 2:
        return CONV_GEMM_RULE.strided_kernels
    if _runs_winograd(pack, input_shape) or _runs_winograd2(pack, input_shape):
        return False
    _, _, height, width = conv_output_shape(input_shape, pack.out_channels, pack.kernel_size, 1, pack.padding)
    return input_shape[0] * height * width <= CONV_GEMM_RULE.max_kernel_pixels


def _tiles(input_shape) -> int:
    n, _, h, w = input_shape
    return n * -(-h // 4) * -(-w // 4)


def _winograd_shape(pack) -> bool:
    """An fp32 3x3 conv with stride 1 and padding 1: what either Winograd computes."""
    return (pack.stride == 1 and pack.padding == 1 and pack.dtype == torch.float32 and pack.kernel_size == (3, 3)
            and pack.payload.weight.dtype == torch.float32)


def _runs_winograd2(pack, input_shape) -> bool:
    """F(2x2, 3x3) (CONV_GEMM_RULE.max_winograd2_tiles and max_winograd2_work)."""
    tiles, rule = _tiles(input_shape), CONV_GEMM_RULE
    return (_winograd_shape(pack) and not _in_cache_winograd(pack) and tiles <= rule.max_winograd2_tiles
            and tiles * input_shape[1] <= rule.max_winograd2_work)


def _runs_winograd(pack, input_shape) -> bool:
    """F(4x4, 3x3) (WINOGRAD_RULE)."""
    return (_winograd_shape(pack) and _tiles(input_shape) >= WINOGRAD_RULE.min_tiles
            and not _runs_winograd2(pack, input_shape))


_POSITIONS = 36  # of a 6x6 transformed tile: the 36 products


def _reorder_grouped(grouped: torch.Tensor, input_shape) -> torch.Tensor:
    """A (36 C_out, C_in, 1, 1) weight of a 36-group 1x1 convolution reordered by oneDNN for the tile-major buffer of
    inputs of `input_shape`, seen as a (1, 36 C_in, 1, tiles) image."""
    image = [1, _POSITIONS * grouped.shape[1], 1, _tiles(input_shape)]
    return torch.ops.mkldnn._reorder_convolution_weight(grouped, [0, 0], [1, 1], [1, 1], _POSITIONS, image)


def _grouped_products_weight(transform: torch.Tensor, input_shape) -> torch.Tensor:
    """The transform (36, C_in, C_out) as that grouped weight, reordered for `input_shape`."""
    _, c_in, c_out = transform.shape
    return _reorder_grouped(transform.permute(0, 2, 1).reshape(_POSITIONS * c_out, c_in, 1, 1).contiguous(),
                            input_shape)


def _in_cache_winograd(pack) -> bool:
    return max(pack.payload.weight.shape[:2]) <= CONV_GEMM_RULE.max_in_cache_winograd_channels


def _winograd_panels(transform: torch.Tensor) -> torch.Tensor:
    """A transform (positions, C_in, C_out) as the implicit GEMM's panels: U[p] packed as conv_gemm_weight packs the 1x1
    weight U[p]^T, one row per position."""
    _, c_in, c_out = transform.shape
    pack = torch.ops.resnet_fused.conv_gemm_weight.default
    return torch.stack([pack(u.t().reshape(c_out, c_in, 1, 1)) for u in transform])


def _products_kind(products: torch.Tensor) -> str:
    return "onednn" if products.is_mkldnn else "panels" if products.dim() == 2 else "mkl"


def _winograd_weight(pack, input_shape) -> WinogradWeight:
    """The transform, made once per pack: a later shape reuses it (MKL's, the GEMM's panels) or reorders another
    shape's weight (oneDNN's)."""
    kind = "panels" if _in_cache_winograd(pack) else "onednn" if WINOGRAD_RULE.onednn_products else "mkl"
    made = next((w.products for w in pack.payload.onednn_weights.values()
                 if isinstance(w, WinogradWeight) and _products_kind(w.products) == kind), None)
    if made is None:
        transform = torch.ops.resnet_fused.winograd_weight.default(pack.payload.weight)
        if kind == "panels":
            return WinogradWeight(_winograd_panels(transform))
        return WinogradWeight(_grouped_products_weight(transform, input_shape) if kind == "onednn" else transform)
    # MKL's transform and the panels serve every shape; oneDNN's grouped weight, back in plain layout, is reordered
    return WinogradWeight(_reorder_grouped(made.to_dense(), input_shape) if kind == "onednn" else made)


def _shape_free_weight(pack, kind, make):
    """The pack's prepared weight of `kind` (one that does not depend on the input shape): one an earlier shape made,
    else kind(make(weight))."""
    made = next((w for w in pack.payload.onednn_weights.values() if isinstance(w, kind)), None)
    return made or kind(make(pack.payload.weight))


def _winograd2_weight(pack) -> Winograd2Weight:
    return _shape_free_weight(pack, Winograd2Weight,
                              lambda w: _winograd_panels(torch.ops.resnet_fused.winograd2_weight.default(w)))


def _conv_gemm_weight(pack) -> ConvGemmWeight:
    return _shape_free_weight(pack, ConvGemmWeight, torch.ops.resnet_fused.conv_gemm_weight.default)


_RESIDUAL_CALLS = "residual"  # onednn_weights' key for the GEMM weight of calls with a residual (shape-free)


def _residual_weight(pack, input_shape) -> Optional[ConvGemmWeight]:
    """Where the rule gives the implicit GEMM only the calls that add a residual: its weight for those, else None.
    Packed once per pack (the GEMM's weight does not depend on the input shape) and kept beside the shapes' weights,
    outside their count."""
    if isinstance(_onednn_weight(pack, input_shape), ConvGemmWeight) or not _runs_conv_gemm(pack, input_shape, True):
        return None
    weight = pack.payload.onednn_weights.get(_RESIDUAL_CALLS)
    if weight is None:
        weight = pack.payload.onednn_weights[_RESIDUAL_CALLS] = _conv_gemm_weight(pack)
    return weight


def _onednn_weight(pack, input_shape):
    """The pack's weight prepared for inputs of `input_shape`: oneDNN's blocked layout (an mkldnn tensor), reordered
    once per shape, for a Winograd conv a WinogradWeight (its transform made once per pack), or for the implicit GEMM
    a ConvGemmWeight (packed once per pack)."""
    payload = pack.payload
    key = tuple(input_shape)
    weight = payload.onednn_weights.get(key)
    if weight is None:
        if _runs_conv_gemm(pack, input_shape):
            weight = _conv_gemm_weight(pack)
        elif _runs_winograd2(pack, input_shape):
            weight = _winograd2_weight(pack)
        elif _runs_winograd(pack, input_shape):
            weight = _winograd_weight(pack, key)
        else:
            weight = torch.ops.mkldnn._reorder_convolution_weight(payload.weight.contiguous(), [pack.padding] * 2,
                                                                  [pack.stride] * 2, [1, 1], 1, list(key))
        shapes = [k for k in payload.onednn_weights if k != _RESIDUAL_CALLS]
        if len(shapes) >= _ONEDNN_SHAPES_PER_PACK:  # the shape-free GEMM weight of residual calls stays
            for k in shapes:
                del payload.onednn_weights[k]
        payload.onednn_weights[key] = weight
    return weight


def _unambiguous_channels_last(t: torch.Tensor) -> bool:
    """channels_last and not also NCHW-contiguous (C > 1 and more than one pixel): oneDNN's in-place binary
    post-op takes only such tensors."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _writes_into_residual(pack, input_shape) -> bool:
    """Whether the bound call of this oneDNN pack may write a donated residual in place: x of `input_shape` is
    unambiguously channels_last (C_in > 1, more than one pixel) and convolves in its own dtype (the residual then
    has the output's dtype and shape: the call checks its dtype and layout)."""
    _, c, h, w = input_shape
    return c > 1 and h * w > 1 and pack.dtype == pack.payload.weight.dtype


class CpuBackend(ExtensionBackend):
    name = "cpu"
    device_type = "cpu"
    dispatch_key = "CPU"

    def unsupported_reason(self, x, weight):
        # The elementwise kernels take every supported dtype; only the convolution depends on oneDNN.
        return super().unsupported_reason(x, weight) or (_ONEDNN_REASON if weight is not None else None)

    @torch.no_grad()
    def pack_conv(self, weight, scale, shift, stride, padding):
        dtype = _CONV_DTYPE[weight.dtype]  # fp32 for bf16/fp16 where this CPU has no native kernel
        folded = (weight.float() * scale.float().view(-1, 1, 1, 1)).to(dtype)
        if not torch.isfinite(folded).all():
            return CpuUnfoldedPack(weight.contiguous(memory_format=torch.channels_last), scale.float().contiguous(),
                                   shift.float().contiguous())
        return CpuConvPack(folded.contiguous(memory_format=torch.channels_last), shift.detach().to(dtype).contiguous(),
                           {})

    def conv_bn_act_packed(self, x, pack, residual, relu):
        payload = pack.payload
        if isinstance(payload, CpuUnfoldedPack):
            return torch.ops.resnet_fused.conv_bn_act.default(x, *payload, residual, pack.stride, pack.padding, relu)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or (residual is not None and residual.requires_grad))):
            return torch.ops.resnet_fused.conv_bias_act.default(x, payload.weight, payload.bias, residual, pack.stride,
                                                                pack.padding, relu)
        return self.bind_conv(pack, tuple(x.shape), relu)(x, residual)

    # training and frozen-BN units: matrix products where oneDNN is slow with per-step weights (cpu_conv_products.py)
    conv_backward = staticmethod(conv_backward)

    def conv_batch_norm_stats(self, x, weight, bias, stride, padding, dilation, groups):
        y = pointwise_conv(x, weight, bias, stride, padding, dilation, groups)
        if y is None:
            return super().conv_batch_norm_stats(x, weight, bias, stride, padding, dilation, groups)
        return (y, *self.batch_norm_stats(y))

    def bind_conv(self, pack, input_shape, relu):
        payload, stride, padding = pack.payload, pack.stride, pack.padding
        if isinstance(payload, CpuUnfoldedPack):
            op, (weight, scale, shift) = torch.ops.resnet_fused.conv_bn_act.default, payload
            return lambda x, residual: op(x, weight, scale, shift, residual, stride, padding, relu)
        call = self._bind_weight(pack, _onednn_weight(pack, input_shape), input_shape, relu)
        residual_weight = _residual_weight(pack, input_shape)
        if residual_weight is None:
            return call
        with_residual = self._bind_weight(pack, residual_weight, input_shape, relu)
        either = lambda x, residual: call(x, None) if residual is None else with_residual(x, residual)  # noqa: E731
        either.native = (call.native[0], with_residual.native[1]) if call.native and with_residual.native else None
        return either

    @staticmethod
    def _bind_weight(pack, weight, input_shape, relu):
        """bind_conv's call with this prepared weight (_onednn_weight's kinds), and the same call as a
        _C.BoundCall in its `native` (fusion/binding.py replays blocks of those in C++)."""
        payload, stride, padding = pack.payload, pack.stride, pack.padding
        bias = payload.bias
        if isinstance(weight, ConvGemmWeight):
            gemm, kernel_size = torch.ops.resnet_fused.conv_gemm.default, list(pack.kernel_size)
            return _with_native(lambda x, residual: gemm(x, weight.packed, bias, residual, kernel_size, stride, padding,
                                                         relu, donated(residual)),
                                _extension.bound_call("resnet_fused::conv_gemm", "",
                                                      (_X, weight.packed, bias, None, kernel_size, stride, padding,
                                                       relu, False), residual_at=3, donate_at=8))
        if isinstance(weight, Winograd2Weight):
            winograd2, panels = torch.ops.resnet_fused.conv3x3_winograd2.default, weight.panels
            return _with_native(lambda x, residual: winograd2(x, panels, bias, residual, relu, donated(residual)),
                                _extension.bound_call("resnet_fused::conv3x3_winograd2", "",
                                                      (_X, panels, bias, None, relu, False), residual_at=3,
                                                      donate_at=5))
        if isinstance(weight, WinogradWeight):
            winograd, (products,) = torch.ops.resnet_fused.conv3x3_winograd.default, weight
            # oneDNN's products read tile-major buffers (the panels' run per block of tiles: not asked)
            position_major = (_products_kind(products) == "mkl"
                              and _tiles(input_shape) <= WINOGRAD_RULE.position_major_max_tiles)
            # a donated residual (ops/donation.py) takes the output; the op checks its shape and layout
            return _with_native(lambda x, residual: winograd(x, products, bias, residual, relu, position_major,
                                                             donated(residual)),
                                _extension.bound_call("resnet_fused::conv3x3_winograd", "",
                                                      (_X, products, bias, None, relu, position_major, False),
                                                      residual_at=3, donate_at=6))
        op = torch.ops.resnet_fused.conv_bias_act.default
        native = _extension.bound_call("resnet_fused::conv_bias_act", "",
                                       (_X, weight, bias, None, stride, padding, relu), residual_at=3)
        if not _writes_into_residual(pack, input_shape):
            return _with_native(lambda x, residual: op(x, weight, bias, residual, stride, padding, relu), native)
        # oneDNN's binary post-op in place: y = relu?(conv(x) + bias + residual) stored in the residual's buffer
        into = torch.ops.mkldnn._convolution_pointwise_.binary
        pads, strides, unary = [padding] * 2, [stride] * 2, "relu" if relu else None
        out_shape = conv_output_shape(input_shape, pack.out_channels, pack.kernel_size, stride, padding)
        into_args = (_X, _X, weight, bias, pads, strides, [1, 1], 1, "add", None, unary, [], None)
        native_into = _extension.bound_call("mkldnn::_convolution_pointwise_", "binary", into_args, x_at=1,
                                            residual_at=0)
        if native is not None and native_into is not None:
            native.set_into(native_into, list(out_shape))

        # A donated residual is the block's own tensor in the unit's compute dtype (unit.decide passes x and residual
        # converted, and a converted residual is a new tensor, never the donated one): only its shape and layout are
        # asked here, as oneDNN's in-place post-op writes the output through it.
        def call(x, residual):
            if (donated(residual) and residual.shape == out_shape and _unambiguous_channels_last(residual)
                    and _unambiguous_channels_last(x)):
                return into(residual, x, weight, bias, pads, strides, [1, 1], 1, "add", None, unary, [], None)
            return op(x, weight, bias, residual, stride, padding, relu)
        return _with_native(call, native if native_into is not None else None)


_X = torch.empty(0)  # where a BoundCall's x (and residual) go: replaced on every call


def _with_native(call, native):
    """`call` carrying its BoundCall (None: it has none) for calls without and with a residual alike."""
    call.native = None if native is None else (native, native)
    return call


register_backend(CpuBackend())
