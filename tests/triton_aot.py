"""Compile the Triton conv kernel for sm_90 ahead of time, without a GPU, and print what the tests check as JSON.

Run as `python -m tests.triton_aot` in a process with TRITON_INTERPRET unset: code generation and the
interpreter do not mix in one process. Cases: each K layout (per tap: a 3x3 conv; flat K: the 7x7 stem) with
every config in bf16 (the headline dtype) and fp32 (the most shared memory) and the last config in fp16, the
split-K variant of each layout, the batch-statistics epilogue of each layout (bf16, the last config), and the
split-K epilogue kernel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from resnet_fused.kernels.triton import conv_bn_act as conv_kernel
from resnet_fused.kernels.triton import tuning

SM90 = GPUTarget("cuda", 90, 32)
POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
LAYOUTS = {"flat": (7, 2, 3, tuning._FLAT_K_CONFIGS), "per_tap": (3, 1, 1, tuning._PER_TAP_CONFIGS)}


def tile(config) -> str:
    return "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))


def compile_case(dtype: str, layout: str, config, split_k: bool = False, stats: bool = False) -> dict:
    kernel, stride, padding, _ = LAYOUTS[layout]
    flat = layout == "flat"
    # In the kernel's parameter order: attrs below address parameters by position.
    signature = {"x_ptr": POINTER[dtype], "w_ptr": POINTER[dtype], "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                 "res_ptr": POINTER[dtype], "y_ptr": POINTER[dtype], "ws_ptr": "*fp32"}
    signature.update({name: "i32" for name in ("M", "H", "W", "Cin", "Ho", "Wo", "Cout", "Cin_pad")})
    # SPLIT_K: a runtime int for split K; the value 1 (no split) is specialized to a constant, as at run time.
    constants = {} if split_k else {"SPLIT_K": 1}
    if split_k:
        signature["SPLIT_K"] = "i32"
    constants.update(KH=kernel, KW=kernel, STRIDE=stride, PAD=padding, HAS_RESIDUAL=True, RELU=True,
                     INDEX_64=False, FLAT_K=flat, DOT_IN_FP32=False, INPUT_PRECISION="tf32", **config.kwargs)
    signature.update({name: "constexpr" for name in constants})
    # The epilogue's batch statistics (the train path: no residual, no ReLU): four fp32 partial pointers, or None.
    if stats:
        constants.update(HAS_RESIDUAL=False, RELU=False)
        signature.update({name: "*fp32" for name in ("count_ptr", "pivot_ptr", "mean_ptr", "m2_ptr")})
    else:
        constants.update(count_ptr=None, pivot_ptr=None, mean_ptr=None, m2_ptr=None)
        signature.update({name: "constexpr" for name in ("count_ptr", "pivot_ptr", "mean_ptr", "m2_ptr")})
    constants["STATS"] = stats
    signature["STATS"] = "constexpr"
    names = list(signature)
    aligned = ["x_ptr", "w_ptr", "scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "ws_ptr", "Cout", "Cin_pad"]
    if not flat:
        aligned.append("Cin")  # the launcher's divisibility specialization for ResNet channel counts
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(conv_kernel._conv_bn_act_kernel.fn, signature, constants, attrs)
    compiled = triton.compile(source, target=SM90, options={"num_warps": config.num_warps,
                                                            "num_stages": config.num_stages})
    ptx = compiled.asm["ptx"]
    return {"layout": layout, "dtype": dtype, "tile": tile(config), "num_warps": config.num_warps,
            "split_k": split_k, "stats": stats, "shared": compiled.metadata.shared, "tensor_cores": "wgmma" in ptx or "mma.sync" in ptx,
            "cp_async": "cp.async" in ptx, "k_loop_spills": k_loop_spills(compiled.asm["cubin"])}


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\s+(0x[0-9a-f]+)")


def k_loop_spills(cubin: bytes):
    """Local-memory spill instructions (STL/LDL) inside loops that contain a tensor-core MMA (the K loop), from
    the SASS; None where Triton ships no cuobjdump. Spills after the loop (the epilogue) run once per tile."""
    if not os.access(CUOBJDUMP, os.X_OK):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    code = [(int(address, 16), text) for address, text in _SASS.findall(sass)]
    backward = [(int(m.group(1), 16), address) for address, text in code
                if (m := _BRANCH.search(text)) and int(m.group(1), 16) < address]
    k_loops = [(lo, hi) for lo, hi in backward if any(lo <= a <= hi and "MMA" in t for a, t in code)]
    if not k_loops:
        raise RuntimeError("no loop with an MMA instruction found in the SASS")
    return sum(1 for a, t in code if re.search(r"\b(STL|LDL)\b", t) and any(lo <= a <= hi for lo, hi in k_loops))


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET unset: the interpreter cannot compile for a GPU")
    results = []
    for layout, (_, _, _, configs) in LAYOUTS.items():
        results.append(compile_case("float16", layout, configs[-1]))
        results += [compile_case(dtype, layout, config) for dtype in ("bfloat16", "float32") for config in configs]
        results.append(compile_case("bfloat16", layout, configs[0], split_k=True))
        results.append(compile_case("bfloat16", layout, configs[-1], stats=True))
    print(json.dumps(results + [compile_split_k_epilogue()]))


def compile_split_k_epilogue() -> dict:
    signature = {"ws_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": "*bf16",
                 "y_ptr": "*bf16", "M": "i32", "Cout": "i32", "SPLIT_K": "i32"}
    constants = dict(HAS_RESIDUAL=True, RELU=True, BLOCK_M=32, BLOCK_N=64)
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(conv_kernel._split_k_epilogue_kernel, signature, constants, {}),
                              target=SM90, options={"num_warps": 4})
    return {"layout": "split_k_epilogue", "dtype": "bfloat16", "shared": compiled.metadata.shared}


if __name__ == "__main__":
    main()
