"""What the benchmark suites share: the cases (derived from the models), the providers, and one timed runner.

Providers, side by side in one `benchmark.group` per case:
    eager                      the reference modules (conv -> BN -> [+ residual] -> ReLU as separate kernels)
    torch.compile              default mode; max-autotune too with RESNET_FUSED_BENCH_AUTOTUNE=1 (GPU)
    cudnn                      torch.cudnn_convolution_relu / _add_relu on the folded weight (GPU convs with ReLU)
    triton, cuda, cpu          resnet_fused's backends (fused ops, FusedBottleneck/FusedBasicBlock, fuse_model)
    eager+cudagraph, triton+cudagraph, cuda+cudagraph
                               whole models replayed through rf.cuda_graphed (GPU, batch <= 32, where launch
                               overhead matters): graphs for eager too, so the graphs' own gain shows apart
    onnxruntime, openvino      the CPU inference engines, on the same model exported to ONNX (whole models on the
                               CPU; optional: `pip install .[peers]`, else skipped with the reason; see peers.py)

Timing: warm-ups (compilation, autotuning, first-call caches) run before the timed region; on a GPU each timed
call ends with torch.cuda.synchronize(); rounds and iterations are fixed per case from one untimed measurement.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import pytest
import torch
from torch import nn

import resnet_fused as rf
from resnet_fused import PackedConvBN
from resnet_fused.benchmarking.environment import DTYPE_NAMES, environment
from resnet_fused.benchmarking.fusing import fuse_for_benchmark, fused_block
from resnet_fused.benchmarking.layers import ConvLayer, conv_layers, count_macs, model_bytes
from resnet_fused.benchmarking.models import REL_TOL, randomize_bn
from resnet_fused.benchmarking.units import CudnnConvBNAct, EagerConvBNAct, layer_inputs, random_conv_bn

from peers import PEERS, peer_runner, peer_skip_reason  # benchmarks/ is on sys.path (rootdir-relative import)

ON_GPU = torch.cuda.is_available()
NO_GPU = "needs a CUDA GPU; none is present on this machine"
FUSED_BACKENDS = ("triton", "cuda", "cpu")
GRAPHED = "+cudagraph"
GRAPH_PROVIDERS = ("eager" + GRAPHED, "triton" + GRAPHED, "cuda" + GRAPHED)
GRAPH_MAX_BATCH = 32


def split_graphed(provider: str):
    """("triton", True) for "triton+cudagraph"; (provider, False) otherwise."""
    graphed = provider.endswith(GRAPHED)
    return (provider[:-len(GRAPHED)] if graphed else provider), graphed

PROVIDERS = ("eager", "eager-nchw", "torch.compile", "torch.compile-max-autotune", "cudnn") + FUSED_BACKENDS \
    + GRAPH_PROVIDERS + PEERS
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass(frozen=True)
class Setting:
    """Where and how one case runs."""

    device: str
    dtype: torch.dtype
    batch: int

    @property
    def id(self) -> str:
        return f"{self.device}-{DTYPE_NAMES[self.dtype]}-b{self.batch}"


GPU_SETTINGS = [Setting("cuda", d, b) for d in (F32, F16, BF16) for b in (1, 32, 256)]
# fp16 too: on CPUs without AVX512-FP16 eager falls back to a slow path and the "cpu" backend convolves in fp32.
CPU_SMALL = [Setting("cpu", F32, 2), Setting("cpu", BF16, 2), Setting("cpu", F16, 2)]


def cpu_convolves_bf16() -> bool:
    """Whether the "cpu" backend runs bf16 convolutions in hardware here (AVX512-BF16 or AMX-BF16)."""
    if rf.available_backends("cpu")["cpu"] is not None:
        return False
    from resnet_fused import _C

    return _C.cpu_conv_dtype(BF16) == BF16


# Whole models on the CPU (eval, 224x224) vs eager, torch.compile and the peer engines: fp32 at batch 1 and 8, and
# bf16 where this CPU convolves it in hardware (elsewhere both eager and the "cpu" backend widen it to fp32).
CPU_MODEL = [Setting("cpu", F32, 1), Setting("cpu", F32, 8)] + \
    ([Setting("cpu", BF16, 1), Setting("cpu", BF16, 8)] if cpu_convolves_bf16() else [])

# ResNet-50's distinct convs and ResNet-50/18's distinct blocks, read off the models (meta-device shape pass).
RESNET50_CONVS = conv_layers(rf.resnet50(), image_size=224)


def distinct_blocks(builder, image_size: int = 224):
    """[(name, input shape (C, H, W))] of the blocks of a model that differ in shape or downsample."""
    model = builder()
    shapes, handles = {}, []
    meta = copy.deepcopy(model).to("meta").eval()
    for name, module in meta.named_modules():
        if isinstance(module, (rf.Bottleneck, rf.BasicBlock)):
            def record(mod, inputs, output, name=name):  # returns None: a hook's return would replace output
                shapes.setdefault(name, tuple(inputs[0].shape[1:]))
            handles.append(module.register_forward_hook(record))
    with torch.no_grad():
        meta(torch.empty(1, 3, image_size, image_size, device="meta"))
    for handle in handles:
        handle.remove()
    seen, blocks = set(), []
    for name, shape in shapes.items():
        block = model.get_submodule(name)
        key = (shape, block.stride, block.downsample is None)
        if key not in seen:
            seen.add(key)
            blocks.append((name, shape))
    return blocks


BLOCK_CASES = [("resnet50", name, shape) for name, shape in distinct_blocks(rf.resnet50)] + \
              [("resnet18", name, shape) for name, shape in distinct_blocks(rf.resnet18)]
BUILDERS = {"resnet50": rf.resnet50, "resnet18": rf.resnet18}


def benchmark_disabled(config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False))


def skip_reason(provider: str, setting: Setting, config, *, kind: str) -> Optional[str]:
    """Why this provider does not run this setting here (None: it runs). Decided before anything is built."""
    if setting.device == "cuda" and not ON_GPU:
        return NO_GPU
    quick = benchmark_disabled(config)
    provider, graphed = split_graphed(provider)
    if graphed:
        if setting.device != "cuda":
            return "CUDA graphs replay GPU work"
        if kind != "model":
            return "CUDA graph replay is benchmarked for whole models only"
        if setting.batch > GRAPH_MAX_BATCH:
            return f"CUDA graph replay is benchmarked at batch <= {GRAPH_MAX_BATCH}, where launch overhead matters"
    if quick and setting.batch > 8:
        return "--benchmark-disable smoke run: batch > 8 is skipped"
    if quick and kind == "model" and setting.device == "cpu" and setting.batch > 1:
        return "--benchmark-disable smoke run: CPU models run at batch 1 only (the same code paths)"
    if provider == "eager-nchw" and kind != "model":
        return "eager with NCHW tensors is benchmarked for whole models only"
    if provider.startswith("torch.compile"):
        if quick:
            return "--benchmark-disable smoke run: torch.compile providers are skipped (compile time)"
        if provider.endswith("max-autotune"):
            if setting.device != "cuda":
                return "max-autotune targets GPU kernels; not benchmarked on the CPU"
            if os.environ.get("RESNET_FUSED_BENCH_AUTOTUNE") != "1":
                return "max-autotune compiles for minutes per case: set RESNET_FUSED_BENCH_AUTOTUNE=1 to include it"
        if setting.device == "cuda" and os.environ.get("RESNET_FUSED_BENCH_COMPILE") != "all":
            if setting.dtype != BF16 or setting.batch != 256:
                return ("torch.compile on GPU runs at bf16 batch 256 only (RESNET_FUSED_BENCH_COMPILE=all for every "
                        "case)")
            if kind == "conv":  # ~5 s of compile per layer; cuDNN's fused ops are the per-layer baseline
                return "torch.compile on GPU runs for blocks and models only (RESNET_FUSED_BENCH_COMPILE=all for convs)"
        if setting.device == "cpu" and kind != "model":
            return "torch.compile on the CPU runs for the whole-model case only (compile time)"
    if provider == "cudnn":
        if setting.device != "cuda":
            return "torch.cudnn_convolution_*_relu is a GPU op"
        if kind != "conv":
            return "cuDNN fused conv ops are benchmarked per conv layer only"
    if provider in PEERS:
        if kind != "model":
            return "the peer engines are benchmarked for whole models only"
        return peer_skip_reason(provider, setting.dtype, setting.device)
    return fused_backend_skip_reason(provider, setting.device)


def fused_backend_skip_reason(provider: str, device: str) -> Optional[str]:
    """Why a fused backend provider does not run on `device` here (None: it runs, or it is no fused backend)."""
    if provider == "triton" and device == "cpu":
        return "triton on the CPU is the interpreter, not a speed path"
    if provider in FUSED_BACKENDS:
        reason = rf.available_backends(device).get(provider, "not registered")
        if reason:
            return f"backend {provider!r} unavailable on {device}: {reason}"
    return None


def compiled(module: nn.Module, provider: str) -> nn.Module:
    torch._dynamo.reset()  # a fresh cache per case: no recompilation limits, no dynamic-shape fallbacks
    mode = "max-autotune" if provider.endswith("max-autotune") else None
    return torch.compile(module, mode=mode, dynamic=False)


def cudnn_conv_fn(conv: nn.Conv2d, bn: nn.BatchNorm2d, layer: ConvLayer, x, residual) -> Callable:
    """cuDNN's own fused conv + bias (+ add) + ReLU on the BN-folded weight; None where it does not apply."""
    if not layer.relu:
        return None
    unit = CudnnConvBNAct(conv, bn, relu=True)
    return lambda: unit(x, residual)


