"""The checkpoint loader at its edges: old checkpoints, files that are no checkpoint, directories."""

import pickle

import pytest
import torch

from resnet_fused import models


def _saved(tmp_path, state, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_checkpoints_without_batch_counters_load_as_batchnorm_loads_them(tmp_path):
    """Saved before PyTorch 0.4.1, BatchNorm had no num_batches_tracked: load_state_dict fills it in."""
    src = models.resnet18()
    with torch.no_grad():
        for module in src.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_()
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    dst = models.resnet18(weights=str(_saved(tmp_path, state)))
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    assert all(m.num_batches_tracked.item() == 0 for m in dst.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_only_batch_counters_are_optional(tmp_path):
    state = models.resnet18().state_dict()
    state.pop("bn1.num_batches_tracked")
    state.pop("bn1.running_var")
    with pytest.raises(models.CheckpointMismatchError, match=r"missing keys \(1\): bn1.running_var$"):
        models.resnet18(weights=str(_saved(tmp_path, state)))


@pytest.mark.parametrize("content, expected", [
    (b"model weights, but as text\n", "is not a checkpoint saved by torch.save"),
    (b"", "is an empty file"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "is not a checkpoint saved by torch.save"),
    (b"PK\x03\x04" + b"\0" * 40, "is damaged or truncated"),
], ids=["text", "empty", "png", "zip-header-only"])
def test_a_file_that_is_no_checkpoint_is_one_line_without_unsafe_advice(tmp_path, content, expected):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(models.CheckpointReadError) as info:
        models.resnet18(weights=str(path))
    message = str(info.value)
    assert expected in message and "\n" not in message and "weights_only=False" not in message


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    path = _saved(tmp_path, models.resnet18().state_dict())
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(models.CheckpointReadError, match="is damaged or truncated") as info:
        models.load_checkpoint(models.resnet18(), path)
    assert "\n" not in str(info.value)


class _Payload:
    pass


def test_pickled_objects_are_refused_in_one_line_without_unsafe_advice(tmp_path):
    path = _saved(tmp_path, {"state_dict": {}, "extra": _Payload()})
    with pytest.raises(models.CheckpointReadError) as info:
        models.load_checkpoint(models.resnet18(), path)
    message = str(info.value)
    assert "_Payload" in message and "\n" not in message and "weights_only=False" not in message
    legacy = tmp_path / "legacy.pth"  # the pre-zip format is a pickle stream: same answer
    torch.save({"extra": _Payload()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(models.CheckpointReadError, match="_Payload"):
        models.load_checkpoint(models.resnet18(), legacy)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, pickle.UnpicklingError)


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory, not a file saved by torch.save"):
        models.resnet18(weights=str(tmp_path))
