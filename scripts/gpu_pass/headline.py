"""The headline: resnet50 bf16 at 224x224, fused against eager and the baselines, timed side by side.

    python -m scripts.gpu_pass.headline --mode main|followup --out headline.json --bench-out headline.bench.json

main:     batch 256: eager (channels_last), cudnn (every conv-BN-ReLU and conv-BN-add-ReLU as cuDNN's fused
          inference op), triton, cuda (fuse_model); batch 1: eager, triton, cuda, each also through CUDA graphs
          (rf.cuda_graphed); then, when the step's time allows, torch.compile at batch 256 beside the others.
followup: batch 256: eager, cudnn (and triton, cuda with --with-fused: a warm machine) and
          torch.compile(mode="max-autotune"), then default torch.compile when the time allows.
Each provider is warmed up (compile, autotune, graph capture), checked against eager (max relative error, the
demo's tolerance), then all are timed in interleaved rounds. cuDNN's autotuner is on (cudnn.benchmark), for the
strongest eager baseline. The roofline bound is the sum over the model's convs of max(FLOPs / peak FLOP/s,
fused bytes / peak bandwidth), peaks measured on this GPU. The JSON files are rewritten after each phase, so a
step cut short by its timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

IMAGE_SIZE = 224
COMPILE_NEEDS_S = 110     # a torch.compile of resnet50 at batch 256 plus its timing, with margin
ROUNDS = {256: 10, 1: 20}


class Headline:
    """The providers of one device, built once and timed in phases; records and writes the results."""

    def __init__(self, out: Path, bench_out: Path, deadline: float, device: str = "cuda",
                 image_size: int = IMAGE_SIZE):
        import torch

        from resnet_fused.benchmarking.environment import environment
        from resnet_fused.benchmarking.models import for_inference, reference_model

        self.out, self.bench_out, self.deadline = out, bench_out, deadline
        self.device, self.image_size = device, image_size
        self.case = f"resnet50 {image_size}x{image_size}"
        torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        self.env = environment(device)
        self.model = for_inference(reference_model("resnet50"), device, torch.bfloat16)
        self.record = {"settings": {}, "notes": []}
        self.benchmarks = []
        self.modules = {}  # provider -> (module, how): built and warmed once, reused by a later phase
        self.peak = None

    def left(self) -> float:
        return self.deadline - time.time()

    def build(self, provider: str):
        """(callable module, how) for one provider, or raise with the reason it cannot run here."""
        if provider not in self.modules:
            self.modules[provider] = self._build(provider)
        return self.modules[provider]

    def _build(self, provider: str):
        import torch

        import resnet_fused as rf
        from resnet_fused.benchmarking.fusing import fuse_for_benchmark

        from .cudnn_model import cudnn_resnet

        base, _, graphed = provider.partition("+")
        if graphed:  # the same fused or eager module, replayed through CUDA graphs
            module, how = self.build(base)
            return rf.cuda_graphed(module), how + ", rf.cuda_graphed"
        if base == "eager":
            return self.model, "reference modules, channels_last"
        if base == "cudnn":
            return cudnn_resnet(self.model), "torch.cudnn_convolution_relu/_add_relu on folded weights"
        if base.startswith("torch.compile"):
            mode = "max-autotune" if base.endswith("max-autotune") else None
            return torch.compile(self.model, mode=mode, dynamic=False), f"torch.compile(mode={mode!r})"
        reason = rf.available_backends(self.device).get(base, "not registered")
        if reason:
            raise RuntimeError(f"backend {base!r} unavailable: {reason}")
        return fuse_for_benchmark(self.model, base)

    def run(self, batch: int, providers, phase: str) -> None:
        """Build, warm up and check every provider, then time them side by side; record and write."""
        import torch

        from resnet_fused.benchmarking.models import REL_TOL, make_images

        from .sidebyside import time_side_by_side, warm_and_check

        x = make_images(batch, self.image_size, self.device, torch.bfloat16)
        setting = self.record["settings"].setdefault(f"b{batch}", {"providers": {}})
        infos = setting["providers"]

        def builder(provider):
            def build():
                module, how = self.build(provider)
                infos.setdefault(provider, {})["how"] = how
                return lambda: module(x)
            return build

        with torch.inference_mode():
            reference = self.model(x).float()
            fns = warm_and_check({p: builder(p) for p in providers}, reference, REL_TOL[torch.bfloat16], infos,
                                 calls=4)
            if not fns:
                return
            samples, reps = time_side_by_side(fns, ROUNDS.get(batch, 3), self.deadline - 5, self.device)
        self._record_timings(batch, setting, samples, reps, phase)

    def _record_timings(self, batch, setting, samples, reps, phase) -> None:
        import statistics

        from .benchjson import entry, group_name

        group = group_name("model", self.case, "bf16", batch, self.device)
        bound = self.roofline_bound(batch)
        setting.update(group=group, roofline_bound_s=bound)
        for provider, times in samples.items():
            median = statistics.median(times)
            setting["providers"][provider].update(median_s=median, rounds=len(times), phase=phase,
                                                  percent_of_roofline=100 * bound / median)
            extra = dict(kind="model", case=self.case, dtype="bf16", batch=batch,
                         device_name=self.env["device"], torch=self.env["torch"], triton=self.env["triton"],
                         cuda=self.env["cuda"], cudnn=self.env["cudnn"], image_size=self.image_size,
                         cudnn_benchmark=True, roofline_bound_s=bound, **{
                             k: setting["providers"][provider].get(k) for k in ("how", "rel_err", "warmup_s")})
            self.benchmarks = [b for b in self.benchmarks
                               if not (b["group"] == group and b["extra_info"]["provider"] == provider)]
            self.benchmarks.append(entry(group, provider, times, reps[provider], extra))
        self.write()

    def roofline_bound(self, batch: int) -> float:
        import torch

        from resnet_fused.benchmarking.roofline import bound_seconds, device_peak

        from .workload import resnet50_layers

        if self.peak is None:
            self.peak = device_peak(self.device, torch.bfloat16)
            self.record["peak"] = {"flops_per_s": self.peak.flops_per_s, "bytes_per_s": self.peak.bytes_per_s}
        return sum(layer.count * bound_seconds(layer.flops(batch), layer.bytes_fused(batch, 2), self.peak)
                   for layer in resnet50_layers())

    def interrupted(self) -> None:
        """The step's timeout came: mark the providers it caught before they were timed."""
        self.record["notes"].append(f"interrupted by the step's timeout ({self.left():.0f} s left)")
        for setting in self.record["settings"].values():
            for info in setting["providers"].values():
                if "median_s" not in info and info.get("status") in (None, "ok", "wrong output"):
                    info.update(status="interrupted", message="the step's timeout came before it was timed")

    def write(self) -> None:
        from .benchjson import document

        self.record["seconds_left"] = round(self.left(), 1)
        for path, data in ((self.out, self.record), (self.bench_out, document(self.benchmarks, self.env))):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("main", "followup"), required=True)
    parser.add_argument("--with-fused", action="store_true", help="followup: time triton and cuda again too")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bench-out", type=Path, required=True)
    args = parser.parse_args(argv)
    deadline = float(os.environ.get("GPU_PASS_DEADLINE", time.time() + 3600))
    headline = Headline(args.out, args.bench_out, deadline)
    if args.mode == "main":
        b256 = ["eager", "cudnn", "triton", "cuda"]
        phases = [(256, b256, 0), (1, [p + g for p in ("eager", "triton", "cuda") for g in ("", "+cudagraph")], 0),
                  (256, b256 + ["torch.compile"], COMPILE_NEEDS_S)]
    else:  # max-autotune first: it is the goal's baseline, and it compiles for minutes
        b256 = ["eager", "cudnn"] + (["triton", "cuda"] if args.with_fused else [])
        phases = [(256, b256 + ["torch.compile-max-autotune"], 0),
                  (256, b256 + ["torch.compile-max-autotune", "torch.compile"], COMPILE_NEEDS_S)]
    try:
        for batch, providers, needs_s in phases:
            if headline.left() < needs_s:
                headline.record["notes"].append(f"{providers[-1]} not run: {headline.left():.0f} s were left of the "
                                                f"step, it needs about {needs_s} s")
                continue
            headline.run(batch, providers, args.mode)
    except KeyboardInterrupt:
        headline.interrupted()
    headline.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
