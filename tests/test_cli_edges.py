"""The CLI at its edges: sizes that cannot fit, caches of the wrong shape, hostile JSON, files from several
machines; each refused in one line, or handled, before any work is wasted."""

from __future__ import annotations

import json
import os
import time

import pytest

from resnet_fused.__main__ import main
from resnet_fused.benchmarking import roofline
from resnet_fused.cli import report

from .test_cli import _bench, _write_benchmark_json


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_FUSED_CACHE_DIR", str(tmp_path / "cache"))


# ---- report -------------------------------------------------------------------------------------------------

def test_report_of_json_nested_too_deep_is_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SystemExit, match="nested too deeply"):
        main(["report", str(path)])


@pytest.mark.parametrize("median", [1e308, 1e-300])
def test_report_refuses_medians_no_benchmark_measures(tmp_path, median):
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"benchmarks": [_bench("g", "eager", median), _bench("g", "cpu", 1.0)]}))
    with pytest.raises(SystemExit, match=r"has median .*expected a time in seconds > 0, between 1e-12 and 1e\+06"):
        main(["report", str(path)])


def _with_machine(path, cpu, gpu=None):
    data = json.loads(path.read_text())
    data["machine_info"] = {"cpu": {"brand_raw": cpu, "count": 2}}
    if gpu:
        for bench in data["benchmarks"]:
            bench["group"] = bench["group"].replace(" cpu", " cuda")
            bench["extra_info"]["device_name"] = gpu
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("second", [("AMD EPYC", None), ("Intel Xeon", "NVIDIA H200")], ids=["cpu-names", "gpu-names"])
def test_report_refuses_to_merge_files_from_different_machines(tmp_path, second):
    first = _with_machine(_write_benchmark_json(tmp_path / "xeon.json"), "Intel Xeon",
                          "NVIDIA H100" if second[1] else None)
    other = _with_machine(_write_benchmark_json(tmp_path / "other.json"), *second)
    with pytest.raises(SystemExit, match=r"timed on different machines \(xeon.json on Intel Xeon, 2 cores.*; "
                                         r"other.json on .*\): their timings do not merge"):
        main(["report", str(first), str(other)])


def test_report_merges_files_of_one_machine_and_names_it(tmp_path, monkeypatch):
    first = _with_machine(_write_benchmark_json(tmp_path / "a.json"), "Intel Xeon")
    second = _with_machine(_write_benchmark_json(tmp_path / "b.json"), "Intel Xeon")
    titles = []
    monkeypatch.setattr(report, "panel_chart", lambda path, panels, **kwargs: titles.append((panels, kwargs)))
    monkeypatch.setattr(report, "have_matplotlib", lambda: True)
    assert main(["report", str(first), str(second), "--out", str(tmp_path / "s.png")]) == 0
    (panels, kwargs), = titles
    assert kwargs["title"] == "a.json, b.json (Intel Xeon, 2 cores)"
    assert kwargs["xlabel"] == "speedup vs eager PyTorch, channels_last (x)"
    legends = {name for _, _, series in panels for name in series}
    assert legends == {"fused, cpu backend", "torch.compile"}  # the legend said "cpu" (and "eager")


def test_provider_labels_say_what_ran():
    assert report.provider_label("eager-nchw") == "eager PyTorch, NCHW"
    assert report.provider_label("triton+cudagraph") == "fused, triton backend + CUDA graph"
    assert report.provider_label("torch.compile-max-autotune") == "torch.compile max-autotune"


# ---- sizes --------------------------------------------------------------------------------------------------

def _never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the size was refused")
    return fail


