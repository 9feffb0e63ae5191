"""The CLI (demo, profile, report) end to end at tiny settings, and the math behind it (FLOPs, bytes, roofline)."""

from __future__ import annotations

import json

import pytest
import torch

import resnet_fused as rf
from resnet_fused import PackedConvBN
from resnet_fused.__main__ import main
from resnet_fused.benchmarking import roofline
from resnet_fused.benchmarking.fusing import fused_block
from resnet_fused.benchmarking.layers import ConvLayer, conv_layers, count_macs, model_bytes
from resnet_fused.benchmarking.models import randomize_bn
from resnet_fused.benchmarking.units import conv_and_bn, eager_and_fused, layer_inputs
from resnet_fused.cli import demo as demo_cli
from resnet_fused.cli import plotting, report

from .oracle import assert_matches

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Never touch the user's ~/.cache from tests.
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path / "cache"))


# ---- FLOPs, bytes, roofline ---------------------------------------------------------------------------------

def test_resnet50_macs_match_the_published_4_09_gmacs():
    assert count_macs(rf.resnet50(), batch=1, image_size=224) == pytest.approx(4.09e9, rel=0.01)
    assert count_macs(rf.resnet50(), batch=3, image_size=224) == 3 * count_macs(rf.resnet50())


def test_resnet18_macs():
    assert count_macs(rf.resnet18()) == pytest.approx(1.82e9, rel=0.01)


def test_resnet50_layer_table_is_derived_from_the_model():
    layers = conv_layers(rf.resnet50())
    assert sum(layer.count for layer in layers) == 53  # 49 convs in the blocks and stem + 4 downsamples
    assert len(layers) == 24  # stem + per stage conv1 (x2 shapes), conv2 (x1 or x2), conv3, downsample
    stem = layers[0]
    assert (stem.name, stem.cin, stem.cout, stem.kernel, stem.stride, stem.h, stem.ho) == \
        ("conv1", 3, 64, 7, 2, 224, 112)
    by_name = {layer.name: layer for layer in layers}
    assert by_name["layer1.0.conv3"].residual and by_name["layer1.0.conv3"].relu
    assert not by_name["layer2.0.downsample.0"].relu and not by_name["layer2.0.downsample.0"].residual
    assert by_name["layer2.0.conv2"].stride == 2 and by_name["layer2.0.conv2"].ho == 28
    assert sum(layer.count * layer.macs() for layer in layers) == pytest.approx(4.087e9, rel=1e-3)


def test_basic_block_conv2_takes_the_residual():
    by_name = {layer.name: layer for layer in conv_layers(rf.resnet18())}
    assert by_name["layer1.0.conv2"].residual and not by_name["layer1.0.conv1"].residual


def test_layer_bytes_by_hand():
    layer = ConvLayer(name="x.conv3", count=1, cin=8, cout=16, kernel=1, stride=1, padding=0, groups=1,
                      h=4, w=4, ho=4, wo=4, relu=True, residual=True)
    x, weight, y = 2 * 8 * 16, 16 * 8, 2 * 16 * 16
    assert layer.macs(2) == 2 * 16 * 16 * 8
    assert layer.bytes_fused(2, 2) == 2 * (x + weight + 2 * y)
    assert layer.bytes_eager(2, 2) == 2 * (x + weight + 8 * y)  # conv 1, BN 2, add 3, ReLU 2 passes


def test_roofline_on_known_numbers():
    peak = roofline.Peak(device="d", dtype="bf16", flops_per_s=100.0, bytes_per_s=10.0)
    assert roofline.bound_seconds(1000, 50, peak) == 10.0   # compute-bound
    assert roofline.bound_seconds(100, 500, peak) == 50.0   # memory-bound
    assert roofline.percent_of_roofline(20.0, 1000, 50, peak) == 50.0
    with pytest.raises(ValueError, match="measured_seconds"):
        roofline.percent_of_roofline(0.0, 1, 1, peak)


