"""The GPU pass (scripts/gpu_validate.sh, scripts/gpu_pass/) on a machine without a GPU: its plan fits the window,
its compile counts follow the kernel's own prune, its correctness driver counts right (and catches a wrong
backend), its summary says what ran and what did not, and the script's main command runs end to end, every GPU
step failing cleanly, leaving at most 8 files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_validate.sh"

pytest.importorskip("triton")
pytest.importorskip("pytest_benchmark")

from scripts.gpu_pass import (benchjson, compiles, correctness, sidebyside, steps, summary, train,  # noqa: E402
                              warmup, workload)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return dict(env, PYTHON=sys.executable, **extra)


# --- the plan -----------------------------------------------------------------------------------------------

def test_plan_fits_one_window_and_eight_files():
    run = subprocess.run(["bash", str(SCRIPT), "--plan"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"budget (\d+) s, (\d+) files", last)
    assert match, last
    assert int(match.group(1)) <= steps.WINDOW_S and int(match.group(2)) <= steps.MAX_FILES
    assert int(match.group(1)) == sum(steps.command_budget(c) for c in steps.COMMAND_LIMITS)
    for step in steps.STEPS:
        assert re.search(rf"^{step.command}\s+{step.name}\s", run.stdout, re.M), step


@pytest.mark.parametrize("change", ["budget", "files"])
def test_plan_fails_past_the_window_or_the_file_limit(monkeypatch, capsys, change):
    from scripts.gpu_pass import plan

    if change == "budget":
        longer = [s if s.name != "correctness" else steps.Step(s.command, s.name, 400, s.what) for s in steps.STEPS]
        monkeypatch.setattr(steps, "STEPS", longer)
    else:
        monkeypatch.setattr(plan, "OUTPUTS", {f"f{i}": "" for i in range(steps.MAX_FILES + 1)})
    assert plan.main() == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("budget ")


def test_every_step_the_script_runs_has_a_budget():
    text = SCRIPT.read_text()
    run = set(re.findall(r"run_step (\w+)", text)) - {"name"}
    assert run == {step.name for step in steps.STEPS}
    for command in steps.COMMAND_LIMITS:
        assert steps.command_budget(command) <= steps.COMMAND_LIMITS[command]
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.parametrize("limit,elapsed,elastic,expected", [
    (540, 0, 0, 80),     # the budget
    (100, 0, 0, 80),     # finalize's 20 s still fit beside it
    (60, 0, 0, 40),      # a lower limit cuts this step, keeping finalize's 20 s
    (540, 0, 1, 480),    # elastic: all that the later steps' 60 s leave
    (100, 0, 1, 70),     # elastic, short of time: never less than a plain step would get
    (540, 530, 0, -10),  # nothing left: the script skips the step
])
def test_step_timeouts_keep_priority_order(limit, elapsed, elastic, expected):
    text = SCRIPT.read_text()
    function = text[text.index("step_timeout() {"):text.index("\n}\n", text.index("step_timeout() {")) + 3]
    script = (f"{function}\nLIMIT={limit}; BEGIN=$((SECONDS - {elapsed})); BUDGET_x={70 if elastic else 80}; "
              f"AFTER_x=60; ELASTIC_x={elastic}; BUDGET_finalize=20\nstep_timeout x")
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert run.stdout.strip() == str(expected), run.stderr


# --- compile accounting -------------------------------------------------------------------------------------

def test_int_specialization_is_tritons():
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    for value in (1, 2, 15, 16, 48, 49, 3136, 802816):
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        assert compiles.int_spec(value) == ("1" if kind == "constexpr" else key), value


def test_compiles_follow_the_kernels_prune_and_split_choice():
    from resnet_fused.kernels.triton import tuning

    layer = {layer.name: layer for layer in workload.resnet50_layers()}["layer4.1.conv2"]
    call = workload.ConvCall(workload.layer_shape(layer, 1), "bf16", False, True)
    candidates = tuning.prune(compiles.gpu_configs(), {"M": 49, "Cout": 512, "Cin": 512}, FLAT_K=False, KH=3, KW=3)
    assert compiles.candidate_configs(call) == candidates
    split = tuning.split_k_candidate(49, 512, 512 * 9, compiles.SM_COUNT)
    assert split == 16 == compiles.split_candidate(call)
    triggered = compiles.call_compiles(call)
    assert len(triggered) == 2 * len(candidates) + 1  # every candidate unsplit and split, and the split epilogue
    forced = compiles.call_compiles(workload.ConvCall(call.shape, "bf16", False, True, config="32x64x64w4s4",
                                                      split_k=1))
    assert [c.kernel for c in forced] == ["conv_bn_act"]
    other_dtype = compiles.call_compiles(workload.ConvCall(call.shape, "fp16", False, True))
    assert not {c.key for c in other_dtype} & {c.key for c in triggered}


def test_every_config_is_forced_on_three_shapes_in_every_dtype():
    coverage = compiles.config_coverage(workload.forced_triton_calls("cuda"))
    for dtype in workload.DTYPES:
        for config in compiles.gpu_configs():
            assert coverage.get((dtype, compiles.config_label(config)), 0) >= compiles.MIN_SHAPES_PER_CONFIG


def test_the_warmup_compiles_everything_the_later_steps_launch():
    from scripts.gpu_pass import plan

    jobs = warmup.jobs()
    made = jobs + [c for call in {j.call for j in jobs} for c in compiles.call_compiles(call)
                   if c.kernel in compiles.SECONDARY]
    for step_name, calls in plan.step_calls().items():
        assert compiles.distinct_compiles(calls, already=made) == [], step_name
    assert all(job.config or job.kernel != "conv_bn_act" for job in jobs)  # each job compiles one config


def test_train_calls_follow_the_triton_training_path():
    """per distinct ResNet-50 conv: the conv with the statistics epilogue (autotuned, never split, plus the
    statistics' combine), then BatchNorm apply and backward on its output with the conv's role"""
    layers = workload.resnet50_layers()
    calls = workload.train_calls(256, "bf16")
    assert len(calls) == 3 * len(layers)
    for layer, (conv, apply, backward) in zip(layers, zip(calls[0::3], calls[1::3], calls[2::3])):
        assert conv.stats and not (conv.residual or conv.relu) and conv.config is None
        out = (256, conv.shape.cout, conv.shape.ho, conv.shape.wo)
        assert (apply.op, apply.shape, apply.residual, apply.relu) == ("apply", out, layer.residual, layer.relu)
        assert (backward.op, backward.shape, backward.relu) == ("backward", out, layer.relu)
    stats = compiles.call_compiles(calls[0])
    assert [c.kernel for c in stats] == ["conv_bn_act"] * len(compiles.candidate_configs(calls[0])) + \
        ["bn_stats_combine"]
    assert all(c.split == 1 for c in stats)
    plain = compiles.call_compiles(workload.ConvCall(calls[0].shape, "bf16", False, False))
    assert not {c.key for c in stats} & {c.key for c in plain}  # STATS is a constexpr: its own binaries
    assert [c.kernel for c in compiles.call_compiles(calls[2])] == ["bn_backward_partials", "bn_sum_partials",
                                                                     "bn_grad_input"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the warm-up launches on uninitialized memory
@pytest.mark.parametrize("residual", [False, True])
def test_warmup_launches_the_training_jobs(residual):
    """the warm-up's launch of a train job runs the kernels it stands for (here in the interpreter, which runs
    instead of compiling): the statistics conv with its forced config, and both BatchNorm passes"""
    shape = workload.ConvShape("tiny", 2, 8, 5, 5, 16, 3, 1, 1)
    conv = workload.ConvCall(shape, "fp32", False, False, config="32x64x64w4s4", stats=True)
    jobs = [compiles.Compile("conv_bn_act", (), conv, conv.config)]
    jobs += [compiles.Compile("bn_" + op, (), workload.BatchNormCall(op, (2, 16, 5, 5), "fp32", residual, True))
             for op in ("apply", "backward")]
    for job in jobs:
        warmup.launch(job, device="cpu")
    with pytest.raises(Exception, match="32x64x64w4s4|no Triton conv config"):
        warmup.launch(compiles.Compile("conv_bn_act", (), conv, "nonexistent"), device="cpu")


def test_forced_config_reaches_the_kernel():
    # a tile the kernel's static_assert refuses (BLOCK_M < 16) fails only if the forced config is launched
    import triton

    from resnet_fused.kernels.triton import conv_bn_act as conv_kernel
    from resnet_fused.ops import conv_output_shape
    from tests.oracle import CONV_CASES, make_conv_inputs

    x, w, scale, shift, res, stride, padding = make_conv_inputs(CONV_CASES[2], torch.float32)
    bad = triton.Config({"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=1)
    out = torch.empty(conv_output_shape(x.shape, w.shape[0], 3, stride, padding), memory_format=torch.channels_last)
    args = (x, conv_kernel.pack_weight(w), scale, shift, res, out, 3, 3, stride, padding, True)
    conv_kernel.conv_bn_act(*args, config=compiles.config_by_label("32x64x64w4s4"))
    with pytest.raises(Exception, match="BLOCK_M must be >= 16"):
        conv_kernel.conv_bn_act(*args, config=bad)


def test_compile_only_mode_compiles_instead_of_launching(tmp_path):
    # in a process without the interpreter: a JIT kernel's launch becomes its warmup (compile, no launch), and
    # the binary is loaded (which builds its launcher stub)
    script = tmp_path / "compile_only.py"  # triton.jit needs its kernel's source in a file
    script.write_text(textwrap.dedent("""
        import json
        import triton, triton.language as tl
        from triton.runtime.jit import KernelInterface
        from scripts.gpu_pass.warmup import compile_only

        @triton.jit
        def kernel(x_ptr, BLOCK: tl.constexpr):
            pass

        seen = []

        class Binary:
            def _init_handles(self):
                seen.append("loaded")

        kernel.run = lambda *args, **kwargs: seen.append(kwargs["warmup"]) or Binary()
        with compile_only():
            kernel[(1,)](0, BLOCK=16)
        kernel[(1,)](0, BLOCK=16)
        print(json.dumps([seen, KernelInterface.__getitem__.__name__]))
    """))
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [[True, "loaded", False], "__getitem__"]


def _fake_job(job):
    return {"kernel": job.kernel, "call": job.call.id, "config": job.config, "split": job.split, "seconds": 0.0,
            "error": "planted" if job.config == "32x64x64w4s4" else None}


def _no_init():
    pass


def test_warmup_runs_its_jobs_on_worker_processes(tmp_path):
    jobs = warmup.jobs()[:12]
    record = warmup.run(jobs, 2, tmp_path / "warmup.json", run_job=_fake_job, initializer=_no_init)
    assert record["finished"] and len(record["done"]) == 12
    assert json.loads((tmp_path / "warmup.json").read_text())["errors"] == \
        sum(job.config == "32x64x64w4s4" for job in jobs)


# --- the correctness driver on the CPU ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """(exit status, results file) of the driver's CPU mode over every backend that runs here."""
    out = tmp_path_factory.mktemp("driver") / "correctness.json"
    return correctness.main(["--device", "cpu", "--backends", "torch,cpu,triton", "--out", str(out)]), out


