"""resnet_fused: fused conv+BatchNorm+ReLU and residual kernels for ResNet-style networks.

    import resnet_fused as rf
    model = rf.resnet50()                      # torchvision-identical reference model
    fused, report = rf.fuse_model(model)       # the same model with fused blocks, weights carried
    run = rf.cuda_graphed(fused.cuda().eval())  # optional, on a GPU: one graph launch per forward
"""

from . import _extension

_extension.load()  # registers torch.ops.resnet_fused.* if the extension is built; warns once if not

from . import models, ops  # noqa: E402
from .models import *  # noqa: E402,F401,F403
from .ops import (add_relu, available_backends, bn_act, conv_bn_act, conv_bn_act_packed, fold_bn,  # noqa: E402
                  get_backend, pack_conv_bn, set_backend, use_backend)

__version__ = "0.1.0"
from .blocks import FusedBasicBlock, FusedBottleneck  # noqa: E402
from .fuse import FuseReport, fuse_model  # noqa: E402
from .graphs import CUDAGraphed, cuda_graphed  # noqa: E402
from .ops.cpu_cache import cpu_cache_info, empty_cpu_cache, set_cpu_cache_limit  # noqa: E402,F401
from .packed_conv import PackedConvBN  # noqa: E402