def test_resnet50_h100_bound_matches_the_reference_point():
    # bf16 on H100 (790 TFLOP/s, 3.35 TB/s), batch 256, every epilogue fused: ~55 MB per image and
    # a sum over layers of max(compute, memory) of ~4.9 ms.
    layers = conv_layers(rf.resnet50())
    assert model_bytes(layers, 256, 2, fused=True) / 256 == pytest.approx(55e6, rel=0.03)
    assert model_bytes(layers, 256, 2, fused=False) > 2.5 * model_bytes(layers, 256, 2, fused=True)
    peak = roofline.Peak("H100", "bf16", 790e12, 3.35e12)
    total = sum(layer.count * roofline.bound_seconds(layer.flops(256), layer.bytes_fused(256, 2), peak)
                for layer in layers)
    assert total == pytest.approx(4.9e-3, rel=0.03)


def test_device_peak_is_measured_once_then_cached(monkeypatch):
    first = roofline.device_peak("cpu", torch.float32, matmul_size=64, copy_mib=1, iters=1)
    assert first.flops_per_s > 0 and first.bytes_per_s > 0
    assert json.loads(roofline.cache_file().read_text())  # written under RESNET_FUSED_CACHE_DIR

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cached peak should have been used")

    monkeypatch.setattr(roofline, "measure_peak", no_measuring)
    assert roofline.device_peak("cpu", torch.float32) == first
    with pytest.raises(AssertionError, match="cached"):
        roofline.device_peak("cpu", torch.float32, refresh=True)


# ---- the fused twins the CLI and benchmarks run -----------------------------------------------------------

@pytest.mark.parametrize("builder", [rf.resnet18, rf.resnet50], ids=["basic", "bottleneck"])
def test_fused_block_twin_matches_eager(builder):
    model = builder().eval()
    randomize_bn(model)
    with torch.no_grad():
        block = model.layer2[0]  # stride 2 with a downsample
        h = torch.randn(2, block.conv1.in_channels, 9, 9)
        twin, _ = fused_block(block, None)
        assert_matches(twin(h), block(h), torch.float32)


def test_per_layer_units_match_each_other():
    model = rf.resnet18().eval()
    randomize_bn(model)
    layers = conv_layers(model, image_size=32)
    assert {(layer.relu, layer.residual) for layer in layers} == {(True, False), (True, True), (False, False)}
    with torch.no_grad():
        for layer in layers:
            eager_unit, fused_unit = eager_and_fused(*conv_and_bn(model, layer), layer, "torch")
            x, residual = layer_inputs(layer, 1, "cpu", torch.float32)
            expected = eager_unit(x, None if residual is None else residual.clone())
            assert_matches(fused_unit(x, residual), expected, torch.float32)


@pytest.mark.parametrize("conv_kwargs, words", [
    (dict(kernel_size=1, dilation=2), "dilated conv"),  # the right shape, computed as an undilated conv
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),  # zero-padded instead
    (dict(kernel_size=3, padding=1, groups=2), "grouped conv"),
    (dict(kernel_size=3, stride=(1, 2), padding=1), "non-square stride"),
])
def test_packed_conv_unit_refuses_convs_the_op_cannot_run(conv_kwargs, words):
    conv = torch.nn.Conv2d(4, 8, bias=False, **conv_kwargs).eval()
    with pytest.raises(ValueError, match=f"PackedConvBN runs the fused conv kernels.*{words}"):
        PackedConvBN(conv, torch.nn.BatchNorm2d(8).eval(), True, "torch")


# ---- demo -----------------------------------------------------------------------------------------------