def model_runner(provider: str, model: nn.Module, x: torch.Tensor) -> Tuple[Callable[[], torch.Tensor], dict]:
    """(a function running the whole model on x as `provider` runs it, extra_info about how it was built).
    model and x are channels_last on the setting's device and dtype; the model is left untouched."""
    base, graphed = split_graphed(provider)
    extra = {}
    if base == "eager":
        module = model
    elif provider == "eager-nchw":  # what `model(x)` runs for a user who never asked for channels_last
        module = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        x = x.contiguous()
    elif provider.startswith("torch.compile"):
        module = compiled(model, provider)
    elif provider in PEERS:
        return peer_runner(provider, model, x), {"threads": torch.get_num_threads()}
    else:
        module, extra["fused_with"] = fuse_for_benchmark(model, base)
    if graphed:  # captured during run_case's warm-ups
        module, extra["cuda_graphs"] = rf.cuda_graphed(module), True
    return (lambda: module(x)), extra


def check_close(out: torch.Tensor, ref: torch.Tensor, dtype, device: str, scale: float = 1.0) -> None:
    """A sanity check that a provider computes the case (the correctness suites live in tests/)."""
    tol = REL_TOL[dtype] * scale * (10 if dtype == F32 and device == "cuda" else 1)  # TF32 on the GPU
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()
    assert err <= tol, f"output differs from eager: max relative error {err:.3g} > {tol:.3g}"


