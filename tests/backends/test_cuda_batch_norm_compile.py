"""The CUDA training BatchNorm kernels (csrc/cuda/batch_norm.cu) compile for sm_90 without a GPU (the flags of
tests/test_cuda_compile.py, which also checks ptxas's spill report for every .cu), and their SASS is what the
design needs: 128-bit global loads and stores in the vector path of the elementwise kernels, no local memory
anywhere, and every kernel instantiated for the three dtypes."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.nvcc import NVCC_MISSING, find_cuobjdump, find_nvcc, run_compile
from tests.test_cuda_compile import CUDA_DIR, SETUP_NVCC_FLAGS, TORCH_NVCC_DEFINES

NVCC = find_nvcc()
CUOBJDUMP = find_cuobjdump()
pytestmark = pytest.mark.skipif(NVCC is None, reason=NVCC_MISSING)
KERNELS = ("stats_partials_kernel", "stats_combine_kernel", "backward_partials_kernel", "sum_partials_kernel",
           "apply_kernel", "grad_input_kernel")


@pytest.fixture(scope="module")
def sass(tmp_path_factory) -> dict:
    """Kernel (mangled name) -> its SASS, compiled for sm_90."""
    if CUOBJDUMP is None:
        pytest.skip("no cuobjdump on PATH or in triton's package")
    out = str(tmp_path_factory.mktemp("bn") / "batch_norm_sm90.o")
    rc, log, _ = run_compile([NVCC, "-c", "-std=c++17", "-arch=sm_90", "-I", str(CUDA_DIR), *TORCH_NVCC_DEFINES,
                              *SETUP_NVCC_FLAGS, "-o", out, str(CUDA_DIR / "batch_norm.cu")], out, 300)
    assert rc == 0, log
    text = subprocess.run([CUOBJDUMP, "-sass", out], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return dict(zip(parts[1::2], parts[2::2]))


def _of(sass, kernel, template_args):
    found = [code for name, code in sass.items() if kernel in name and template_args in name]
    assert found, f"no {kernel} with {template_args} in {sorted(sass)}"
    return found


def test_every_kernel_in_every_dtype(sass):
    for kernel in KERNELS:
        for dtype in ("If", "I6__half", "I13__nv_bfloat16"):
            if kernel != "sum_partials_kernel":  # dtype-free: it reads fp32 partials
                _of(sass, kernel, dtype)


@pytest.mark.parametrize("kernel", ["apply_kernel", "grad_input_kernel"])
@pytest.mark.parametrize("vector", ["IfLi4E", "I6__halfLi8E", "I13__nv_bfloat16Li8E"])
def test_vector_path_moves_16_bytes_per_access(sass, kernel, vector):
    (code,) = _of(sass, kernel, vector)
    assert re.search(r"LDG\.E\.128", code) and re.search(r"STG\.E\.128", code), code[:2000]


def test_no_local_memory(sass):
    spilling = [name for name, code in sass.items() if re.search(r"\b(LDL|STL)\b", code)]
    assert not spilling, f"local-memory accesses (spills) in {spilling}"