@pytest.mark.parametrize("command", ["demo", "profile"])
@pytest.mark.parametrize("batch, free", [("100000", 2**30), ("99999999999999999999", None)], ids=["large", "huge"])
def test_a_batch_that_cannot_fit_is_refused_before_any_work(command, batch, free, tmp_path, monkeypatch):
    from resnet_fused.cli import common, demo, profile

    monkeypatch.setattr(common, "free_memory", lambda device: free)  # None: this machine cannot tell
    monkeypatch.setattr(demo, "fuse_for_benchmark", _never("fusing"))
    monkeypatch.setattr(profile, "fuse_for_benchmark", _never("fusing"))
    monkeypatch.setattr(profile, "device_peak", _never("measuring the peaks"))
    with pytest.raises(SystemExit) as info:
        main([command, "--device", "cpu", "--model", "resnet18", "--image-size", "32", "--batch", batch,
              "--iters", "1"] + ["--out", str(tmp_path / "p")] * (command == "profile"))
    message = str(info.value.code)
    assert message.startswith(f"--batch {batch}: a forward at 32x32 in fp32 needs about") and "\n" not in message
    assert "use --batch" in message


def test_a_batch_that_fits_passes_and_the_image_size_is_checked_too(monkeypatch):
    from resnet_fused import models
    from resnet_fused.cli import common

    model = models.resnet18().eval()
    monkeypatch.setattr(common, "free_memory", lambda device: 2**30)
    common.check_fits(model, 8, 32, models_held=3)
    with pytest.raises(SystemExit, match="--batch 100000: .* use --batch [0-9]+ or less"):
        common.check_fits(model, 100_000, 32, models_held=3)
    with pytest.raises(SystemExit, match="--image-size 10000000000: too large"):
        common.check_fits(model, 1, 10**10, models_held=3)


# ---- the roofline cache -------------------------------------------------------------------------------------

def _fake_measure(calls, spread=0.0):
    def measure_peak(device, dtype, **kwargs):
        calls.append(device)
        return roofline.Peak(roofline.device_name(device), "fp32", 1e12, 1e10, time.time(), spread, 0.5)
    return measure_peak


def _entry(**changes):
    def edit(cache):
        (key,) = cache
        cache[key].update(changes)
        for field, value in changes.items():
            if value is _DROP:
                del cache[key][field]
        return json.dumps(cache)
    return edit


_DROP = object()
WRONG_CACHES = {
    "list": lambda cache: "[1, 2]", "text": lambda cache: "text", "null": lambda cache: "null",
    "entry-a-string": lambda cache: json.dumps({key: "v" for key in cache}),
    "zero-flops": _entry(flops_per_s=0), "inf-flops": _entry(flops_per_s=float("inf")),
    "bool-flops": _entry(flops_per_s=True), "other-device": _entry(device="another CPU"),
    "expired": _entry(measured_at=1.0), "noisy": _entry(spread=0.9), "extra-field": _entry(extra=1),
    "missing-field": _entry(bytes_per_s=_DROP),
}