def test_demo_runs_end_to_end_and_prints_the_comparison(capsys):
    rc = main(["demo", "--device", "cpu", "--batch", "2", "--image-size", "64", "--iters", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "max relative error:" in out and "top-5 classes agree: yes" in out
    assert "images/s" in out and "eager" in out and "fused" in out
    assert "RESULT: outputs match" in out


def test_demo_exits_non_zero_when_outputs_differ(capsys, monkeypatch):
    real = demo_cli.fuse_for_benchmark

    def broken(model, backend):
        fused, how = real(model, backend)
        return (lambda x: fused(x) + 1.0), how

    monkeypatch.setattr(demo_cli, "fuse_for_benchmark", broken)
    rc = main(["demo", "--device", "cpu", "--batch", "1", "--image-size", "32", "--iters", "1",
               "--model", "resnet18"])
    assert rc == 1
    assert "OUTPUTS DO NOT MATCH" in capsys.readouterr().out


def test_top5_agreement_allows_only_near_ties():
    eager = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.999, 0.0]])
    assert demo_cli.top5_agreement(eager, eager.clone(), atol=1e-2) == "yes"
    swapped = eager.clone()
    swapped[0, 4], swapped[0, 5] = 4.999, 5.0  # the 5th and 6th swap: a near-tie
    assert demo_cli.top5_agreement(eager, swapped, atol=1e-2) == "yes (up to near-ties)"
    wrong = eager.clone()
    wrong[0, 6] = 100.0  # a class far below the top-5 jumps in
    assert demo_cli.top5_agreement(eager, wrong, atol=1e-2) == "no"


def test_demo_rejects_a_cuda_request_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        main(["demo", "--device", "cuda"])


# ---- report ---------------------------------------------------------------------------------------------

def _bench(group, provider, median):
    return {"group": group, "name": f"test_x[{provider}]", "params": {"provider": provider},
            "extra_info": {"provider": provider}, "stats": {"median": median, "mean": median}}


def _write_benchmark_json(path):
    data = {"machine_info": {}, "benchmarks": [
        _bench("conv stem | fp32 b1 cpu", "eager", 0.004), _bench("conv stem | fp32 b1 cpu", "cpu", 0.002),
        _bench("conv stem | fp32 b1 cpu", "torch.compile", 0.008),
        _bench("conv layer1.conv2 | fp32 b1 cpu", "eager", 0.003),
        _bench("conv layer1.conv2 | fp32 b1 cpu", "cpu", 0.001),
        _bench("model resnet50 | fp32 b8 cpu", "eager", 1.0), _bench("model resnet50 | fp32 b8 cpu", "cpu", 0.8),
    ]}
    path.write_text(json.dumps(data))
    return path


