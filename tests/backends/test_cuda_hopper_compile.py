"""The Hopper conv kernels (csrc/cuda/sm90, CUTLASS) compile for sm_90a without a GPU, with the flags setup.py uses
(csrc/cuda/sm90/build.py), and their SASS is what the design needs: wgmma (HGMMA) in the mainloop, TMA loads in
im2col mode (UTMALDG...IM2COL), no register spills, and no serialized wgmma (ptxas warning C7510).

Each CUTLASS instantiation takes one to three minutes on 2 cores, so CI compiles three: the headline bf16 128x128
conv tile and the fp32 (TF32) 64x64 one, which between them cover both MMA kinds and both tile extremes, and the
bf16 split-K GEMM (plain tiled TMA loads, no im2col mode).
RESNET_FUSED_SM90_COMPILE=all compiles every translation unit (do that after changing conv_sm90.cuh).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nvcc import NVCC_MISSING, find_cuobjdump, find_nvcc, run_compile

ROOT = Path(__file__).resolve().parents[2]
SM90_DIR = ROOT / "csrc" / "cuda" / "sm90"
_spec = importlib.util.spec_from_file_location("sm90_build", SM90_DIR / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

CI_SOURCES = ("conv_sm90_bf16_large.cu", "conv_sm90_fp32_small.cu", "gemm_sm90_bf16.cu")
SOURCES = [s for s in build.SOURCES if os.environ.get("RESNET_FUSED_SM90_COMPILE") == "all" or s.name in CI_SOURCES]
COMPILE_TIMEOUT_S = 600


NVCC = find_nvcc()
CUOBJDUMP = find_cuobjdump()
INCLUDE_DIRS, CUTLASS_WHERE = build.find_cutlass()
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason=NVCC_MISSING),
    pytest.mark.skipif(INCLUDE_DIRS is None, reason=f"no CUTLASS headers: {CUTLASS_WHERE}"),
]


def test_every_listed_kernel_has_its_translation_unit():
    """sm90_launchers.h lists the (dtype, tile) pairs the dispatcher calls; each needs its own .cu (else: link error
    on the GPU machine only)."""
    listed = re.findall(r"X\(([A-Z]\w+), ([A-Z]\w+)\)", (SM90_DIR / "sm90_launchers.h").read_text())
    assert len(listed) >= 3, "the kernel list in sm90_launchers.h was not found"
    defined = set()
    listed_split_k = re.findall(r"X\(([A-Z]\w+)\)", (SM90_DIR / "sm90_launchers.h").read_text())
    defined, defined_split_k = set(), set()
    for source in build.SOURCES:
        defined.update(re.findall(r"RF_SM90_INSTANTIATE\((\w+), (\w+)\)", source.read_text()))
        defined_split_k.update(re.findall(r"RF_SM90_GEMM_INSTANTIATE\((\w+)\)", source.read_text()))
    assert set(listed) == defined, f"listed {sorted(listed)}, instantiated {sorted(defined)}"
    assert listed_split_k and set(listed_split_k) == defined_split_k, (listed_split_k, defined_split_k)


def test_build_flags_keep_wgmma_asynchronous():
    assert "-DNDEBUG" in build.NVCC_FLAGS and "arch=compute_90a,code=sm_90a" in build.NVCC_FLAGS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile each selected source once (one at a time: each needs ~3.5 GB and both cores); map name -> result."""
    out_dir = tmp_path_factory.mktemp("sm90")
    results = {}
    for source in SOURCES:
        obj = out_dir / (source.stem + ".o")
        cmd = build.nvcc_command(NVCC, source, obj, INCLUDE_DIRS, extra=("-Xptxas", "-v"))
        rc, log, seconds = run_compile(cmd, str(obj), COMPILE_TIMEOUT_S)
        sass = ""
        if rc == 0 and CUOBJDUMP is not None:
            sass = subprocess.run([CUOBJDUMP, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
        results[source.name] = (rc, log, seconds, sass)
    print("\nsm90 compiles: " + ", ".join(f"{name} {r[2]:.0f}s" for name, r in results.items()), file=sys.stderr)
    return results


@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_without_spills_or_serialized_wgmma(compiled, source):
    rc, log, seconds, _ = compiled[source.name]
    assert rc == 0, f"nvcc failed for {source.name} ({seconds:.0f}s):\n{log}"
    assert "C7510" not in log and "wgmma serialization" not in log, f"ptxas serialized wgmma:\n{log}"
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert registers and len(spills) >= len(registers), f"ptxas -v output not understood:\n{log}"
    assert all(s == ("0", "0") for s in spills), f"register spills in {source.name}: {spills}"
    print(f"{source.name}: {max(registers)} registers, no spills, {seconds:.0f}s", file=sys.stderr)


@pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump (neither on PATH nor in triton's bundled tools)")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_sass_has_wgmma_and_tma_loads(compiled, source):
    rc, log, _, sass = compiled[source.name]
    assert rc == 0, log
    counts = {op: len(re.findall(pattern, sass)) for op, pattern in
              {"HGMMA": r"\bHGMMA\.", "UTMALDG.IM2COL": r"\bUTMALDG\.\w+\.IM2COL", "UTMALDG": r"\bUTMALDG\.",
               "UTMASTG": r"\bUTMASTG\.", "LDL/STL": r"\b(?:LDL|STL)\b"}.items()}
    print(f"{source.name} SASS: {counts}", file=sys.stderr)
    assert counts["HGMMA"] > 0, "no wgmma (HGMMA) in the SASS"
    if source.name.startswith("conv_"):
        assert counts["UTMALDG.IM2COL"] > 0, "x is not loaded by TMA in im2col mode"
    assert counts["UTMALDG"] > counts["UTMALDG.IM2COL"], "the weight is not loaded by TMA"
    assert counts["UTMASTG"] > 0, "y is not stored by TMA"
    assert counts["LDL/STL"] == 0, "local-memory traffic (spills) in the SASS"
