"""fuse_model in a process with threads: several fusings at once, beside a thread serving inference on another
model. Every fusing must give what a serial one gives, the serving thread must never notice, and nn.Module must be
as it was afterwards (torch.fx's own tracer patches nn.Module.__call__/__getattr__ for every thread)."""

import sys
import threading

import torch
from torch import nn

import resnet_fused as rf
from tests.test_blocks import _randomize_bn
from tests.test_fuse_model import _user_model

_MODULE_ATTRIBUTES = ("__call__", "__getattr__", "__setattr__", "_call_impl", "_wrapped_call_impl")


def _models():
    """Models that take every path of the analysis: reference blocks and chains, users' variants, blocks left as
    they are (SE), an untraceable parent (read from its bytecode); each twice, as separate objects."""
    return [model for _ in range(2) for model in (_randomize_bn(rf.resnet18(num_classes=10)),
                                                  _randomize_bn(rf.resnet50(num_classes=10)), _user_model())]


def _fuse_and_run(model, x):
    fused, report = rf.fuse_model(model.eval())
    traced = [name for m in (model, fused) for name, sub in m.named_modules()
              if {"_compiled_call_impl", "forward"} & set(sub.__dict__)]
    assert not traced, f"the trace left its per-instance hooks on {traced}"
    with torch.no_grad():
        return str(report), fused.eval()(x)


def test_concurrent_fusing_beside_inference_equals_serial():
    x = torch.randn(2, 3, 32, 32)
    models = _models()
    serial = [_fuse_and_run(m, x) for m in models]
    assert "bottleneck" in serial[1][0] and "left" in serial[2][0]
    before = {name: nn.Module.__dict__[name] for name in _MODULE_ATTRIBUTES}

    served = _randomize_bn(rf.resnet18(num_classes=10)).eval()
    with torch.no_grad():
        served_expected = served(x)
    stop, errors, served_runs = threading.Event(), [], []

    def serve():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    out = served(x)  # the same model, the same numbers: only a change of reduction order may differ
                    served_runs.append(torch.allclose(out, served_expected, rtol=1e-5, atol=1e-6))
        except Exception as error:  # noqa: BLE001 - any failure of the serving thread fails the test
            errors.append(("serving", repr(error)))

    results = [None] * len(models)
    start = threading.Barrier(len(models))

    def fuse(index):
        try:
            start.wait()
            results[index] = _fuse_and_run(models[index], x)
        except Exception as error:  # noqa: BLE001
            errors.append((f"fuse {index}", repr(error)))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: the races need interleaving inside the traces
    server = threading.Thread(target=serve)
    workers = [threading.Thread(target=fuse, args=(i,)) for i in range(len(models))]
    try:
        server.start()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
    finally:
        stop.set()
        server.join(timeout=60)
        sys.setswitchinterval(switch)

    assert not errors, errors
    assert served_runs and all(served_runs), f"{served_runs.count(False)} of {len(served_runs)} served outputs differ"
    for (report, out), (serial_report, serial_out) in zip(results, serial):
        assert report == serial_report  # the same blocks and chains fused, the same reasons
        torch.testing.assert_close(out, serial_out, rtol=1e-5, atol=1e-6)
    assert {name: nn.Module.__dict__[name] for name in _MODULE_ATTRIBUTES} == before
    module = nn.Linear(2, 2)  # and a module call after it works as before
    torch.testing.assert_close(module(torch.ones(1, 2)), module.weight.sum(1)[None] + module.bias)


def test_while_torch_fx_patches_nn_module_nothing_is_fused_and_the_report_says_why(monkeypatch):
    """torch.fx.symbolic_trace in another thread patches nn.Module.__call__ for every thread: calls would go to its
    tracer, so fuse_model proves nothing meanwhile, and says so."""
    model = _randomize_bn(rf.resnet18(num_classes=10)).eval()
    original = nn.Module.__call__
    monkeypatch.setattr(nn.Module, "__call__", lambda self, *args, **kwargs: original(self, *args, **kwargs))
    fused, report = rf.fuse_model(model)
    assert not report.fused and "nn.Module.__call__ or __getattr__ is patched" in report.left[0].reason
    monkeypatch.undo()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))
