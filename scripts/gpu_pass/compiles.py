"""The Triton compiles a list of launches triggers on an H100/H200, counted without a GPU.

Triton compiles one binary per distinct (kernel, pointer dtypes, constexpr values, launch options, and the
specialization of each int argument: 1 becomes a constant, a multiple of 16 is marked divisible, others are
plain). A conv_bn_act launch that autotunes compiles every config that the kernel's own prune function keeps
for its shape (tuning.prune over the autotuner's configs); with split K left to the launcher, also each of
them with the split factor it would measure (split_k_candidate) and the split-K epilogue kernel. A launch with
a forced config compiles that config only; one with the statistics epilogue (training) never splits K and adds
the statistics' combine kernel. The training BatchNorm passes (batch_norm.py: fixed blocks, no autotuning)
compile per pointer dtype, flags, int specialization and reduction grid constants. Keys are built from the same
shapes the run launches (workload.py), so the plan's counts and the warm-up's jobs are the run's compiles.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Dict, List, NamedTuple, Optional

from resnet_fused.kernels.triton import batch_norm as bn_kernel
from resnet_fused.kernels.triton import conv_bn_act as conv_kernel
from resnet_fused.kernels.triton import tuning

from .workload import BatchNormCall, ConvCall, ElementwiseCall

SM_COUNT = 132  # H100 SXM and H200: the split-K candidate depends on it
MIN_SHAPES_PER_CONFIG = 3  # every autotune config is forced on at least this many shapes, in every dtype
POINTER = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
# kernels compiled by the launch of another (its job makes them too): the warm-up has no job of their own
SECONDARY = ("split_k_epilogue", "bn_stats_combine", "bn_sum_partials", "bn_grad_input")


def gpu_configs() -> list:
    """The autotuner's candidates on a GPU (what tuning.configs() returns outside the interpreter)."""
    return tuning._FLAT_K_CONFIGS + tuning._PER_TAP_CONFIGS


def config_label(config) -> str:
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}w{config.num_warps}s{config.num_stages}"


def config_by_label(label: str):
    for config in gpu_configs():
        if config_label(config) == label:
            return config
    raise ValueError(f"no Triton conv config is labelled {label!r}; known: "
                     f"{[config_label(c) for c in gpu_configs()]}")


def flat_k(call: ConvCall) -> bool:
    return conv_kernel.uses_flat_k(call.shape.cin)


def candidate_configs(call: ConvCall) -> list:
    """The configs the autotuner would try for this call: the kernel's own prune over its configs."""
    s = call.shape
    return tuning.prune(gpu_configs(), {"M": s.m, "Cout": s.cout, "Cin": s.cin},
                              FLAT_K=flat_k(call), KH=s.kernel, KW=s.kernel)


def packed_rows(call: ConvCall) -> int:
    return conv_kernel.packed_rows(call.shape.cin, call.shape.kernel, call.shape.kernel)


def split_candidate(call: ConvCall) -> int:
    """The split factor the launcher measures against no split when split_k is left to it (1: none)."""
    return tuning.split_k_candidate(call.shape.m, call.shape.cout, packed_rows(call), SM_COUNT)


def int_spec(value: int) -> str:
    """Triton's specialization of an int argument: '1' (a constant), 'D' (divisible by 16) or ''."""
    return "1" if value == 1 else ("D" if value % 16 == 0 else "")


class Compile(NamedTuple):
    """One Triton compile, and a launch that triggers it (config: label or None; split: the SPLIT_K value)."""

    kernel: str
    key: tuple
    call: object
    config: Optional[str] = None
    split: int = 1


