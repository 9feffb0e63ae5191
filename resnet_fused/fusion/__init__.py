"""Machinery behind the fused modules and `fuse_model`.

    conv_bn   one conv(+BN)(+residual)(+ReLU) unit, run fused in eval (cached fold + pack) and train (batch stats)
    plan      the dataflow of a residual block as data (units, shortcut) and its execution
    analysis  torch.fx proofs that a module's forward is such a dataflow
    bytecode  what an untraceable forward reaches into, read from its bytecode
"""
