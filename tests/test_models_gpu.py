"""Fused models on a CUDA GPU: every GPU backend and dtype against eager, CUDA graphs, torch.compile, and the
torchvision / timm models. The truth is the eager model in fp32 with TF32 off; a fused result must be within
its dtype's tolerance of it, or no further from it than twice eager's own error in that dtype (and precision
mode: eager convolutions use TF32 for fp32 by default, as the fused kernels do)."""

import copy

import pytest
import torch

import resnet_fused as rf
from tests.test_blocks import _randomize_bn, assert_no_worse_than_eager

pytestmark = pytest.mark.gpu

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
GPU_BACKENDS = ["triton", "cuda", "torch"]


def _require(backend):
    reason = rf.available_backends("cuda")[backend] if torch.cuda.is_available() else "no CUDA device"
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def _images(batch=2, size=64, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, device="cuda").to(dtype).contiguous(memory_format=CL)


def _fp32_truth(model, x):
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return model.float()(x.float()).float()


def _check_model(model, backend, dtype, batch=2):
    model = model.eval().cuda()
    x = _images(batch)
    truth = _fp32_truth(copy.deepcopy(model), x)
    fused, report = rf.fuse_model(model, backend=backend)
    assert report.fused, report
    eager = copy.deepcopy(model).to(dtype)
    fused = fused.to(dtype)
    with torch.no_grad():
        expected = eager(x.to(dtype))
        out = fused(x.to(dtype))
    assert out.dtype == dtype and out.device.type == "cuda"
    assert_no_worse_than_eager(out, expected, truth, dtype)
    return fused


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_reference_models_on_gpu(name, backend, dtype):
    _require(backend)
    _check_model(_randomize_bn(getattr(rf, name)(num_classes=10)), backend, dtype)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_batch_one_and_odd_image_size(backend):
    _require(backend)
    model = _randomize_bn(rf.resnet50(num_classes=10)).eval().cuda()
    x = torch.randn(1, 3, 57, 45, device="cuda").to(torch.bfloat16)
    truth = _fp32_truth(copy.deepcopy(model), x)
    fused, _ = rf.fuse_model(model, backend=backend)
    with torch.no_grad():
        expected = copy.deepcopy(model).to(torch.bfloat16)(x)
        out = fused.to(torch.bfloat16)(x)
    assert_no_worse_than_eager(out, expected, truth, torch.bfloat16)


def _fused_resnet18_bf16(backend):
    _require(backend)
    model = _randomize_bn(rf.resnet18(num_classes=10)).eval().cuda().to(torch.bfloat16)
    return rf.fuse_model(model, backend=backend)[0]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_and_replay(backend):
    fused = _fused_resnet18_bf16(backend)
    static_x = _images(1, dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning, folds and packs happen outside the capture
            for _ in range(3):
                fused(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = fused(static_x)
        fresh = _images(1, dtype=torch.bfloat16)
        static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        expected = fused(fresh)
    torch.testing.assert_close(static_y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_torch_compile_of_fused_model(backend):
    fused = _fused_resnet18_bf16(backend)
    x = _images(2, dtype=torch.bfloat16)
    compiled = torch.compile(fused)
    with torch.no_grad():
        expected = fused(x)
        out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
def test_torchvision_models_on_gpu(name, dtype):
    models = pytest.importorskip("torchvision.models")
    _check_model(_randomize_bn(getattr(models, name)(num_classes=10)), "auto", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["resnet50", "resnet50d", "seresnet50"])
def test_timm_models_on_gpu(name, dtype):
    timm = pytest.importorskip("timm")
    _check_model(_randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)), "auto", dtype)
