"""What the GPU pass launches, as data: the conv and elementwise calls of each step, for each backend.

One list serves the plan (compile counts), the warm-up (what to compile) and the steps that run them, so the
warm-up compiles exactly what the later steps launch. Shapes:
    - every distinct ResNet-50 conv (read off the model: stem, and conv1/conv2/conv3/downsample of each stage,
      with the ReLU/residual role it has there), at batch 2 in every dtype, at batch 256 and 1 in bf16 as the
      headline runs them (and in fp16 for the cuda backend);
    - edge shapes: the test suite's shape classes (1x1, 3x3, stride 2 on odd sizes, the 7x7 stem, 1 input
      channel, odd channel counts, a Cin tail), plus one output pixel, a wide odd Cout, the stem on odd sizes.
Triton calls at small batch force one autotune config each (compiles.assign_configs), so every config is
checked; the model-sized calls autotune, as the headline does. On the CPU (the driver's self-test) the shapes
are the test suite's small ones, which the Triton interpreter runs in seconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

DTYPES = ("fp32", "fp16", "bf16")
HEADLINE_DTYPE = "bf16"
HEADLINE_BATCHES = (256, 1)
SMALL_BATCH = 2
EPILOGUES = ((True, True), (False, False))  # (residual, relu): the whole epilogue, and the bare conv + BN


@dataclass(frozen=True)
class ConvShape:
    name: str
    batch: int
    cin: int
    h: int
    w: int
    cout: int
    kernel: int
    stride: int
    padding: int

    @property
    def ho(self) -> int:
        return (self.h + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def wo(self) -> int:
        return (self.w + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def m(self) -> int:
        """Rows of the implicit GEMM: output pixels."""
        return self.batch * self.ho * self.wo

    def as_case(self) -> tuple:
        """The test suite's case tuple (tests/oracle.py): (id, N, Cin, H, W, Cout, k, stride, padding)."""
        return (self.name, self.batch, self.cin, self.h, self.w, self.cout, self.kernel, self.stride, self.padding)


@dataclass(frozen=True)
class ConvCall:
    """One conv_bn_act launch. config: a forced Triton config's label (None: autotuned); split_k: a forced split
    (None: the launcher's measured choice); precision "ieee": fp32 with TF32 turned off."""

    shape: ConvShape
    dtype: str
    residual: bool
    relu: bool
    config: Optional[str] = None
    split_k: Optional[int] = None
    precision: str = "tf32"
    stats: bool = False  # the training path's conv_batch_norm_stats: batch statistics from the epilogue

    op = "conv_bn_act"

    @property
    def id(self) -> str:
        parts = [self.shape.name, f"b{self.shape.batch}", self.dtype,
                 "stats" if self.stats else ("res" if self.residual else "nores") + ("_relu" if self.relu else "")]
        parts += [f"cfg={self.config}"] * (self.config is not None) + [f"split={self.split_k}"] * bool(self.split_k)
        return " ".join(parts + ["ieee"] * (self.precision == "ieee"))


@dataclass(frozen=True)
class ElementwiseCall:
    """One bn_act (residual and relu apply) or add_relu launch on an (N, C, H, W) tensor."""

    op: str
    shape: Tuple[int, int, int, int]
    dtype: str
    residual: bool = True
    relu: bool = True

    @property
    def id(self) -> str:
        epilogue = ("res" if self.residual else "nores") + ("_relu" if self.relu else "")
        return " ".join([self.op, "x".join(map(str, self.shape)), self.dtype] + [epilogue] * (self.op == "bn_act"))


@dataclass(frozen=True)
class BatchNormCall:
    """One training BatchNorm pass of the triton backend on a channels_last (N, C, H, W) conv output: "apply"
    (normalize, + residual, ReLU) or "backward", with the BN's weight and bias."""

    op: str
    shape: Tuple[int, int, int, int]
    dtype: str
    residual: bool
    relu: bool

    @property
    def id(self) -> str:
        epilogue = ("res" if self.residual else "nores") + ("_relu" if self.relu else "")
        return " ".join(["batch_norm_" + self.op, "x".join(map(str, self.shape)), self.dtype, epilogue])


def _tiny_shapes() -> List[ConvShape]:
    from tests.oracle import CONV_CASES

    return [ConvShape(*case) for case in CONV_CASES]


EXTRA_EDGE_SHAPES = [
    ConvShape("stem_odd_size", 2, 3, 33, 31, 64, 7, 2, 3),
    ConvShape("one_pixel", 1, 64, 1, 1, 64, 1, 1, 0),          # M = 1: H, W and M specialize to constants
    ConvShape("wide_odd_cout_b1", 1, 32, 6, 6, 200, 3, 1, 1),   # Cout past two tiles, not a multiple of 16
    ConvShape("odd_3x3", 3, 40, 17, 13, 72, 3, 1, 1),
]
TINY_EW_SHAPES = [(2, 16, 5, 7), (1, 3, 1, 1), (3, 37, 4, 9)]  # odd C and sizes: channel = offset % C must hold
GPU_EW_SHAPES = TINY_EW_SHAPES + [(8, 256, 56, 56)]


@functools.lru_cache(maxsize=None)
def resnet50_layers():
    """ResNet-50's distinct convs with their roles (resnet_fused.benchmarking.layers reads them off the model)."""
    import resnet_fused as rf
    from resnet_fused.benchmarking.layers import conv_layers

    return tuple(conv_layers(rf.resnet50(), image_size=224))


def layer_shape(layer, batch: int) -> ConvShape:
    name = f"{layer.label.split(' ')[0]}:{layer.cin}-{layer.cout}k{layer.kernel}s{layer.stride}@{layer.h}"
    return ConvShape(name, batch, layer.cin, layer.h, layer.w, layer.cout, layer.kernel, layer.stride, layer.padding)