def run_case(benchmark, request, fn: Callable, *, provider: str, setting: Setting, case: str, kind: str,
             flops: int, nbytes_fused: int, nbytes_eager: int, extra: Optional[dict] = None):
    """Warm up, then time fn under benchmark.pedantic with fixed rounds; return fn's last output."""
    on_gpu = setting.device == "cuda"
    benchmark.group = f"{kind} {case} | {DTYPE_NAMES[setting.dtype]} b{setting.batch} {setting.device}"
    env = environment(setting.device)
    benchmark.extra_info.update(provider=provider, kind=kind, case=case, dtype=DTYPE_NAMES[setting.dtype],
                                batch=setting.batch, flops=flops, bytes_fused=nbytes_fused,
                                bytes_eager=nbytes_eager, device_name=env["device"], torch=env["torch"],
                                triton=env["triton"], cuda=env["cuda"], cudnn=env["cudnn"], **(extra or {}))

    def timed():
        out = fn()
        if on_gpu:
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        if benchmark_disabled(request.config):
            return benchmark.pedantic(timed, rounds=1, iterations=1)
        for _ in range(3 if on_gpu else 1):  # compile, autotune, allocator and cuDNN plan caches
            timed()
        begin = time.perf_counter()
        timed()
        once = time.perf_counter() - begin
        if on_gpu:
            iterations, rounds = max(1, min(50, int(2e-3 / max(once, 1e-6)))), (10 if once < 0.05 else 5)
        else:
            iterations, rounds = 1, (5 if once < 0.1 else 3)
        return benchmark.pedantic(timed, rounds=rounds, iterations=iterations)


@functools.lru_cache(maxsize=None)
def _cpu_reference(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    randomize_bn(model)  # non-trivial BN statistics, so a wrong fold would show
    return model


def reference_model(name: str, setting: Setting, submodule: str = "") -> nn.Module:
    """A copy of the (cached) reference model, or one of its blocks, on the setting's device and dtype."""
    module = _cpu_reference(name).get_submodule(submodule) if submodule else _cpu_reference(name)
    return copy.deepcopy(module).to(device=setting.device, dtype=setting.dtype, memory_format=torch.channels_last)


__all__ = ["BLOCK_CASES", "CPU_MODEL", "CPU_SMALL", "GPU_SETTINGS", "PROVIDERS", "RESNET50_CONVS", "Setting",
           "check_close", "compiled", "count_macs", "cudnn_conv_fn", "EagerConvBNAct", "fuse_for_benchmark",
           "fused_backend_skip_reason", "fused_block", "model_runner", "layer_inputs", "model_bytes", "PackedConvBN",
           "random_conv_bn", "reference_model", "run_case", "skip_reason", "split_graphed", "pytest"]
