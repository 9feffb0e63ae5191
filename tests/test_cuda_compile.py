"""The CUDA kernels (csrc/cuda/*.cu) compile for sm_80 and sm_90 with nvcc, and the torch binding passes a
C++ syntax check; both run on machines without a GPU (CI), so kernel build breaks show up before a GPU run.

Each .cu file includes only CUDA headers (see csrc/cuda/kernels.h), so `nvcc -c` needs no torch. The compiles use
the flags torch's CUDAExtension adds (no implicit half/bf16 conversions or operators) and setup.py's nvcc flags,
and run two at a time: each takes a few seconds on 2 cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.nvcc import NVCC_MISSING, find_nvcc, run_compile

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
# What torch.utils.cpp_extension passes to nvcc for every CUDAExtension, plus setup.py's own nvcc flags.
TORCH_NVCC_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
SETUP_NVCC_FLAGS = ("-O3", "--use_fast_math", "--expt-relaxed-constexpr")
COMPILE_TIMEOUT_S = 240
HOST_ONLY = {"conv_dispatch.cu"}  # host code only (the dispatcher): no kernels for ptxas to report


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason=NVCC_MISSING)


def _compile(cu_file: Path, arch: str, out_dir: str, defines: tuple = ()) -> tuple[int, str, float]:
    out = os.path.join(out_dir, f"{cu_file.stem}_{arch}{len(defines)}.o")
    cmd = [NVCC, "-c", "-std=c++17", f"-arch={arch}", "-I", str(CUDA_DIR), *TORCH_NVCC_DEFINES, *SETUP_NVCC_FLAGS,
           *defines, "-Xptxas", "-v", "-o", out, str(cu_file)]  # -v: ptxas reports each kernel's registers and spills
    return run_compile(cmd, out, COMPILE_TIMEOUT_S)


@pytest.fixture(scope="module")
def compiled():
    """Compile every (file, arch) pair once, two at a time; map (file name, arch) -> (rc, log, seconds)."""
    pairs = [(f, arch) for f in CU_FILES for arch in ARCHS]
    with tempfile.TemporaryDirectory(prefix="rf_nvcc_") as out_dir, ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda pair: _compile(*pair, out_dir), pairs))
    table = {(f.name, arch): result for (f, arch), result in zip(pairs, results)}
    timings = ", ".join(f"{name}/{arch} {secs:.1f}s" for (name, arch), (_, _, secs) in table.items())
    print(f"\nnvcc compile times: {timings}", file=sys.stderr)
    return table


def test_kernel_sources_exist():
    names = {f.name for f in CU_FILES}
    assert {"conv_bn_act.cu", "conv_dispatch.cu", "elementwise.cu"} <= names, f"missing CUDA kernel sources, found {sorted(names)}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu_file", CU_FILES, ids=[f.name for f in CU_FILES])
def test_nvcc_compiles(compiled, cu_file, arch):
    rc, log, elapsed = compiled[(cu_file.name, arch)]
    assert rc == 0, f"nvcc failed for {cu_file.name} on {arch} (rc={rc}, {elapsed:.1f}s):\n{log}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu_file", CU_FILES, ids=[f.name for f in CU_FILES])
def test_no_kernel_spills_registers(compiled, cu_file, arch):
    # A spill in the conv's K loop goes to local memory on every iteration: ptxas says so at compile time.
    rc, log, _ = compiled[(cu_file.name, arch)]
    assert rc == 0, log
    reports = re.findall(r"Function properties for (\w+)\s+\d+ bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", log)
    entries = log.count("Compiling entry function")
    assert len(reports) >= entries, f"ptxas -v output not understood:\n{log}"
    assert entries > 0 or cu_file.name in HOST_ONLY, f"no kernels compiled from {cu_file.name}:\n{log}"
    spilling = [(name, int(stores), int(loads)) for name, stores, loads in reports if (stores, loads) != ("0", "0")]
    assert not spilling, f"functions spilling registers (name, store bytes, load bytes) on {arch}: {spilling}"


@needs_nvcc
def test_dispatcher_compiles_with_the_hopper_kernels_declared(tmp_path):
    """With RESNET_FUSED_WITH_SM90 the dispatcher calls the sm90 launchers (declared in sm90/sm90_launchers.h,
    defined in the CUTLASS translation units that test_cuda_hopper_compile.py compiles)."""
    rc, log, _ = _compile(CUDA_DIR / "conv_dispatch.cu", "sm_90", str(tmp_path), ("-DRESNET_FUSED_WITH_SM90=1",))
    assert rc == 0, log


def _torch_include_dirs():
    base = Path(torch.__file__).parent / "include"
    return [base, base / "torch" / "csrc" / "api" / "include"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_binding_syntax():
    """binding.cpp (the torch side) parses and type-checks against this torch's headers and the CUDA headers.

    A CPU-only torch wheel lacks the build-generated c10/cuda/impl/cuda_cmake_macros.h, so an empty stand-in is
    put last on the include path (a CUDA torch's real header wins). Linking needs libc10_cuda: not checked here.
    """
    include_dirs = _torch_include_dirs()
    if not (include_dirs[0] / "c10" / "cuda" / "CUDAGuard.h").exists():
        pytest.skip("this torch install has no c10/cuda headers")
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += [Path(NVCC).resolve().parent.parent / "include"] if NVCC else []
    candidates += [Path("/usr/local/cuda/include")]
    cuda_include = next((c for c in candidates if (c / "cuda_runtime_api.h").exists()), None)
    if cuda_include is None:
        pytest.skip(f"no CUDA headers (cuda_runtime_api.h) in {[str(c) for c in candidates]}")
    with tempfile.TemporaryDirectory(prefix="rf_stub_") as stub:
        macros = Path(stub) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n")
        cmd = ["g++", "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror", "-DRESNET_FUSED_WITH_CUDA=1",
               "-I", str(CUDA_DIR)]
        for d in include_dirs:
            cmd += ["-isystem", str(d)]
        cmd += ["-isystem", str(cuda_include), "-idirafter", stub, str(CUDA_DIR / "binding.cpp")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stderr}{proc.stdout}"
