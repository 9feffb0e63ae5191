"""Which kernel the CUDA conv_bn_act runs, decided without a GPU (csrc/cuda/conv_plan.h through
resnet_fused._C.cuda_conv_plan, compiled in every build), where setup.py finds CUTLASS (csrc/cuda/sm90/build.py),
and what the "cuda" backend reports (conv_kernel_path)."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest
import torch

import resnet_fused as rf
from resnet_fused.benchmarking.layers import conv_layers

_C = pytest.importorskip("resnet_fused._C", reason="the C++ extension did not build")
from resnet_fused.ops.backends.cuda import conv_kernel_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sm90_build", ROOT / "csrc" / "cuda" / "sm90" / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

H100 = dict(cc=(9, 0), sm_count=132, sm90_built=True)
BF16 = torch.bfloat16


def plan(dtype=BF16, n=1, h=14, w=14, c_in=64, c_out=64, k=3, stride=1, padding=1, aligned=True, **gpu):
    gpu = {**H100, **gpu}
    return _C.cuda_conv_plan(dtype, n, h, w, c_in, c_out, k, stride, padding, gpu["cc"], gpu["sm_count"],
                             gpu["sm90_built"], aligned)


def test_resnet50_takes_the_sm90_kernels_but_the_stem():
    for layer in conv_layers(rf.resnet50(), image_size=224):
        for batch in (1, 256):
            kind, tile, _, reason = plan(n=batch, h=layer.h, w=layer.w, c_in=layer.cin, c_out=layer.cout,
                                      k=layer.kernel, stride=layer.stride, padding=layer.padding)
            if layer.cin == 3:
                assert (kind, reason) == ("wmma", "C_in is not a multiple of 16 bytes"), layer.name
            else:
                assert kind in ("sm90", "sm90_split_k") and tile in ("128x128", "128x64", "64x64"), (layer.name, kind)
                assert kind == "sm90" or batch == 1, f"{layer.name} splits K at batch {batch}"


@pytest.mark.parametrize("why, call, reason", [
    ("ampere", dict(cc=(8, 0)), "the GPU is not compute capability 9.0"),
    ("blackwell", dict(cc=(10, 0)), "the GPU is not compute capability 9.0"),
    ("not built", dict(sm90_built=False), "the extension was built without the sm_90a kernels"),
    ("stem", dict(c_in=3, k=7, stride=2, padding=3), "C_in is not a multiple of 16 bytes"),
    ("cout 12", dict(c_out=12), "C_out is not a multiple of 16 bytes"),
    ("fp16 cin 4", dict(dtype=torch.float16, c_in=4), "C_in is not a multiple of 16 bytes"),
    ("misaligned", dict(aligned=False), "a tensor is not 16-byte aligned"),
    ("m >= 2^31", dict(n=2 ** 31 // (64 * 64) + 1, h=64, w=64, k=1, padding=0), "N*H_out*W_out exceeds 2^31 - 1"),
    ("stride 9", dict(h=40, w=40, k=1, stride=9, padding=0), "stride exceeds TMA's traversal stride limit of 8"),
    ("padding 129", dict(padding=129), "padding is outside the TMA im2col box limits"),
    ("kernel past padding", dict(h=200, w=200, k=131, padding=1), "padding is outside the TMA im2col box limits"),
])
def test_calls_tma_cannot_take_run_on_wmma(why, call, reason):
    assert plan(**call) == ("wmma", "", 1, reason)


def test_fp32_takes_sm90_with_four_channels():
    """16 bytes of fp32 are 4 channels: TMA takes Cin = 4 in fp32 (TF32), not in fp16."""
    assert plan(dtype=torch.float32, c_in=4, c_out=4)[0] == "sm90"


@pytest.mark.parametrize("case, n, h, c_in, c_out, k, stride, tile", [
    # large M, Cout >= 128: the 128x128 tile (most reuse) fills many waves
    ("layer4 expand b256", 256, 7, 512, 2048, 1, 1, "128x128"),
    ("layer2 3x3 b256", 256, 28, 128, 128, 3, 1, "128x128"),
    # Cout = 64: a 128-wide tile would compute half zeros; the 128x64 tile instead
    ("layer1 3x3 b256", 256, 56, 64, 64, 3, 1, "128x64"),
    ("layer1 reduce b32", 32, 56, 256, 64, 1, 1, "128x64"),
    # small M (batch 1, late stages) where K is not split (fp32): 64x64 tiles to reach more SMs
    ("layer4 3x3 b1", 1, 7, 512, 512, 3, 1, "64x64"),
    ("layer3 3x3 b1", 1, 14, 256, 256, 3, 1, "64x64"),
    ("layer4 expand b1", 1, 7, 512, 2048, 1, 1, "64x64"),
])
def test_tile_choice(case, n, h, c_in, c_out, k, stride, tile):
    kind, chosen, _, _ = plan(dtype=torch.float32, n=n, h=h, w=h, c_in=c_in, c_out=c_out, k=k, stride=stride,
                              padding=k // 2)
    assert (kind, chosen) == ("sm90", tile), case


@pytest.mark.parametrize("case, call, splits", [
    # 8 output tiles of 128x64 for 132 SMs, 72 K blocks: 16 splits (the cap) of 4.5 blocks each
    ("layer4 3x3 b1", dict(h=7, w=7, c_in=512, c_out=512), 16),
    # 1x1 2048 -> 512: 32 K blocks, 8 tiles: 8 splits of 4 blocks
    ("layer4 reduce b1", dict(h=7, w=7, c_in=2048, c_out=512, k=1, padding=0), 8),
    # 512 -> 2048: 32 tiles, only 8 K blocks: 2 splits
    ("layer4 expand b1", dict(h=7, w=7, c_in=512, c_out=2048, k=1, padding=0), 2),
    ("layer3 3x3 b1", dict(h=14, w=14, c_in=256, c_out=256), 9),
    # a long K that is a plain GEMM needs no im2col copy, whatever its size
    ("1x1 K=9216", dict(h=64, w=64, c_in=9216, c_out=64, k=1, padding=0), 4),
])
def test_split_k_for_small_m(case, call, splits):
    assert plan(**call)[::2] == ("sm90_split_k", splits), case
    assert plan(dtype=torch.float16, **call)[::2] == ("sm90_split_k", splits), case


@pytest.mark.parametrize("case, call", [
    ("batch 256", dict(n=256, h=7, w=7, c_in=512, c_out=512)),
    ("fp32", dict(dtype=torch.float32, h=7, w=7, c_in=512, c_out=512)),
    ("short K", dict(h=7, w=7, c_in=64, c_out=512, k=1, padding=0)),  # 1 K block
    ("im2col over 64 MiB", dict(h=64, w=64, c_in=1024, c_out=64)),  # 4096 x 9216 bf16: 75 MB
    ("fills the SMs", dict(n=8, h=14, w=14, c_in=256, c_out=256)),
])
def test_no_split_k(case, call):
    assert plan(**call)[0] == "sm90", case


def test_tile_choice_weighs_the_last_wave():
    """196 tiles of 128x128 are 1.5 waves on 132 SMs (the second half empty): 392 tiles of 128x64 make 3 fuller
    waves and win; on 16 SMs the same conv runs 13 waves either way and the bigger tile wins."""
    call = dict(n=8, h=28, w=28, c_in=128, c_out=512, k=1, padding=0)
    assert plan(**call)[:2] == ("sm90", "128x64")
    assert plan(**call, sm_count=16)[:2] == ("sm90", "128x128")


def test_plan_rejects_bad_arguments():
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        plan(dtype=torch.float64)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        plan(h=2, w=2, k=7, padding=0)


def test_kernel_path_report():
    assert conv_kernel_path((9, 0), True).startswith("sm90:")
    without = conv_kernel_path((9, 0), False)
    assert without.startswith("sm80:") and "without the sm_90a" in without
    assert "this GPU has 8.9" in conv_kernel_path((8, 9), True)


def test_sm90_built_flag_is_a_bool():
    assert isinstance(_C.cuda_sm90_built, bool)


# --- finding CUTLASS's headers (setup.py) -------------------------------------------------------------------

def _fake_cutlass(root: Path) -> Path:
    source = root / "cutlass_library" / "source"
    (source / "include" / "cutlass").mkdir(parents=True)
    (source / "include" / "cutlass" / "cutlass.h").write_text("#pragma once\n")
    (source / "tools" / "util" / "include").mkdir(parents=True)
    return source


def test_finds_an_unpacked_wheel(tmp_path):
    source = _fake_cutlass(tmp_path)
    dirs, where = build.find_cutlass({build.CUTLASS_DIR_ENV: str(tmp_path)})
    assert dirs == [source / "include", source / "tools" / "util" / "include"] and str(tmp_path) in where


def test_finds_a_wheel_file(tmp_path, monkeypatch):
    _fake_cutlass(tmp_path / "tree")
    wheel = tmp_path / "nvidia_cutlass-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for f in (tmp_path / "tree").rglob("*"):
            archive.write(f, f.relative_to(tmp_path / "tree"))
    monkeypatch.setattr(build, "HERE", tmp_path / "a" / "b" / "c")  # unpack under tmp_path/build, not the repo's
    dirs, _ = build.find_cutlass({build.CUTLASS_DIR_ENV: str(wheel)})
    assert dirs is not None and (dirs[0] / "cutlass" / "cutlass.h").is_file()
    assert tmp_path / "build" in dirs[0].parents


def test_a_wrong_directory_says_what_it_expected(tmp_path):
    dirs, why = build.find_cutlass({build.CUTLASS_DIR_ENV: str(tmp_path)})
    assert dirs is None and "holds no include/cutlass/cutlass.h" in why


def test_nvcc_command_targets_sm90a_with_ndebug(tmp_path):
    cmd = build.nvcc_command("nvcc", Path("a.cu"), tmp_path / "a.o", [Path("/inc")])
    assert "-DNDEBUG" in cmd and "arch=compute_90a,code=sm_90a" in cmd and "-fPIC" in cmd
    assert cmd[cmd.index("-I") + 1] == "/inc"


def test_makefile_installs_the_cutlass_that_build_py_pins():
    assert f"nvidia-cutlass=={build.CUTLASS_VERSION}" in (ROOT / "Makefile").read_text()