def test_driver_runs_every_backend_and_dtype_on_the_cpu(cpu_run):
    rc, out = cpu_run
    record = json.loads(out.read_text())
    assert rc == 0 and record["finished"] and not record["not_run"]
    table = correctness.counts(record)
    for backend in ("torch", "cpu", "triton"):
        expected = len(workload.correctness_calls(backend, "cpu"))
        available = record["backends"][backend]["available"]
        cells = [table[(backend, dtype)] for dtype in workload.DTYPES]
        assert sum(sum(cell.values()) for cell in cells) == expected
        assert all(set(cell) == ({"pass"} if available else {"skipped"}) for cell in cells), (backend, cells)
    assert record["backends"]["torch"]["available"] and record["backends"]["triton"]["available"]


def test_driver_reports_wrong_results_errors_and_what_a_timeout_left(monkeypatch, tmp_path):
    import resnet_fused as rf

    real = rf.conv_bn_act

    def off_by_a_little(x, *args, **kwargs):
        y = real(x, *args, **kwargs)
        if x.shape[1] in (1, 3):  # the stems: crash instead
            raise RuntimeError("planted crash")
        return y + 1.0

    monkeypatch.setattr(rf, "conv_bn_act", off_by_a_little)
    record = correctness.run(["torch"], "cpu", "full", "device", tmp_path / "r.json")
    convs = [e for e in record["cases"] if e["op"] == "conv_bn_act"]
    assert convs and all(e["status"] in ("fail", "error") for e in convs)
    assert {e["status"] for e in convs if "stem" in e["id"]} == {"error"}
    assert all(e["status"] == "pass" for e in record["cases"] if e["op"] != "conv_bn_act")

    calls = []

    def interrupted(backend, call, device, reference):
        calls.append(call)
        if len(calls) == 5:
            raise KeyboardInterrupt

    record = correctness.run(["torch"], "cpu", "full", "device", tmp_path / "r.json", checker=interrupted)
    assert not record["finished"] and len(record["cases"]) == 4
    assert len(record["not_run"]) == len(workload.correctness_calls("torch", "cpu")) - 4
    assert json.loads((tmp_path / "r.json").read_text())["not_run"] == record["not_run"]


