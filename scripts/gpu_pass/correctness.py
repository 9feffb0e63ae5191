"""The correctness driver: each backend's fused ops against the fp32 "torch" oracle, case by case, with counts.

    python -m scripts.gpu_pass.correctness --device cuda --backends triton,cuda --out results.json
    python -m scripts.gpu_pass.correctness --device cpu --backends torch,cpu,triton --out results.json

The cases come from workload.py (on the CPU: the test suite's small shapes, Triton in the interpreter), the
oracle and the tolerances from tests/oracle.py: |actual - expected| <= atol + rtol * max|expected|, fp32 inputs
through TF32 held to the "tf32" tolerance. Triton calls with a forced config or split launch the kernel
directly (conv_bn_act.conv_bn_act(config=...)); the others go through the public ops, as models call them.
`--set memcheck|racecheck` runs the sanitizer subsets, with the oracle on the CPU (`--reference cpu`), so that
the sanitizer checks our kernels and not cuDNN's.

Every case ends as pass, fail (a wrong value, dtype or layout) or error (an exception); a backend that is not
available here is recorded with its reason. The JSON is rewritten as cases finish, so a run cut short by its
timeout (SIGINT) still says what ran; cases not reached are counted as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BACKENDS = ("triton", "cuda", "cpu", "torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--backends", default="triton,cuda", help="comma-separated, of " + ", ".join(BACKENDS))
    parser.add_argument("--set", dest="case_set", choices=("full", "memcheck", "racecheck"), default="full")
    parser.add_argument("--reference", choices=("device", "cpu"), default="device",
                        help="where the fp32 oracle runs (cpu: keeps cuDNN out of a sanitizer run)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (rewritten as cases finish)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        parser.error(f"--backends: unknown {unknown}; expected some of {list(BACKENDS)}")
    return args


def cases(backends, device: str, case_set: str):
    """[(backend, call)] in run order: each backend's calls in workload order (cheap and broad first), the
    backends interleaved in proportion, so a run cut short has covered every backend alike."""
    from . import workload

    per_backend = {b: (workload.correctness_calls(b, device) if case_set == "full"
                       else workload.sanitizer_calls(b, case_set)) for b in backends}
    ordered = [(i / len(calls), n, backend, call) for n, (backend, calls) in enumerate(per_backend.items())
               for i, call in enumerate(calls)]
    return [(backend, call) for _, _, backend, call in sorted(ordered, key=lambda t: (t[0], t[1]))]


def availability(backend: str, device: str):
    """None if `backend` runs on `device` here, else why not."""
    import resnet_fused as rf

    return rf.available_backends(device).get(backend, "not registered")


def _tolerance(dtype, device: str, call):
    import torch

    if dtype == torch.float32 and device == "cuda" and getattr(call, "precision", "tf32") != "ieee":
        return "tf32"
    return dtype


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def check(backend: str, call, device: str, reference: str) -> None:
    """Run one call on `backend` and compare with the oracle; raises AssertionError on a mismatch."""
    import torch

    import resnet_fused as rf
    from resnet_fused.benchmarking.environment import DTYPES
    from tests.oracle import assert_matches, make_conv_inputs, ref_add_relu, ref_bn_act, ref_conv_bn_act

    dtype = DTYPES[call.dtype]
    ref_device = device if reference == "device" else "cpu"
    if call.op == "conv_bn_act":
        x, w, scale, shift, res, stride, padding = make_conv_inputs(call.shape.as_case(), dtype, device,
                                                                    call.residual, channels_last=True)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=call.precision != "ieee"):
            y = _conv(backend, call, x, w, scale, shift, res, stride, padding)
        expected = ref_conv_bn_act(*_on(ref_device, x, w, scale, shift, res), stride, padding, call.relu)
    else:
        x = torch.randn(call.shape, device=device).to(dtype)
        res = torch.randn(call.shape, device=device).to(dtype) if call.residual or call.op == "add_relu" else None
        if call.op == "add_relu":
            y = rf.add_relu(x, res, backend=backend)
            expected = ref_add_relu(*_on(ref_device, x, res))
        else:
            scale, shift = torch.randn(call.shape[1], device=device), torch.randn(call.shape[1], device=device)
            y = rf.bn_act(x, scale, shift, res, relu=call.relu, backend=backend)
            expected = ref_bn_act(*_on(ref_device, x, scale, shift, res), call.relu)
    assert y.dtype == dtype, f"output dtype {y.dtype}, expected {dtype}"
    assert y.is_contiguous(memory_format=torch.channels_last), "the output is not channels_last"
    assert_matches(y.to(ref_device), expected, _tolerance(dtype, device, call))


def _conv(backend, call, x, w, scale, shift, res, stride, padding):
    import torch

    import resnet_fused as rf

    if backend == "triton" and (call.config or call.split_k):
        from resnet_fused.kernels.triton import conv_bn_act as conv_kernel

        from .compiles import config_by_label

        config = config_by_label(call.config) if call.config else None
        k = call.shape.kernel
        out = torch.empty(rf.ops.conv_output_shape(x.shape, w.shape[0], k, stride, padding), dtype=x.dtype,
                          device=x.device, memory_format=torch.channels_last)
        return conv_kernel.conv_bn_act(x, conv_kernel.pack_weight(w), scale.float(), shift.float(), res, out, k, k,
                                       stride, padding, call.relu, split_k=call.split_k, config=config)
    return rf.conv_bn_act(x, w, scale, shift, res, stride=stride, padding=padding, relu=call.relu, backend=backend)


def run(backends, device: str, case_set: str, reference: str, out: Path, checker=check) -> dict:
    """Run every case, writing `out` as it goes; returns the final record."""
    import torch

    record = {"device": device, "set": case_set, "reference": reference, "finished": False, "seconds": 0.0,
              "backends": {}, "cases": []}
    if device == "cuda":
        record["device_name"] = torch.cuda.get_device_name()
    for backend in backends:
        reason = availability(backend, device)
        record["backends"][backend] = {"available": reason is None, "reason": reason}
    todo = cases(backends, device, case_set)
    begin = last_write = time.monotonic()
    done = 0
    try:
        for backend, call in todo:
            entry = {"backend": backend, "op": call.op, "dtype": call.dtype, "id": call.id}
            if not record["backends"][backend]["available"]:
                entry.update(status="skipped", message=record["backends"][backend]["reason"])
            else:
                start = time.monotonic()
                try:
                    checker(backend, call, device, reference)
                    entry["status"] = "pass"
                except AssertionError as exc:
                    entry.update(status="fail", message=str(exc).splitlines()[0][:300])
                except Exception as exc:  # noqa: BLE001  a crash is a result too; the next case runs
                    entry.update(status="error", message=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                                 if str(exc) else type(exc).__name__)
                entry["seconds"] = round(time.monotonic() - start, 4)
            record["cases"].append(entry)
            done += 1
            if entry["status"] in ("fail", "error"):
                print(f"{entry['status'].upper()} {backend} {call.id}: {entry.get('message')}", flush=True)
            if time.monotonic() - last_write > 5:
                _write(record, todo[done:], begin, out)
                last_write = time.monotonic()
        if device == "cuda":
            torch.cuda.synchronize()  # an asynchronous launch failure surfaces here, not as a silent pass
        record["finished"] = True
    except KeyboardInterrupt:  # the step's timeout: say what did not run
        print(f"interrupted after {done} of {len(todo)} cases", flush=True)
    _write(record, todo[done:], begin, out)
    return record


def _write(record: dict, not_run, begin: float, out: Path) -> None:
    record["seconds"] = round(time.monotonic() - begin, 2)
    record["not_run"] = [{"backend": b, "op": c.op, "dtype": c.dtype, "id": c.id} for b, c in not_run]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)


def counts(record: dict) -> dict:
    """{(backend, dtype): {status: n}} over the cases, not-run ones included."""
    table: dict = {}
    for entry in record["cases"] + [dict(e, status="not run") for e in record.get("not_run", [])]:
        cell = table.setdefault((entry["backend"], entry["dtype"]), {})
        cell[entry["status"]] = cell.get(entry["status"], 0) + 1
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA GPU here")
    torch.manual_seed(0)
    record = run(args.backends, args.device, args.case_set, args.reference, args.out)
    for (backend, dtype), cell in sorted(counts(record).items()):
        print(f"{backend:<7} {dtype:<5} " + ", ".join(f"{n} {status}" for status, n in sorted(cell.items())))
    bad = sum(1 for e in record["cases"] if e["status"] in ("fail", "error"))
    return 1 if bad or not record["finished"] else 0


if __name__ == "__main__":
    sys.exit(main())
