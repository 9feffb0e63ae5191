"""The CPU inference engines a user would compare with: ONNX Runtime and OpenVINO, run on the same model.

Both are optional (`pip install .[peers]`: onnx for torch.onnx's exporter, onnxruntime, openvino). The model is
exported once to ONNX, and both engines load that file, so they run exactly the weights that eager and the fused
model run. Each engine gets as many threads as torch has (torch.get_num_threads()), in latency mode (one stream,
one inference at a time).

Precision: fp32 runs fp32 everywhere (OpenVINO would otherwise pick bf16 on its own on CPUs with AVX512-BF16 or
AMX). For bf16, OpenVINO runs its bf16 inference precision on the fp32 model; ONNX Runtime's CPU provider has no
bf16 convolution, so it is skipped there.
"""

from __future__ import annotations

import copy
import importlib
import os
import tempfile
import warnings
from typing import Callable, Optional

import torch
from torch import nn

PEERS = ("onnxruntime", "openvino")
_NEEDS = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}
_OPENVINO_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16"}


def peer_skip_reason(provider: str, dtype: torch.dtype, device: str) -> Optional[str]:
    """Why this peer does not run here (None: it runs)."""
    if device != "cpu":
        return f"{provider} is benchmarked as a CPU inference engine"
    if provider == "onnxruntime" and dtype != torch.float32:
        return "ONNX Runtime's CPU execution provider has no bf16/fp16 convolution kernels"
    if provider == "openvino" and dtype not in _OPENVINO_PRECISION:
        return f"OpenVINO's CPU plugin has no {dtype} inference precision"
    for module in _NEEDS[provider]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} is not installed ({exc}); `pip install .[peers]` adds the peer engines"
    return None


def export_onnx(model: nn.Module, x: torch.Tensor, path: str) -> None:
    """The fp32 model as ONNX, batch size dynamic (`model` itself is left as it is)."""
    model = copy.deepcopy(model).float()
    # The TorchScript exporter warns that it is deprecated; the dynamo one would need onnxscript too.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x.float().contiguous(),), path, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def peer_runner(provider: str, model: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function that runs `model` on `x` in the peer engine and returns its output as an fp32 torch tensor.
    `x`'s dtype picks the precision (fp32, or bf16 for OpenVINO); the engine is fed x as fp32 NCHW."""
    threads = torch.get_num_threads()
    feed = x.float().contiguous().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, x, path)
        if provider == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            return lambda: torch.from_numpy(session.run(None, {"x": feed})[0])
        if provider == "openvino":
            import openvino as ov

            compiled = ov.Core().compile_model(path, "CPU", {
                "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[x.dtype]})
            request = compiled.create_infer_request()
            return lambda: torch.from_numpy(request.infer({0: feed})[0].copy())
    raise ValueError(f"unknown peer {provider!r}; expected one of {PEERS}")
