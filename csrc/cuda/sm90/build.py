"""How the Hopper (sm_90a) translation units in this folder compile: where CUTLASS's headers are, and the nvcc
command line. Shared by setup.py (which links the objects into resnet_fused._C) and the compile test, so both use
one set of flags. Standard library only: setup.py loads it by path before anything is installed.

CUTLASS comes from the `nvidia-cutlass` wheel (headers only are used; pin CUTLASS_VERSION). It is found, in order:
  1. RESNET_FUSED_CUTLASS_DIR: the wheel file itself (its headers are unpacked once under build/), an unpacked
     wheel, its cutlass_library folder, or a CUTLASS checkout: for machines without network, carry the wheel
     beside the source tree and point here;
  2. the installed nvidia-cutlass package (`pip install --no-deps nvidia-cutlass==4.2.0.0`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import zipfile
from pathlib import Path
from typing import Mapping, Optional

CUTLASS_VERSION = "4.2.0.0"
CUTLASS_DIR_ENV = "RESNET_FUSED_CUTLASS_DIR"
HERE = Path(__file__).resolve().parent
SOURCES = sorted(HERE.glob("*.cu"))  # one CUTLASS instantiation each
# Everything the objects depend on besides their own source: a change to any of these rebuilds them.
HEADERS = sorted(HERE.glob("*.cuh")) + sorted(HERE.glob("*.h")) + [HERE.parent / n for n in
                                                                   ("conv_plan.h", "kernels.h", "device_utils.cuh")]

# -DNDEBUG: with assertions on, ptxas serializes wgmma (warning C7510). sm_90a: wgmma and setmaxnreg exist only
# there. No --use_fast_math: it flushes fp32 denormals in the epilogue for nothing (the epilogue is FMAs and a max).
NVCC_FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "-gencode", "arch=compute_90a,code=sm_90a",
              "--expt-relaxed-constexpr", "-lineinfo")


def _include_dirs_under(root: Path) -> Optional[list[Path]]:
    """CUTLASS's include and tools/util/include under `root` (any of the layouts in the module docstring)."""
    for source in (root / "cutlass_library" / "source", root / "source", root):
        include = source / "include"
        if (include / "cutlass" / "cutlass.h").is_file():
            util = source / "tools" / "util" / "include"
            return [include] + ([util] if util.is_dir() else [])
    return None


def _unpacked_wheel(wheel: Path) -> Path:
    """The wheel's source/ tree (the headers), unpacked once under build/cutlass/<wheel name>."""
    target = HERE.parents[2] / "build" / "cutlass" / wheel.stem
    if not (target / "cutlass_library" / "source" / "include" / "cutlass" / "cutlass.h").is_file():
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target, [n for n in archive.namelist() if n.startswith("cutlass_library/source/")])
    return target


def find_cutlass(environ: Mapping[str, str] = os.environ) -> tuple[Optional[list[Path]], str]:
    """(include dirs, where they came from) or (None, why not found)."""
    given = environ.get(CUTLASS_DIR_ENV)
    if given:
        root = Path(given)
        if root.is_file() and zipfile.is_zipfile(root):
            root = _unpacked_wheel(root)
        dirs = _include_dirs_under(root)
        if dirs is None:
            return None, f"{CUTLASS_DIR_ENV}={given} holds no include/cutlass/cutlass.h (expected an unpacked " \
                         "nvidia-cutlass wheel or a CUTLASS checkout)"
        return dirs, f"{CUTLASS_DIR_ENV}={given}"
    spec = importlib.util.find_spec("cutlass_library")  # locates the package without importing it
    if spec is None or spec.origin is None:
        return None, f"neither {CUTLASS_DIR_ENV} nor the nvidia-cutlass package (pip install --no-deps " \
                     f"nvidia-cutlass=={CUTLASS_VERSION}) is there"
    package = Path(spec.origin).parent
    dirs = _include_dirs_under(package.parent)
    if dirs is None:
        return None, f"the installed cutlass_library at {package} has no source/include"
    try:
        version = importlib.metadata.version("nvidia-cutlass")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    pin = "" if version == CUTLASS_VERSION else f"; tested with {CUTLASS_VERSION}"
    return dirs, f"nvidia-cutlass {version} at {package}{pin}"


def nvcc_command(nvcc: str, source: Path, output: Path, include_dirs: list[Path], extra: tuple = ()) -> list[str]:
    """The nvcc command that compiles one sm_90a translation unit to a position-independent object."""
    includes = [arg for d in include_dirs for arg in ("-I", str(d))]
    return [nvcc, "-c", *NVCC_FLAGS, "-Xcompiler", "-fPIC", *includes, *extra, "-o", str(output), str(source)]
