"""The Triton conv kernel compiles for sm_90 (H100/H200) ahead of time on a machine without a GPU: both K layouts
(per tap; flat K for the stem), every dtype, tensor-core and asynchronous-copy code, every autotune config
within the 227 KB of shared memory a block may use on sm_90 (a config over it fails only on the GPU, at
autotune time), and no register spills inside the K loop (read from the SASS). The compiles run in one subprocess without TRITON_INTERPRET (see tests/triton_aot.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SM90_MAX_SHARED_PER_BLOCK = 227 * 1024


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.triton_aot"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"AOT compile for sm_90 failed:\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def _convs(compiled):
    return [case for case in compiled if case["layout"] != "split_k_epilogue"]


def test_both_layouts_and_all_dtypes_compile(compiled):
    seen = {(case["layout"], case["dtype"]) for case in _convs(compiled)}
    assert seen == {(layout, dtype) for layout in ("flat", "per_tap") for dtype in ("float16", "bfloat16", "float32")}
    assert {case["layout"] for case in _convs(compiled) if case["split_k"]} == {"flat", "per_tap"}
    assert {case["layout"] for case in _convs(compiled) if case["stats"]} == {"flat", "per_tap"}
    assert any(case["layout"] == "split_k_epilogue" for case in compiled)


def test_dots_run_on_tensor_cores_with_async_copies(compiled):
    bad = [case for case in _convs(compiled) if not (case["tensor_cores"] and case["cp_async"])]
    assert not bad, f"no tensor-core MMA or no cp.async (K loop not pipelined) in: {bad}"


def test_every_config_fits_sm90_shared_memory(compiled):
    too_big = [case for case in compiled if case["shared"] > SM90_MAX_SHARED_PER_BLOCK]
    assert not too_big, f"over {SM90_MAX_SHARED_PER_BLOCK} bytes of shared memory per block: {too_big}"


def test_no_config_spills_registers_in_the_k_loop(compiled):
    # SASS checked: a spill inside the K loop costs local-memory traffic on every step. (256x128 tiles spill in
    # the epilogue only, once per tile, and stay autotune candidates.)
    counts = [case["k_loop_spills"] for case in _convs(compiled)]
    if None in counts:
        pytest.skip("this triton ships no cuobjdump to disassemble with")
    spilling = [case for case in _convs(compiled) if case["k_loop_spills"]]
    assert not spilling, f"STL/LDL inside the K loop: {spilling}"


def test_flat_k_configs_use_four_warps(compiled):
    assert all(case["num_warps"] == 4 for case in _convs(compiled) if case["layout"] == "flat")
