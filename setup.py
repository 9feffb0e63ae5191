"""Builds resnet_fused._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

RESNET_FUSED_CUDA=1 forces the CUDA sources in (the build fails loudly if it cannot), RESNET_FUSED_CUDA=0 leaves
them out. Ninja builds it; MAX_JOBS bounds its parallelism.

With CUDA, the Hopper kernels (csrc/cuda/sm90: CUTLASS, TMA + wgmma) are built too when CUTLASS's headers are
found (csrc/cuda/sm90/build.py says where it looks: RESNET_FUSED_CUTLASS_DIR, else the installed nvidia-cutlass
package) and TORCH_CUDA_ARCH_LIST, if set, names a 9.x arch. They need their own nvcc flags (sm_90a only,
-DNDEBUG), so they compile as separate objects, in parallel with the rest, and are linked in. Without CUTLASS the
build goes on without them (and says so); RESNET_FUSED_SM90=1 makes that an error, RESNET_FUSED_SM90=0 skips them.
"""

import glob
import importlib.util
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_sm90_build():
    spec = importlib.util.spec_from_file_location("resnet_fused_sm90_build",
                                                  os.path.join(HERE, "csrc", "cuda", "sm90", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SM90 = _load_sm90_build()


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def _env_flag(name):
    """True/False when the variable is set to a yes/no value, None when unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def _want_cuda():
    forced = _env_flag("RESNET_FUSED_CUDA")
    if forced is not None:
        return forced
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sm90_include_dirs():
    """CUTLASS's include dirs when the Hopper kernels are to be built, else None (after saying why)."""
    forced = _env_flag("RESNET_FUSED_SM90")
    if forced is False:
        return None
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if forced is None and arch_list and not any(a.strip().startswith("9") for a in arch_list.replace(";", " ").split()):
        print(f"resnet_fused: TORCH_CUDA_ARCH_LIST={arch_list} names no Hopper arch: building without the sm_90a "
              "kernels", file=sys.stderr)
        return None
    include_dirs, where = SM90.find_cutlass()
    if include_dirs is None:
        message = f"resnet_fused: CUTLASS headers not found ({where}): building without the Hopper (sm_90a) " \
                  "kernels; conv_bn_act runs the portable WMMA kernel on every GPU"
        if forced:
            raise RuntimeError(message + " (RESNET_FUSED_SM90=1 asked for them)")
        print(message, file=sys.stderr)
        return None
    print(f"resnet_fused: building the Hopper (sm_90a) kernels with CUTLASS from {where}", file=sys.stderr)
    return include_dirs


# CPU kernels compiled once per instruction set (csrc/cpu/isa/<name>_<isa>.cpp), each with that set's flags, as
# ATen compiles its own; csrc/cpu/batch_norm.cpp calls the widest one that this CPU and ATen's dispatch allow. Off
# x86-64 only the baseline ("default") build exists. -ffp-contract=off: a * b + c rounds twice, as torch's eager
# ops do, never as one fused multiply-add, so every instruction set computes the reference's bits (the training
# BatchNorm backward recomputes the forward's ReLU mask and must get it bit for bit). Only these files get it.
ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    # -Wno-maybe-uninitialized: GCC 12 flags its own _mm512_undefined_* in ATen's AVX-512 headers, thousands of times
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512", "-Wno-maybe-uninitialized"],
}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _isa_sources():
    """[(source, extra flags)] of the csrc/cpu/isa files this machine's build compiles."""
    chosen = []
    for source in _sources("csrc/cpu/isa/*.cpp"):
        isa = Path(source).stem.rsplit("_", 1)[1]
        if isa == "default" or X86:
            chosen.append((source, [*ISA_FLAGS[isa], "-ffp-contract=off"]))
    return chosen


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # C++20: torch's own default for extensions, and what its headers require from torch 2.14 on (ATen.h)
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    isa_sources = _isa_sources()
    macros = [("RESNET_FUSED_X86_KERNELS", "1")] if X86 else []
    if not _want_cuda():
        extension = CppExtension("resnet_fused._C", sources, define_macros=macros,
                                 extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
        extension.isa_sources = isa_sources
        return extension
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    macros.append(("RESNET_FUSED_WITH_CUDA", "1"))
    sm90_include_dirs = _sm90_include_dirs()
    if sm90_include_dirs is not None:
        macros.append(("RESNET_FUSED_WITH_SM90", "1"))
    extension = CUDAExtension("resnet_fused._C", sources, define_macros=macros,
                              extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                              extra_link_args=["-fopenmp"])
    extension.sm90_include_dirs = sm90_include_dirs
    extension.isa_sources = isa_sources
    return extension


def _stale(obj: Path, command: list, inputs: list) -> bool:
    """Whether `obj` must be rebuilt: missing, older than an input, or built by another command."""
    stamp = obj.with_suffix(".cmd")
    if not obj.exists() or not stamp.exists() or stamp.read_text() != " ".join(command):
        return True
    built = obj.stat().st_mtime
    return any(p.stat().st_mtime > built for p in inputs)


def _compile(command: list, obj: Path) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}):\n$ {' '.join(command)}\n{proc.stderr}{proc.stdout}")
    obj.with_suffix(".cmd").write_text(" ".join(command))


class BuildWithSm90(BuildExtension):
    """BuildExtension that also compiles csrc/cuda/sm90's translation units with their own flags, in parallel with
    ninja's build of the rest, and csrc/cpu/isa's with theirs before it, and links their objects in."""

    def _compile_isa_sources(self, ext):
        for source, flags in getattr(ext, "isa_sources", ()):
            args = {key: list(value) for key, value in ext.extra_compile_args.items()}
            args["cxx"] = args["cxx"] + flags
            ext.extra_objects = [*ext.extra_objects, *self.compiler.compile(
                [source], output_dir=self.build_temp, macros=ext.define_macros, include_dirs=ext.include_dirs,
                extra_postargs=args, depends=ext.depends)]

    def build_extension(self, ext):
        self._compile_isa_sources(ext)
        include_dirs = getattr(ext, "sm90_include_dirs", None)
        if include_dirs is None:
            return super().build_extension(ext)
        out_dir = Path(self.build_temp).resolve() / "sm90"
        out_dir.mkdir(parents=True, exist_ok=True)
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
        pool = ThreadPoolExecutor(max_workers=jobs)
        futures, objects = [], []
        for source in SM90.SOURCES:
            obj = out_dir / (source.stem + ".o")
            command = SM90.nvcc_command(nvcc, source, obj, include_dirs)
            if _stale(obj, command, [source, *SM90.HEADERS]):
                futures.append(pool.submit(_compile, command, obj))
            objects.append(str(obj))
        ext.extra_objects = [*ext.extra_objects, *objects]
        ext.depends = [*ext.depends, *(str(p) for p in (*SM90.SOURCES, *SM90.HEADERS))]
        link = self.compiler.link_shared_object

        def link_after_sm90(*args, **kwargs):
            for future in futures:
                future.result()  # raises the nvcc error, if any
            return link(*args, **kwargs)

        self.compiler.link_shared_object = link_after_sm90
        try:
            super().build_extension(ext)
        finally:
            self.compiler.link_shared_object = link
            pool.shutdown(wait=True)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildWithSm90.with_options(use_ninja=True)},
)