# --- the cuDNN baseline and the timed steps, on the CPU with stand-ins for cuDNN's GPU-only ops ---------------

@pytest.fixture
def cudnn_stand_ins(monkeypatch):
    """torch.cudnn_convolution_relu / _add_relu as their documented math on any device; returns the calls."""
    used = []

    def conv(x, w, b, stride, padding, dilation, groups):
        return torch.nn.functional.conv2d(x, w, b, stride, padding, dilation, groups)

    def relu(x, w, b, *args):
        used.append("relu")
        return torch.relu(conv(x, w, b, *args))

    def add_relu(x, w, z, alpha, b, *args):
        used.append("add_relu")
        return torch.relu(conv(x, w, b, *args) + alpha * z)

    monkeypatch.setattr(torch, "cudnn_convolution_relu", relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", add_relu)
    return used


def test_cudnn_resnet_runs_every_conv_through_cudnns_fused_ops(cudnn_stand_ins):
    import resnet_fused as rf
    from resnet_fused.benchmarking.models import randomize_bn
    from scripts.gpu_pass.cudnn_model import cudnn_resnet

    model = rf.resnet50().eval()
    randomize_bn(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(x), cudnn_resnet(model)(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert cudnn_stand_ins.count("add_relu") == 16 and cudnn_stand_ins.count("relu") == 1 + 2 * 16


@pytest.fixture
def fixed_peak(monkeypatch):
    from resnet_fused.benchmarking import roofline

    peak = roofline.Peak("test", "bf16", flops_per_s=1e12, bytes_per_s=1e11)
    monkeypatch.setattr(roofline, "device_peak", lambda *args, **kwargs: peak)
    return peak


def test_headline_times_builds_checks_and_records_on_the_cpu(tmp_path, cudnn_stand_ins, fixed_peak):
    import time

    from scripts.gpu_pass.headline import Headline

    headline = Headline(tmp_path / "h.json", tmp_path / "h.bench.json", time.time() + 600, device="cpu",
                        image_size=32)
    headline.run(2, ["eager", "cudnn", "cpu", "cuda"], "main")
    record, bench = json.loads((tmp_path / "h.json").read_text()), json.loads((tmp_path / "h.bench.json").read_text())
    infos = record["settings"]["b2"]["providers"]
    assert [infos[p]["status"] for p in ("eager", "cudnn", "cpu", "cuda")] == ["ok", "ok", "ok", "error"]
    assert "backend 'cuda' unavailable" in infos["cuda"]["message"]
    assert record["settings"]["b2"]["roofline_bound_s"] > 0 and infos["cpu"]["percent_of_roofline"] > 0
    groups = summary.medians(bench)
    assert set(groups["model resnet50 32x32 | bf16 b2 cpu"]) == {"eager", "cudnn", "cpu"}
    headline.run(1, ["eager"], "main")
    headline.record["settings"]["b1"]["providers"]["late"] = {}
    headline.interrupted()
    assert headline.record["settings"]["b1"]["providers"]["late"]["status"] == "interrupted"
    assert headline.record["settings"]["b2"]["providers"]["cpu"]["status"] == "ok"  # timed before: kept


def test_convs_time_a_layer_against_its_roofline_on_the_cpu(cudnn_stand_ins, fixed_peak):
    import time

    from resnet_fused.benchmarking.environment import environment
    from scripts.gpu_pass.convs import time_layer

    layer = workload.resnet50_layers()[-1]  # layer4's 3x3 conv, 7x7 pixels
    row, entries = time_layer(layer, ["eager", "cudnn", "cpu"], fixed_peak, environment("cpu"), time.time() + 600,
                              batch=1, device="cpu")
    assert {p: info["status"] for p, info in row["providers"].items()} == {"eager": "ok", "cudnn": "ok", "cpu": "ok"}
    bound = max(layer.flops(1) / fixed_peak.flops_per_s, layer.bytes_fused(1, 2) / fixed_peak.bytes_per_s)
    for info in row["providers"].values():
        assert info["percent_of_roofline"] == pytest.approx(100 * bound / info["median_s"])
    assert [e["extra_info"]["provider"] for e in entries] == ["eager", "cudnn", "cpu"]


# --- timing and the benchmark JSON --------------------------------------------------------------------------

def test_interleaved_timing_and_pytest_benchmark_json(tmp_path):
    from resnet_fused.cli import report

    order = []
    samples = sidebyside.interleaved({"eager": lambda: order.append("e"), "triton": lambda: order.append("t")},
                                     rounds=3, reps={"eager": 2, "triton": 1}, device="cpu")
    assert order == ["e", "e", "t"] * 3 and all(len(s) == 3 for s in samples.values())
    stopped = sidebyside.interleaved({"a": lambda: None}, rounds=50, reps={"a": 1}, device="cpu", deadline=0)
    assert len(stopped["a"]) == 1  # past the deadline: one round, so every provider has a time
    infos = {}

    def crash():
        raise RuntimeError("planted")

    builders = {"eager": lambda: lambda: torch.ones(4), "off": lambda: lambda: torch.ones(4) * 1.5,
                "near": lambda: lambda: torch.ones(4) * 1.01, "broken": crash}
    fns = sidebyside.warm_and_check(builders, None, 0.02, infos)
    assert set(fns) == {"eager", "off", "near"}  # a wrong output is still timed, and flagged
    assert [infos[p]["status"] for p in builders] == ["ok", "wrong output", "ok", "error"]
    assert infos["broken"]["message"] == "RuntimeError: planted" and infos["off"]["rel_err"] == pytest.approx(0.5)
    group = benchjson.group_name("model", "resnet50 224x224", "bf16", 256)
    doc = benchjson.document([benchjson.entry(group, p, [t] * 3, 1, {"device_name": "GPU"})
                              for p, t in (("eager", 0.02), ("triton", 0.01))], {"device": "NVIDIA H200"})
    assert doc["machine_info"]["gpu"] == "NVIDIA H200"
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(doc))
    assert report.load_groups(path) == {group: {"eager": 0.02, "triton": 0.01}}


# --- the summary from a recorded fake run -------------------------------------------------------------------

def _fake_state(state: Path, cpu_correctness: Path) -> None:
    """A main command as a GPU run would leave it: build timed out, racecheck skipped, a sanitizer log cut short."""
    (state / "logs").mkdir(parents=True)
    lines = [("env", "ok", 4, 0, 10), ("build", "timeout", 200, 124, 200), ("warmup", "ok", 80, 0, 200),
             ("correctness", "ok", 30, 0, 80), ("memcheck", "ok", 50, 0, 70), ("racecheck", "skipped", 0, 0, 0),
             ("headline", "ok", 60, 0, 150), ("convs", "timeout", 40, 124, 40)]
    (state / "steps.jsonl").write_text("".join(json.dumps(dict(command="main", step=s, status=st, seconds=sec,
                                                               rc=rc, timeout=t)) + "\n"
                                               for s, st, sec, rc, t in lines))
    (state / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0+cu130", "sm_count": 132,
                                                "wheels_installed": []}))
    (state / "warmup.json").write_text(json.dumps({"jobs": 496, "workers": 16, "done": [{}] * 496, "seconds": 71.2,
                                                   "errors": 0, "finished": True}))
    shutil.copy(cpu_correctness, state / "correctness.json")
    (state / "memcheck.json").write_text(json.dumps({"cases": [{"status": "pass"}] * 3, "not_run": [{}] * 2}))
    (state / "logs" / "memcheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    medians = {256: {"eager": 0.100, "cudnn": 0.080, "triton": 0.040, "cuda": 0.060},
               1: {"eager": 0.006, "eager+cudagraph": 0.004, "triton+cudagraph": 0.003, "cuda+cudagraph": 0.005}}
    settings, benches = {}, []
    for batch, providers in medians.items():
        group = benchjson.group_name("model", "resnet50 224x224", "bf16", batch)
        settings[f"b{batch}"] = {"group": group, "roofline_bound_s": 0.025 if batch == 256 else 0.0004,
                                 "providers": {p: {"status": "ok", "rel_err": 1e-3, "median_s": t}
                                               for p, t in providers.items()}}
        benches += [benchjson.entry(group, p, [t] * 3, 1, {}) for p, t in providers.items()]
    settings["b256"]["providers"]["torch.compile"] = {"status": "error", "message": "RuntimeError: planted"}
    (state / "headline.json").write_text(json.dumps({"settings": settings, "notes": ["torch.compile not run"]}))
    (state / "headline.bench.json").write_text(json.dumps(benchjson.document(benches, {"device": "NVIDIA H200"})))
    layers = [{"layer": f"layer{i}", "count": 1, "providers": {
        p: {"status": "ok", "rel_err": 0.0, "median_s": t, "percent_of_roofline": 50.0}
        for p, t in (("eager", 1e-3), ("cudnn", 8e-4), ("triton", 5e-4), ("cuda", 7e-4 if i else 1.2e-3))}}
        for i in range(3)]
    (state / "convs.json").write_text(json.dumps({"layers": layers, "note": "stopped at the step's deadline"}))


