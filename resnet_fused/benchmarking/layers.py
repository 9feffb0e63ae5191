"""The conv layers of a ResNet, read off the model itself, with the FLOPs and bytes each one costs.

A conv with input (N, Cin, H, W), a k x k kernel, groups g and output (N, Cout, Ho, Wo) does
    MACs = N * Cout * Ho * Wo * (Cin / g) * k * k,      FLOPs = 2 * MACs.
Bytes through memory, e = bytes per element, Y = N * Cout * Ho * Wo (one output-sized pass):
    fused (one kernel):  e * (N*Cin*H*W + |weight| + Y + Y*[residual])
    eager (one kernel per module): the conv writes Y; BatchNorm reads and writes it (2Y); each ReLU reads and
    writes it (2Y); the residual add reads it and the identity and writes (3Y):
        e * (N*Cin*H*W + |weight| + Y * (1 + 2 + 2*[relu] + 3*[residual]))
The roles (ReLU after?, residual added?) follow the block structure: a Bottleneck's conv3 and a
BasicBlock's conv2 take the residual and the final ReLU, a downsample has no ReLU, every other conv has one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List

import torch
from torch import nn


@dataclass(frozen=True)
class ConvLayer:
    name: str          # the first module with this shape, e.g. "layer2.0.conv2"
    count: int         # how many convs in the model have exactly this shape and role
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    groups: int
    h: int
    w: int
    ho: int
    wo: int
    relu: bool
    residual: bool

    @property
    def label(self) -> str:
        """A label for tables: the first conv of this shape and role by its module name (unique: stage.role alone
        named layer2.0.conv1 and layer2.1.conv1 alike), and the shape."""
        return f"{self.name} {self.cin}->{self.cout} k{self.kernel}s{self.stride} @{self.h}"

    def macs(self, batch: int = 1) -> int:
        return batch * self.cout * self.ho * self.wo * (self.cin // self.groups) * self.kernel * self.kernel

    def flops(self, batch: int = 1) -> int:
        return 2 * self.macs(batch)

    def _sizes(self, batch: int):
        x = batch * self.cin * self.h * self.w
        weight = self.cout * (self.cin // self.groups) * self.kernel * self.kernel
        y = batch * self.cout * self.ho * self.wo
        return x, weight, y

    def bytes_fused(self, batch: int = 1, element_size: int = 4) -> int:
        x, weight, y = self._sizes(batch)
        return element_size * (x + weight + y * (1 + int(self.residual)))

    def bytes_eager(self, batch: int = 1, element_size: int = 4) -> int:
        x, weight, y = self._sizes(batch)
        passes = 1 + 2 + 2 * int(self.relu) + 3 * int(self.residual)
        return element_size * (x + weight + y * passes)


def _roles(model: nn.Module) -> dict:
    """conv module name -> (relu, residual), from where the conv sits in its block."""
    roles = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if parent_name.endswith("downsample"):
            roles[name] = (False, False)
        elif leaf == "conv3" or (leaf == "conv2" and hasattr(parent, "conv1") and not hasattr(parent, "conv3")):
            roles[name] = (True, True)
        else:
            roles[name] = (True, False)
    return roles


def _shape_pass(model: nn.Module, batch: int, image_size: int, in_channels: int):
    """Run the model on the meta device (no memory, no math) and record each conv's / linear's shapes."""
    meta_model = copy.deepcopy(model).to("meta").eval()
    records, handles = [], []
    for name, module in meta_model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, inputs, output, name=name):
                records.append((name, mod, tuple(inputs[0].shape), tuple(output.shape)))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            meta_model(torch.empty(batch, in_channels, image_size, image_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return records


def conv_layers(model: nn.Module, image_size: int = 224, in_channels: int = 3) -> List[ConvLayer]:
    """The distinct convs of `model` (same shape and role counted once), in the order they run."""
    roles = _roles(model)
    layers, index = [], {}
    for name, mod, in_shape, out_shape in _shape_pass(model, 1, image_size, in_channels):
        if not isinstance(mod, nn.Conv2d):
            continue
        if mod.kernel_size[0] != mod.kernel_size[1] or mod.stride[0] != mod.stride[1] \
                or mod.padding[0] != mod.padding[1]:
            raise ValueError(f"{name}: only square kernels, strides and paddings are tabulated, got {mod}")
        relu, residual = roles[name]
        key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.groups,
               in_shape[2], in_shape[3], relu, residual)
        if key in index:
            layers[index[key]]["count"] += 1
            continue
        index[key] = len(layers)
        layers.append(dict(name=name, count=1, cin=mod.in_channels, cout=mod.out_channels,
                           kernel=mod.kernel_size[0], stride=mod.stride[0], padding=mod.padding[0],
                           groups=mod.groups, h=in_shape[2], w=in_shape[3], ho=out_shape[2], wo=out_shape[3],
                           relu=relu, residual=residual))
    return [ConvLayer(**layer) for layer in layers]


def count_macs(model: nn.Module, batch: int = 1, image_size: int = 224, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass: every conv and linear layer (the rest is negligible)."""
    total = 0
    for _, mod, in_shape, out_shape in _shape_pass(model, batch, image_size, in_channels):
        if isinstance(mod, nn.Conv2d):
            n, cout, ho, wo = out_shape
            total += n * cout * ho * wo * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            total += (torch.Size(out_shape).numel() // mod.out_features) * mod.in_features * mod.out_features
    return total


def model_bytes(layers: List[ConvLayer], batch: int, element_size: int, fused: bool) -> int:
    """Bytes all conv layers move in one forward pass (each distinct layer times its count)."""
    per = ConvLayer.bytes_fused if fused else ConvLayer.bytes_eager
    return sum(layer.count * per(layer, batch, element_size) for layer in layers)


def format_table(layers: List[ConvLayer], batch: int = 1, element_size: int = 4) -> str:
    rows = [f"{'layer':<48} {'x':>3} {'GMAC':>7} {'MB fused':>9} {'MB eager':>9}"]
    for layer in layers:
        rows.append(f"{layer.label:<48} {layer.count:>3} {layer.macs(batch) / 1e9:>7.3f} "
                    f"{layer.bytes_fused(batch, element_size) / 1e6:>9.2f} "
                    f"{layer.bytes_eager(batch, element_size) / 1e6:>9.2f}")
    return "\n".join(rows)
