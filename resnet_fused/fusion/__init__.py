"""Machinery behind the fused modules and `fuse_model`.

    eligibility  when a conv(+BN)(+residual)(+ReLU) unit may run fused, and in which dtype
    unit         what runs one unit for a given input (packed, folded, live, train or eager), as a step
    training     a unit with batch statistics, and the running-statistics update
    plan         the dataflow of a residual block as data (units, shortcut)
    binding      a fused module's steps decided once, replayed while nothing changed
    changes      the process-wide change counter that bindings and CUDA graphs read
    analysis     torch.fx proofs that a module's forward is such a dataflow (fuse_model)
    bytecode     what an untraceable forward reaches into, read from its bytecode
"""
