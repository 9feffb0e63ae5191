"""Training: one train step (forward + backward + SGD) of ResNet-50 and ResNet-18 in train mode, and eval with
autograd on (frozen BatchNorm: fine-tuning a backbone, or `model(x)` without no_grad), eager vs torch.compile vs
fuse_model. extra_info carries the bytes autograd saves during the forward (unique storages, with and without the
parameters), the measure of what training keeps alive between forward and backward.

CPU: fp32, batch 8 at 128x128 (train step), batch 1 and 8 at 224x224 (frozen). GPU: bf16 autocast, batch 256 at
224x224 (train step). `--benchmark-disable` smoke runs use batch 2 at 64x64.
"""

from __future__ import annotations

import time

import pytest
import torch

import resnet_fused as rf
from bench_harness import (BF16, F32, FUSED_BACKENDS, ON_GPU, NO_GPU, Setting, benchmark_disabled, compiled,
                           fuse_for_benchmark, fused_backend_skip_reason)
from resnet_fused.benchmarking.environment import DTYPE_NAMES, environment
from resnet_fused.benchmarking.models import randomize_bn

PROVIDERS = ("eager-nchw", "eager", "torch.compile") + FUSED_BACKENDS
BUILDERS = {"resnet50": rf.resnet50, "resnet18": rf.resnet18}
TRAIN_SETTINGS = [Setting("cpu", F32, 8), Setting("cuda", BF16, 256)]
TRAIN_SIZE = {"cpu": 128, "cuda": 224}
FROZEN_SETTINGS = [Setting("cpu", F32, 1), Setting("cpu", F32, 8)]


def saved_bytes(model, x) -> tuple[int, int]:
    """(all, parameters excluded) bytes of the unique storages autograd saves during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()), sum(n for ptr, n in storages.items() if ptr not in params)


def _skip_reason(provider: str, setting: Setting, quick: bool):
    if setting.device == "cuda" and not ON_GPU:
        return NO_GPU
    if provider == "torch.compile" and quick:
        return "--benchmark-disable smoke run: torch.compile providers are skipped (compile time)"
    return fused_backend_skip_reason(provider, setting.device)


def _model(name: str, provider: str, setting: Setting, train: bool):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    randomize_bn(model)
    model = model.train(train).to(setting.device)
    if provider == "eager-nchw":
        return model, {}
    model = model.to(memory_format=torch.channels_last)
    if provider == "eager":
        return model, {}
    if provider == "torch.compile":
        return compiled(model, provider), {}
    fused, how = fuse_for_benchmark(model, provider)
    return fused.train(train), {"fused_with": how}


def _time(benchmark, request, fn, on_gpu: bool):
    def timed():
        fn()
        if on_gpu:
            torch.cuda.synchronize()

    if benchmark_disabled(request.config):
        return benchmark.pedantic(timed, rounds=1, iterations=1)
    for _ in range(2):  # compile, allocator and oneDNN caches, first-call packs
        timed()
    begin = time.perf_counter()
    timed()
    once = time.perf_counter() - begin
    return benchmark.pedantic(timed, rounds=5 if once < 0.5 else 3, iterations=1)


def _record(benchmark, provider, setting, kind, case, x, extra):
    env = environment(setting.device)
    benchmark.group = f"{kind} {case} | {DTYPE_NAMES[setting.dtype]} b{x.shape[0]} {setting.device}"
    benchmark.extra_info.update(provider=provider, kind=kind, case=case, dtype=DTYPE_NAMES[setting.dtype],
                                batch=x.shape[0], device_name=env["device"], torch=env["torch"], **extra)


def train_step(model_name: str, provider: str, setting: Setting, batch: int, size: int):
    """(step, x, extra_info): one train step (forward, cross-entropy, backward, SGD with momentum) of the model as
    `provider` runs it, with the bytes autograd saves during its forward in extra_info."""
    model, extra = _model(model_name, provider, setting, train=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=setting.device)
    if provider != "eager-nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=setting.device)
    autocast = torch.autocast(setting.device, dtype=setting.dtype, enabled=setting.dtype != F32)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if provider != "torch.compile":  # compiled graphs save what AOTAutograd decides, not countable this way
        with autocast:
            extra["saved_bytes"], extra["saved_activation_bytes"] = saved_bytes(model, x)
    return step, x, extra


def train_case(model_name: str, size: int) -> str:
    return f"{model_name} {size}x{size} train step"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("setting", TRAIN_SETTINGS, ids=lambda s: s.id)
@pytest.mark.parametrize("model_name", ["resnet50", "resnet18"])
def test_train_step(benchmark, request, model_name, setting, provider):
    quick = benchmark_disabled(request.config)
    reason = _skip_reason(provider, setting, quick)
    if reason:
        pytest.skip(reason)
    batch, size = (2, 64) if quick else (setting.batch, TRAIN_SIZE[setting.device])
    step, x, extra = train_step(model_name, provider, setting, batch, size)
    _record(benchmark, provider, setting, "train", train_case(model_name, size), x, extra)
    _time(benchmark, request, step, setting.device == "cuda")


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "torch.compile"])
@pytest.mark.parametrize("setting", FROZEN_SETTINGS, ids=lambda s: s.id)
def test_frozen_bn_forward(benchmark, request, setting, provider):
    """resnet50 in eval mode with autograd on: the forward a fine-tuning step (or a forgotten no_grad) runs."""
    quick = benchmark_disabled(request.config)
    reason = _skip_reason(provider, setting, quick) or (quick and setting.batch > 1 and "smoke run: batch 1 only")
    if reason:
        pytest.skip(reason)
    size = 64 if quick else 224
    model, extra = _model("resnet50", provider, setting, train=False)
    x = torch.randn(setting.batch, 3, size, size, device=setting.device).requires_grad_()
    if provider != "eager-nchw":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    extra["saved_bytes"], extra["saved_activation_bytes"] = saved_bytes(model, x)
    _record(benchmark, provider, setting, "frozen", f"resnet50 {size}x{size} eval forward, autograd on", x, extra)
    _time(benchmark, request, lambda: model(x), setting.device == "cuda")
