"""What every measurement of the library shares: the `resnet_fused` CLI (demo, profile), `pytest benchmarks` and
the GPU pass (scripts/gpu_pass) import it, so that all three time, check and describe a run the same way.

- environment: the device's name and the versions recorded beside every number.
- models: reference models with non-trivial BatchNorm, their inputs, and the logits tolerance per dtype.
- layers: a ResNet's conv layers read off the model, with their FLOPs and bytes.
- units: one conv layer as eager modules, as cuDNN's fused conv, or as our packed conv_bn_act.
- fusing: the fused twin of a model or a block.
- timing: synchronized timing with medians and spreads, providers interleaved.
- roofline: the device's measured peaks, and how close a timing comes to them.
"""
