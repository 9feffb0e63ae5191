"""benchmarks/side_by_side.py end to end at the smallest sizes: the interleaved inference and train-step runs write
pytest-benchmark JSON with one entry per provider, in the groups the pytest benchmarks use."""

from __future__ import annotations

import json

import pytest

import resnet_fused as rf
import side_by_side


def _run(tmp_path, *argv):
    out = tmp_path / "side_by_side.json"
    assert side_by_side.main([*argv, "--models", "resnet18", "--rounds", "1", "--runs", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())["benchmarks"]


def _fused_providers():
    return ["cpu"] if rf.available_backends("cpu")["cpu"] is None else []


def test_inference(tmp_path):
    entries = _run(tmp_path, "--batches", "1", "--providers", "eager", *_fused_providers())
    assert [e["extra_info"]["provider"] for e in entries] == ["eager", *_fused_providers()]
    assert {e["group"] for e in entries} == {"model resnet18 224x224 | fp32 b1 cpu"}
    assert all(e["stats"]["rounds"] == 1 and e["extra_info"]["interleaved"] for e in entries)


def test_train(tmp_path):
    entries = _run(tmp_path, "--train", "--batches", "2", "--providers", "eager-nchw", *_fused_providers(),
                   "onnxruntime")
    assert [e["extra_info"]["provider"] for e in entries] == ["eager-nchw", *_fused_providers()]  # peers: no train
    assert {e["group"] for e in entries} == {"train resnet18 128x128 train step | fp32 b2 cpu"}
    assert all(e["extra_info"]["saved_activation_bytes"] > 0 for e in entries)


def test_train_is_fp32_only():
    with pytest.raises(SystemExit):
        side_by_side.parse_args(["--train", "--dtypes", "bf16"])


def test_each_turn_starts_with_an_untimed_run():
    calls = []
    times, _ = side_by_side.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2,
                                        runs=3)
    assert calls == (["a"] * 4 + ["b"] * 4) * 2
    assert [len(v) for v in times.values()] == [6, 6]
