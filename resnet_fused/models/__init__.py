"""The reference ResNet family (torchvision-identical) and the checkpoint loader."""

from .loading import CheckpointMismatchError, CheckpointReadError, load_checkpoint, load_state_dict_file
from .resnet import *  # noqa: F401,F403
from .resnet import __all__ as _resnet_all

__all__ = list(_resnet_all) + ["load_checkpoint", "load_state_dict_file", "CheckpointMismatchError",
                               "CheckpointReadError"]
