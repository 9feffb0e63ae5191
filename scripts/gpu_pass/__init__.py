"""The GPU validation pass (scripts/gpu_validate.sh) as Python modules, each runnable as `python -m`:

    steps        the steps, their time budgets and the files the pass returns (no torch: the shell reads it)
    workload     what each step launches: shapes, dtypes, epilogues (one list, used by all the modules below)
    compiles     the Triton compiles a list of launches triggers, through the autotuner's own configs and prune
    plan         `--plan`: steps, budgets, compile counts and output files, without a GPU
    warmup       compiles every Triton kernel the later steps need, in parallel processes, without running them
    correctness  the correctness driver: every backend x dtype x shape against the fp32 oracle (CPU too)
    headline     resnet50 bf16: batch 256 and batch 1 (CUDA graphs) against eager, cuDNN's fused ops, compile
    convs        each distinct ResNet-50 conv at batch 256, with its percent of the roofline bound
    summary      summary.md from what the steps recorded (pure Python: runs after any step, even a killed one)
"""