@pytest.mark.parametrize("edit", WRONG_CACHES.values(), ids=WRONG_CACHES.keys())
def test_a_roofline_cache_of_the_wrong_shape_is_measured_again(edit, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(roofline, "measure_peak", _fake_measure(calls))
    good = roofline.device_peak("cpu", torch.float32)
    roofline.cache_file().write_text(edit(json.loads(roofline.cache_file().read_text())))
    again = roofline.device_peak("cpu", torch.float32)  # crashed after all the profiling, or reused a bad peak
    assert len(calls) == 2 and again.flops_per_s == good.flops_per_s
    assert roofline.device_peak("cpu", torch.float32) == again and len(calls) == 2  # and stored again


def test_roofline_peaks_are_keyed_by_cpu_model_and_threads(monkeypatch):
    import platform

    import torch

    from resnet_fused.benchmarking.environment import device_name

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 None) if os.path.exists("/proc/cpuinfo") else None
    if model:
        assert device_name("cpu") == model != platform.machine()  # every x86 machine was "x86_64"
    calls = []
    monkeypatch.setattr(roofline, "measure_peak", _fake_measure(calls))
    monkeypatch.setattr(roofline, "device_name", lambda device: "CPU A")
    roofline.device_peak("cpu", torch.float32)
    roofline.device_peak("cpu", torch.float32)
    monkeypatch.setattr(roofline, "device_name", lambda device: "CPU B")
    roofline.device_peak("cpu", torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        roofline.device_peak("cpu", torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3
    assert sorted(json.loads(roofline.cache_file().read_text())) == sorted(
        [f"CPU A|cpu|fp32|{threads} threads", f"CPU B|cpu|fp32|{threads} threads",
         f"CPU B|cpu|fp32|{threads + 1} threads"])


def test_a_noisy_peak_is_used_but_not_cached(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(roofline, "measure_peak", _fake_measure(calls, spread=0.6))
    assert roofline.device_peak("cpu", torch.float32).noisy
    roofline.device_peak("cpu", torch.float32)
    assert len(calls) == 2 and not roofline.cache_file().exists()


# ---- profile: labels, noise, what eager is ------------------------------------------------------------------

def test_layer_labels_are_unique_and_name_the_module():
    import resnet_fused as rf
    from resnet_fused.benchmarking.layers import conv_layers

    labels = [layer.label for layer in conv_layers(rf.resnet50())]
    assert len(set(label.split()[0] for label in labels)) == len(labels)  # "layer2.conv1" named two rows
    assert any(label.startswith("layer2.0.conv1 256->128") for label in labels)
    assert any(label.startswith("layer2.1.conv1 512->128") for label in labels)


def test_charts_label_every_bar_with_its_value(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from resnet_fused.cli import plotting

    labelled = []
    real = Axes.bar_label
    monkeypatch.setattr(Axes, "bar_label", lambda self, bars, labels=None, **kw: labelled.append(labels)
                        or real(self, bars, labels=labels, **kw))
    plotting.bar_chart(tmp_path / "c.png", ["a", "b"], {"fused, cpu backend": [1.5, float("nan")]}, title="t")
    assert labelled == [["1.50x", ""]]


def test_profiler_chatter_is_dropped_and_the_rest_of_stderr_kept(capfd):
    from resnet_fused.cli import profile

    with profile._without_profiler_chatter():
        os.write(2, b"USDT:2026-12-05 12:49:57 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a real warning\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "a real warning" in err


def test_profile_flags_noisy_timings_and_a_peak_measured_low(tmp_path, capfd, monkeypatch):
    from resnet_fused.cli import profile
    from resnet_fused.benchmarking.timing import Timing, measure

    def noisy_eager(fns, device, **kwargs):  # a busy machine: eager's repeats spread by 50%
        return {k: Timing(t.median, 0.5 if k == "eager" else 0.0) for k, t in measure(fns, device, **kwargs).items()}

    refreshed = []

    def low_peak(device, dtype, refresh=False, **kwargs):
        refreshed.append(refresh)
        return roofline.Peak("CPU", "fp32", 1e6, 1e6, time.time(), 0.0, 7.0)  # far below what convs reach

    monkeypatch.setattr(profile, "measure", noisy_eager)
    monkeypatch.setattr(profile, "device_peak", low_peak)
    rc = main(["profile", "--device", "cpu", "--model", "resnet18", "--batch", "1", "--image-size", "32",
               "--iters", "2", "--out", str(tmp_path / "p"), "--refresh-peaks"])
    out, err = capfd.readouterr()
    assert rc == 0 and refreshed == [True]
    layers = json.loads((tmp_path / "p" / "profile.json").read_text())["layers"]
    assert all(row["noisy"] and row["spread"] == 0.5 for row in layers)
    assert f"note: {len(layers) + 1} of {len(layers) + 1} measurements (marked !) spread by more than 25%" in out
    assert "the peaks were measured low" in out and "--refresh-peaks" in out
    assert "eager: conv -> BatchNorm (-> + residual) (-> ReLU) as separate modules, channels_last" in out
    assert "eager: the same model unfused, channels_last" in out
    assert "USDT" not in err and "USDT" not in out


def test_demo_says_when_a_busy_machine_made_its_speedups_meaningless(capsys, monkeypatch):
    from resnet_fused.cli import demo
    from resnet_fused.benchmarking.timing import Timing

    monkeypatch.setattr(demo, "measure", lambda fns, device, **kw: {k: Timing(1.0, 0.4 * (k == "fused"))
                                                                    for k in fns})
    assert main(["demo", "--device", "cpu", "--model", "resnet18", "--image-size", "32", "--batch", "1",
                 "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "(! fused: repeats spread by more than 25%, the machine was busy; the speedups say little)" in out