def conv_compile(call: ConvCall, config, split: int) -> Compile:
    s = call.shape
    k = s.kernel
    ints = (s.m, s.h, s.w, s.cin, s.ho, s.wo, s.cout, packed_rows(call) // (k * k), split)
    constexprs = (k, k, s.stride, s.padding, call.residual, call.relu, False, flat_k(call), False,
                  "ieee" if call.precision == "ieee" else "tf32", call.stats)
    options = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
    key = (POINTER[call.dtype], tuple(map(int_spec, ints)), constexprs, options)
    return Compile("conv_bn_act", key, call, config_label(config), split)


def split_epilogue_compile(call: ConvCall, split: int) -> Compile:
    key = (POINTER[call.dtype], int_spec(call.shape.m), int_spec(call.shape.cout), int_spec(split), call.residual,
           call.relu)
    return Compile("split_k_epilogue", key, call, None, split)


def elementwise_compile(call: ElementwiseCall) -> Compile:
    n, c, h, w = call.shape
    total = n * c * h * w
    if call.op == "bn_act":
        key = (POINTER[call.dtype], int_spec(total), int_spec(c), call.residual, call.relu)
    else:
        key = (POINTER[call.dtype], int_spec(total))
    return Compile(call.op, key, call)


def _combine_key(channels: int, partials: int) -> tuple:
    _, blocks = bn_kernel._combine_grid(channels)
    return (int_spec(partials), int_spec(channels), tuple(sorted(blocks.items())))


def stats_combine_compile(call: ConvCall) -> Compile:
    # conv_kernel.statistics_partials on the GPU: one partial per tile of the smallest BLOCK_M of its configs
    partials = -(-call.shape.m // min(config.kwargs["BLOCK_M"] for config in gpu_configs()))
    return Compile("bn_stats_combine", _combine_key(call.shape.cout, partials), call)


def batch_norm_compiles(call: BatchNormCall) -> List[Compile]:
    n, c, h, w = call.shape
    total, rows = n * c * h * w, n * h * w
    flags = (POINTER[call.dtype], call.residual, call.relu, total > bn_kernel._INT32_LIMIT)
    elementwise = (int_spec(total), int_spec(c), int_spec(h * w))
    if call.op == "apply":
        return [Compile("bn_apply", flags + elementwise, call)]
    grid = bn_kernel.ReductionGrid(call.shape, channels_last=True)
    partials_key = flags + (int_spec(rows), int_spec(c), int_spec(h * w), int_spec(grid.tiles),
                            tuple(sorted(grid.constants().items())))
    return [Compile("bn_backward_partials", partials_key, call),
            Compile("bn_sum_partials", _combine_key(c, grid.partials), call),
            Compile("bn_grad_input", flags + elementwise, call)]


def call_compiles(call) -> List[Compile]:
    """Every compile one launch triggers (duplicates included)."""
    if isinstance(call, ElementwiseCall):
        return [elementwise_compile(call)]
    if isinstance(call, BatchNormCall):
        return batch_norm_compiles(call)
    configs = [config_by_label(call.config)] if call.config else candidate_configs(call)
    if call.stats:
        return [conv_compile(call, config, 1) for config in configs] + [stats_combine_compile(call)]
    if call.split_k is not None:
        splits = [call.split_k]
    else:
        candidate = split_candidate(call)
        splits = [1] + [candidate] * (candidate > 1)
    compiles = [conv_compile(call, config, split) for split in splits for config in configs]
    return compiles + [split_epilogue_compile(call, split) for split in splits if split > 1]


def distinct_compiles(calls, already=()) -> List[Compile]:
    """The compiles of `calls` in launch order, each once, leaving out those whose keys are in `already`."""
    seen = {(c.kernel, c.key) for c in already}
    distinct = []
    for call in calls:
        for compile_ in call_compiles(call):
            if (compile_.kernel, compile_.key) not in seen:
                seen.add((compile_.kernel, compile_.key))
                distinct.append(compile_)
    return distinct


def assign_configs(calls: List[ConvCall]) -> List[ConvCall]:
    """Give each call without a config one of its candidates: per dtype, the one forced on the fewest shapes so
    far (ties in list order), so every config is checked, not only the autotuner's winner. Then top up any
    config forced on fewer than MIN_SHAPES_PER_CONFIG shapes with calls on further shapes that it fits."""
    shapes_of: Dict[tuple, set] = {}
    assigned = []
    for call in calls:
        if call.config is None:
            options = candidate_configs(call)
            config = min(options, key=lambda c: (len(shapes_of.get((call.dtype, config_label(c)), ())),
                                                 options.index(c)))
            call = replace(call, config=config_label(config))
        shapes_of.setdefault((call.dtype, call.config), set()).add(call.shape.name)
        assigned.append(call)
    for dtype in dict.fromkeys(call.dtype for call in calls):
        shapes = list(dict.fromkeys(call.shape for call in calls if call.dtype == dtype))
        for config in gpu_configs():
            label = config_label(config)
            covered = shapes_of.setdefault((dtype, label), set())
            for shape in shapes:
                if len(covered) >= MIN_SHAPES_PER_CONFIG:
                    break
                call = ConvCall(shape, dtype, True, True)
                if shape.name not in covered and config in candidate_configs(call):
                    covered.add(shape.name)
                    assigned.append(replace(call, config=label))
    return assigned


def config_coverage(calls: List[ConvCall]) -> Dict[tuple, int]:
    """(dtype, config label) -> distinct shapes it is forced on."""
    shapes: Dict[tuple, set] = {}
    for call in calls:
        if isinstance(call, ConvCall) and call.config:
            shapes.setdefault((call.dtype, call.config), set()).add(call.shape.name)
    return {key: len(names) for key, names in shapes.items()}


def count_by_kernel(compiles: List[Compile]) -> Counter:
    return Counter(c.kernel for c in compiles)