def test_report_prints_speedups_and_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src = _write_benchmark_json(tmp_path / "run.json")
    png = tmp_path / "plot.png"
    assert main(["report", str(src), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["cpu", "2.0000", "2.00x"] in lines
    assert ["torch.compile", "8.0000", "0.50x"] in lines
    assert ["cpu", "800.0000", "1.25x"] in lines
    assert "conv stem | fp32 b1 cpu" in out and "model resnet50 | fp32 b8 cpu" in out
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_report_summarizes_each_kind_and_setting(tmp_path, capsys):
    src = _write_benchmark_json(tmp_path / "run.json")
    summary = report.summarize(report.load_groups(src))
    assert list(summary) == [("model", "fp32 b8 cpu"), ("conv", "fp32 b1 cpu")]  # models first
    conv = summary[("conv", "fp32 b1 cpu")]
    assert conv["cpu"].geomean == pytest.approx(6 ** 0.5) and conv["cpu"].worst == pytest.approx(2.0)
    assert conv["cpu"].cases == 2 and conv["torch.compile"].cases == 1
    assert main(["report", str(src), "--markdown", "--out", str(tmp_path / "s.png"),
                 "--cases", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| kind | setting | cases | cpu | torch.compile |" in out
    assert "| conv | fp32 b1 cpu | 2 | 2.45x (2.00x) | 0.50x (0.50x) |" in out
    assert "| model | fp32 b8 cpu | 1 | 1.25x (1.25x) | - |" in out
    if plotting.have_matplotlib():
        assert (tmp_path / "s.png").read_bytes().startswith(PNG_MAGIC)
        assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)


def test_report_merges_several_files(tmp_path, capsys, monkeypatch):
    # A run split across calls (e.g. max-autotune timed apart): one case's providers gathered from every file.
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    first = _write_benchmark_json(tmp_path / "run.json")
    second = tmp_path / "autotune.json"
    second.write_text(json.dumps({"benchmarks": [
        _bench("model resnet50 | fp32 b8 cpu", "torch.compile-max-autotune", 0.5),
        _bench("conv stem | fp32 b1 cpu", "cpu", 0.001)]}))  # a later timing of the same provider wins
    groups, _ = report.load_all([first, second])
    assert groups["model resnet50 | fp32 b8 cpu"] == {"eager": 1.0, "cpu": 0.8, "torch.compile-max-autotune": 0.5}
    assert groups["conv stem | fp32 b1 cpu"]["cpu"] == 0.001
    assert main(["report", str(first), str(second), "--markdown"]) == 0
    assert "| model | fp32 b8 cpu | 1 | 1.25x (1.25x) | - | 2.00x (2.00x) |" in capsys.readouterr().out


def test_report_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    src = _write_benchmark_json(tmp_path / "run.json")
    assert main(["report", str(src)]) == 0
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "run.png").exists()


def test_report_rejects_files_that_are_not_benchmark_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit, match="not a pytest-benchmark JSON"):
        main(["report", str(bad)])
    with pytest.raises(SystemExit, match="file not found"):
        main(["report", str(tmp_path / "missing.json")])
    disabled = tmp_path / "disabled.json"
    disabled.write_text(json.dumps({"benchmarks": [{"group": "g", "name": "n", "stats": {}}]}))
    with pytest.raises(SystemExit, match="no benchmark with timing"):
        main(["report", str(disabled)])


# ---- profile --------------------------------------------------------------------------------------------

def test_profile_on_cpu_writes_traces_json_and_png(tmp_path, capsys):
    out_dir = tmp_path / "prof"
    rc = main(["profile", "--device", "cpu", "--model", "resnet18", "--batch", "1", "--image-size", "32",
               "--iters", "1", "--out", str(out_dir), "--peak-matmul", "128"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ("eager", "fused"):
        trace = json.loads((out_dir / f"trace_{name}.json").read_text())
        assert trace["traceEvents"], f"empty {name} trace"
    summary = json.loads((out_dir / "profile.json").read_text())
    assert len(summary["layers"]) == len(conv_layers(rf.resnet18(), image_size=32))
    for row in summary["layers"]:
        assert row["speedup"] == pytest.approx(row["eager_s"] / row["fused_s"])
        assert row["roofline_pct_fused"] > 0
    assert "top kernels, eager" in out and "per layer" in out and "images/s" in out
    assert "aten::" in out  # the per-kernel table has rows
    if plotting.have_matplotlib():
        assert (out_dir / "layer_speedups.png").read_bytes().startswith(PNG_MAGIC)
    else:
        assert plotting.MISSING_MATPLOTLIB in out


# ---- bad flags and files: one line, non-zero exit, never a traceback -------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["demo", "--batch", "0"], "argument --batch: must be >= 1, got 0"),  # 0 fell back to the default batch
    (["demo", "--iters", "0"], "argument --iters: must be >= 1, got 0"),
    (["demo", "--batch", "-1"], "argument --batch: must be >= 1, got -1"),
    (["demo", "--model", "resnet9"], "argument --model: invalid choice: 'resnet9'"),
    (["profile", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["profile", "--top", "-1"], "argument --top: must be >= 0, got -1"),  # rows[:-1] dropped one silently
    (["profile", "--model", "resnet9"], "argument --model: invalid choice"),  # was found after measuring peaks
    (["report", "x.json", "--out", "plot"], "argument --out: must be a file name ending in .png"),  # wrote plot.png
    (["report", "x.json", "--cases", "c.svg"], "argument --cases: must be a file name ending in .png"),
])
def test_bad_flag_values_are_argparse_errors(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a run that should have been refused writes (profile's default --out)
    tiny = {"demo": ["--image-size", "32", "--model", "resnet18"],
            "profile": ["--image-size", "32", "--model", "resnet18", "--peak-matmul", "64"]}
    with pytest.raises(SystemExit) as info:
        main(argv[:1] + ["--device", "cpu", "--iters", "1"] * (argv[0] != "report") + tiny.get(argv[0], []) + argv[1:])
    assert info.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "profile"])
@pytest.mark.parametrize("backend, words", [
    ("nope", "--backend: backend must be 'auto' or one of"),
    ("", "--backend: backend must be 'auto' or one of"),
    ("cuda", "--backend: backend 'cuda' cannot run this call"),
])
def test_unknown_or_unusable_backend_is_one_line(command, backend, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([command, "--device", "cpu", "--batch", "1", "--backend", backend])
    assert str(info.value.code).startswith(words)


def test_demo_unusable_weights_file_is_one_line(tmp_path):
    garbage, empty, tensor = tmp_path / "garbage.pth", tmp_path / "empty.pth", tmp_path / "tensor.pth"
    garbage.write_bytes(b"not a checkpoint")
    empty.write_bytes(b"")
    torch.save(torch.zeros(3), tensor)
    for path, why in ((tmp_path / "missing.pth", "checkpoint file not found"),
                      (garbage, "is not a checkpoint saved by torch.save"), (empty, "is an empty file"),
                      (tensor, "does not hold a state_dict"), (tmp_path, "is a directory, not a file")):
        with pytest.raises(SystemExit) as info:
            main(["demo", "--device", "cpu", "--batch", "1", "--model", "resnet18", "--weights", str(path)])
        message = str(info.value.code)
        assert message.startswith(f"--weights: cannot load {str(path)!r} into resnet18") and why in message
        assert "\n" not in message


def test_profile_out_that_cannot_be_a_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--out: cannot create the folder"):
        main(["profile", "--device", "cpu", "--batch", "1", "--out", str(blocker / "sub")])


@pytest.mark.parametrize("benchmarks, words", [
    ([1], r"benchmarks\[0\] is not a benchmark object \(int\)"),
    ([_bench("g", "eager", 1.0), _bench("g", "cpu", 0)], r"benchmarks\[1\] \(g, cpu\) has median 0"),
    ([_bench("g", "eager", -1.0)], r"has median -1.0; expected a time in seconds > 0"),
    ([_bench("g", "eager", "fast")], r"has median 'fast'"),
    ([_bench("g", "eager", float("nan"))], r"has median nan"),
])
def test_report_rejects_foreign_benchmark_entries(tmp_path, benchmarks, words):
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    with pytest.raises(SystemExit, match=words):
        main(["report", str(path)])


def test_report_without_a_comparison_exits_non_zero(tmp_path, capsys):
    path = tmp_path / "no_eager.json"
    path.write_text(json.dumps({"benchmarks": [_bench("g", "cpu", 1.0), _bench("h", "eager", 1.0)]}))
    with pytest.raises(SystemExit, match=r"no benchmark group has both an 'eager' run and another provider.*"
                                         r"providers found: cpu, eager"):
        main(["report", str(path)])
    assert "g" in capsys.readouterr().out  # the table of what there is comes first


def test_report_unwritable_png_is_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    src = _write_benchmark_json(tmp_path / "run.json")
    (tmp_path / "folder.png").mkdir()
    for out in (tmp_path / "missing" / "plot.png", tmp_path / "folder.png"):
        with pytest.raises(SystemExit, match=f"report: cannot write {out}"):
            main(["report", str(src), "--out", str(out)])


def test_cli_errors_reach_the_shell_without_a_traceback(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "zero.json"
    path.write_text(json.dumps({"benchmarks": [_bench("g", "eager", 0)]}))
    done = subprocess.run([sys.executable, "-m", "resnet_fused", "report", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and done.stderr.strip().startswith("report:")
