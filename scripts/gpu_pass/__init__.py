"""The GPU validation pass (scripts/gpu_validate.sh) as Python modules; those with a `main` run as `python -m`:

    steps        the steps, their time budgets and the files the pass returns (no torch: the shell reads it)
    workload     what each step launches: shapes, dtypes, epilogues (one list, used by all the modules below)
    compiles     the Triton compiles a list of launches triggers, through the autotuner's own configs and prune
    plan         `--plan`: steps, budgets, compile counts and output files, without a GPU
    env          the machine: GPU, driver, versions, tools, carried wheels
    warmup       compiles every Triton kernel the later steps need, in parallel processes, without running them
    correctness  the correctness driver: every backend x dtype x shape against the fp32 oracle (CPU too)
    headline     resnet50 bf16: batch 256 and batch 1 (CUDA graphs) against eager, cuDNN's fused ops, compile
    cudnn_model  the whole-model cuDNN baseline: every conv-BN(-add)-ReLU as one cuDNN fused op
    convs        each distinct ResNet-50 conv at batch 256, with its percent of the roofline bound
    sidebyside   build, warm up, check, then time providers in interleaved rounds
    benchjson    pytest-benchmark's JSON format (what `python -m resnet_fused report` reads)
    summary      summary.md and the other output files from what the steps recorded (pure Python)
"""
