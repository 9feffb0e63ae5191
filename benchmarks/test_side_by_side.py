"""benchmarks/side_by_side.py end to end at the smallest sizes: the interleaved inference and train-step runs write
pytest-benchmark JSON with one entry per provider, in the groups the pytest benchmarks use; the order of the providers
moves on by one each round."""

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


def test_every_provider_takes_every_place_in_the_rounds():
    calls = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times, _ = side_by_side.interleaved(runners, rounds=3, runs=2)
    rounds = [calls[i:i + 9] for i in range(0, 27, 9)]  # per provider: one untimed run, two timed
    assert [r[::3] for r in rounds] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert all(r[k] == r[k + 1] == r[k + 2] for r in rounds for k in (0, 3, 6))
    assert {name: len(samples) for name, samples in times.items()} == {"a": 6, "b": 6, "c": 6}


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
    assert calls == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4  # the second round starts with b
    assert [len(v) for v in times.values()] == [6, 6]
