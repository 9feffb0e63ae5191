"""The CLI at its edges: sizes that cannot fit, caches of the wrong shape, hostile JSON, files from several
machines; each refused in one line, or handled, before any work is wasted."""

from __future__ import annotations

import json

import pytest

from resnet_fused.__main__ import main
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