def test_summary_says_what_ran_and_what_did_not(tmp_path, cpu_run):
    state, out = tmp_path / "state", tmp_path / "out"
    _fake_state(state, cpu_run[1])
    assert summary.main(["--state", str(state), "--out", str(out), "--command", "main", "--png"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= set(steps.OUTPUTS) and len(files) <= steps.MAX_FILES
    assert "bench.png" in files  # resnet_fused report read the merged bench.json
    text = (out / "summary.md").read_text()
    budget = {(step.command, step.name): step.budget_s for step in steps.STEPS}
    assert "# GPU pass on NVIDIA H200" in text and "No nvidia-cutlass wheel was carried" in text
    for expected in (f"| main | build | {budget['main', 'build']} | 200 | 200 | TIMEOUT (cut at 200 s) |",
                     f"| main | racecheck | {budget['main', 'racecheck']} | 0 | 0 | skipped: no time left |",
                     f"| main | finalize | {budget['main', 'finalize']} |  |  | not reached yet |",
                     f"| followup | compile | {budget['followup', 'compile']} |  |  | not run |",
                     "- memcheck: 0 errors reported; 3 launches checked (3 pass), 2 not reached",
                     "- racecheck: not run: skipped, no time left",
                     "| batch 256: >= 2.0x eager | 2.50x (met) | 1.67x (MISSED) |",
                     "| batch 256: >= 50% of the roofline bound | 62% (met) | 42% (MISSED) |",
                     "| batch 1, CUDA graphs: >= 1.5x eager | 2.00x (met); vs eager+cudagraph 1.33x | 1.20x (MISSED)",
                     "| torch.compile | - | - | - | - | - | error: RuntimeError: planted |",
                     "stopped at the step's deadline",
                     "Triton warm-up: 496 of 496 compiles in 71.2 s on 16 processes, 0 errors."):
        assert expected in text, expected
    for backend, dtype in (("torch", "bf16"), ("triton", "fp32")):
        n = len([c for c in workload.correctness_calls(backend, "cpu") if c.dtype == dtype])
        assert f"| {backend} | {dtype} | {n} | 0 | 0 | 0 | 0 |" in text
    results = json.loads((out / "results.json").read_text())
    assert results["steps"][1]["status"] == "timeout"


# --- the training step ---------------------------------------------------------------------------------------

def test_train_counts_pytests_junit_outcomes(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites><testsuite>
          <testcase classname="tests.a" name="ok"/>
          <testcase classname="tests.a" name="bad"><failure message="x"/></testcase>
          <testcase classname="tests.a" name="broken"><error message="y"/></testcase>
          <testcase classname="tests.b" name="later"><skipped message="no GPU"/></testcase>
        </testsuite></testsuites>"""))
    counts = train.junit_counts(xml)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1,
                      "failures": ["tests.a::bad", "tests.a::broken"]}
    assert train.junit_counts(tmp_path / "absent.xml")["passed"] == 0


def test_train_step_runs_its_gpu_tests_and_timing_selection(tmp_path, monkeypatch):
    # On this machine every GPU case and every CUDA train-step case skips: both pytest runs select something and
    # finish cleanly, and the summary says that the train step was not timed.
    import time

    monkeypatch.setenv("GPU_PASS_DEADLINE", str(time.time() + 240))
    state = tmp_path / "state"
    state.mkdir()
    assert train.main(["--out", str(state / "train.json"), "--bench-out", str(state / "train.bench.json")]) == 0
    record = json.loads((state / "train.json").read_text())
    assert record["finished"] and record["tests"]["rc"] == 0 and record["bench"]["rc"] == 0, record
    assert record["tests"]["skipped"] > 0 and record["tests"]["failed"] == record["tests"]["passed"] == 0
    assert not (state / "train.bench.json").exists()  # pytest-benchmark writes nothing when every case skipped
    out = tmp_path / "out"
    assert summary.main(["--state", str(state), "--out", str(out), "--command", "followup"]) == 0
    assert "- train step: not timed (pytest rc 0)" in (out / "summary.md").read_text()


def test_summary_reports_the_train_step_against_its_goal(tmp_path):
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir()
    (state / "train.json").write_text(json.dumps({"finished": True, "tests": {
        "passed": 40, "failed": 1, "errors": 0, "skipped": 2, "failures": ["tests.x::planted"], "rc": 1,
        "seconds": 30.0}, "bench": {"rc": 0, "seconds": 40.0}}))
    benches = [benchjson.entry(summary.TRAIN_GROUP, p, [t] * 3, 1, {})
               for p, t in (("eager", 1.0), ("eager-nchw", 1.2), ("triton", 0.7), ("cuda", 0.9))]
    (state / "train.bench.json").write_text(json.dumps(benchjson.document(benches, {"device": "NVIDIA H200"})))
    assert summary.main(["--state", str(state), "--out", str(out), "--command", "followup"]) == 0
    text = (out / "summary.md").read_text()
    for expected in ("40 passed, 1 failed, 0 errors, 2 skipped", "FAILED `tests.x::planted`",
                     "| triton | 700.0 | 1.43x (met) |", "| cuda | 900.0 | 1.11x (MISSED) |",
                     "| eager-nchw | 1200.0 | 0.83x |",
                     "- resnet50 bf16 batch 256 train step vs eager: triton 1.43x, cuda 1.11x"):
        assert expected in text, expected
    assert summary.TRAIN_GROUP in json.loads((out / "bench.json").read_text())["benchmarks"][0]["group"]


# --- the script's main command, end to end, on a machine without a GPU --------------------------------------

def test_main_command_runs_end_to_end_without_a_gpu(tmp_path):
    # a copy of the repository's pass with a setup.py that builds nothing: every GPU step fails cleanly, the
    # summary says which, and at most 8 files are left in $OUT
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", root / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tests").mkdir()
    for name in ("__init__.py", "oracle.py"):
        shutil.copy(ROOT / "tests" / name, root / "tests" / name)
    (root / "setup.py").write_text("print('build: nothing to build here')\n")
    out, state = tmp_path / "out", tmp_path / "state"
    run = subprocess.run(["bash", str(root / "scripts" / "gpu_validate.sh")], cwd=root, capture_output=True,
                         text=True, timeout=600,
                         env=_env(OUT=str(out), GPU_PASS_STATE=str(state), MAX_JOBS="2"))
    assert run.returncode == 0, run.stdout + run.stderr
    records = [json.loads(line) for line in (state / "steps.jsonl").read_text().splitlines()]
    status = {r["step"]: r["status"] for r in records}
    assert set(status) == {s.name for s in steps.steps_of("main")}
    assert status["env"] == status["build"] == status["finalize"] == "ok"
    logs = {step: (state / "logs" / f"{step}.log").read_text() for step in status}
    for step in ("warmup", "correctness", "memcheck", "racecheck", "headline", "convs"):
        assert status[step] == "failed", (step, logs[step][-2000:])
    assert "torch sees no CUDA GPU" in logs["correctness"]
    assert "compute-sanitizer not found" in logs["memcheck"] and "compute-sanitizer not found" in logs["racecheck"]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= set(steps.OUTPUTS) and len(files) <= steps.MAX_FILES
    text = (out / "summary.md").read_text()
    correctness_budget = next(s.budget_s for s in steps.STEPS if s.name == "correctness")
    assert f"| main | correctness | {correctness_budget} | {correctness_budget} |" in text
    assert "FAILED (exit 1)" in text
    assert "no record: the step ended (failed, exit 1" in text