def model_calls(batch: int, dtype: str) -> List[ConvCall]:
    """The conv launches of a fused ResNet-50 forward, one per distinct conv, with its role's epilogue."""
    return [ConvCall(layer_shape(layer, batch), dtype, layer.residual, layer.relu) for layer in resnet50_layers()]


def train_calls(batch: int, dtype: str) -> list:
    """The Triton launches of a fused ResNet-50 train step on the triton backend, one per distinct conv: the conv
    with the statistics epilogue (autotuned), and the BatchNorm apply (forward, and again in backward's
    recompute) and backward on its output, with its role's residual and ReLU."""
    calls = []
    for layer in resnet50_layers():
        shape = layer_shape(layer, batch)
        out = (batch, shape.cout, shape.ho, shape.wo)
        calls += [ConvCall(shape, dtype, False, False, stats=True),
                  BatchNormCall("apply", out, dtype, layer.residual, layer.relu),
                  BatchNormCall("backward", out, dtype, layer.residual, layer.relu)]
    return calls


def small_shapes(device: str) -> List[ConvShape]:
    if device == "cpu":
        return _tiny_shapes()
    return [layer_shape(layer, SMALL_BATCH) for layer in resnet50_layers()] + _tiny_shapes() + EXTRA_EDGE_SHAPES


def small_calls(device: str) -> List[ConvCall]:
    return [ConvCall(shape, dtype, residual, relu) for dtype in DTYPES for shape in small_shapes(device)
            for residual, relu in EPILOGUES]


def split_calls(device: str) -> List[ConvCall]:
    """Forced split K (even, uneven, 16 slices; the last slice short or empty) on both K layouts."""
    if device == "cpu":
        tiny = {s.name: s for s in _tiny_shapes()}
        shapes, splits = [tiny["3x3_s2_odd"], tiny["7x7_stem"]], (2, 3)
    else:
        layers = {layer.name: layer for layer in resnet50_layers()}
        shapes = [layer_shape(layers["layer3.0.conv2"], 4), layer_shape(layers["layer4.1.conv2"], 1),
                  layer_shape(layers["conv1"], SMALL_BATCH)]
        splits = (2, 5, 16)
    return [ConvCall(shape, dtype, True, True, split_k=split) for dtype in DTYPES for shape in shapes
            for split in splits]


def ieee_calls(device: str) -> List[ConvCall]:
    """fp32 with TF32 off (full-precision dots): GPU only, the interpreter's dots are always exact."""
    if device == "cpu":
        return []
    shapes = small_shapes(device)
    return [ConvCall(shape, "fp32", True, True, precision="ieee") for shape in (shapes[0], shapes[2])]


def elementwise_calls(device: str) -> List[ElementwiseCall]:
    shapes = TINY_EW_SHAPES if device == "cpu" else GPU_EW_SHAPES
    calls = []
    for dtype in DTYPES:
        for shape in shapes:
            calls += [ElementwiseCall("bn_act", shape, dtype, residual, relu) for residual in (True, False)
                      for relu in (True, False)]
            calls.append(ElementwiseCall("add_relu", shape, dtype))
    return calls


def forced_triton_calls(device: str) -> List[ConvCall]:
    """The Triton conv calls that force a config: small shapes, forced splits, TF32 off."""
    from .compiles import assign_configs

    return assign_configs(small_calls(device) + split_calls(device) + ieee_calls(device))


def correctness_calls(backend: str, device: str) -> list:
    """Every call the correctness step makes on `backend`, cheap and broad first: elementwise, small shapes
    (Triton: forced configs and splits), then the model-sized calls as the headline makes them (GPU)."""
    convs = forced_triton_calls(device) if backend == "triton" else small_calls(device)
    if device == "cuda":
        dtypes = (HEADLINE_DTYPE,) if backend == "triton" else (HEADLINE_DTYPE, "fp16")
        convs += [call for batch in sorted(HEADLINE_BATCHES) for dtype in dtypes for call in model_calls(batch, dtype)]
    return elementwise_calls(device) + convs


def sanitizer_calls(backend: str, tool: str) -> list:
    """What compute-sanitizer checks (GPU): a subset of the correctness calls, so that nothing new compiles.
    memcheck: Triton, each config and forced split once per dtype in {bf16, fp32} on its smallest shape, and
    elementwise; cuda, every small shape in bf16 and fp32. racecheck (slow): two calls per backend."""
    if backend == "triton":
        chosen = {}
        for call in forced_triton_calls("cuda"):
            key = (call.config, call.dtype, call.split_k, call.precision)
            if call.dtype in ("bf16", "fp32") and (key not in chosen or call.shape.m < chosen[key].shape.m):
                chosen[key] = call
        convs = sorted(chosen.values(), key=lambda c: (c.dtype, c.config, c.split_k or 0, c.precision))
    else:
        convs = [call for call in small_calls("cuda") if call.dtype in ("bf16", "fp32") and call.residual]
    if tool == "racecheck":  # racecheck slows kernels the most: the least work that still pipelines several K
        # steps through shared memory, a 3x3 per-tap conv and the stem's flat K, in bf16
        bf16 = [c for c in convs if c.dtype == "bf16" and not c.split_k]
        work = lambda c: c.shape.m * c.shape.cout * c.shape.cin * c.shape.kernel ** 2  # noqa: E731
        per_tap = min((c for c in bf16 if c.shape.kernel == 3 and c.shape.cin >= 16), key=work)
        return [per_tap, min((c for c in bf16 if c.shape.kernel == 7), key=work)]
    return convs + [call for call in elementwise_calls("cuda") if call.dtype == "bf16"]
