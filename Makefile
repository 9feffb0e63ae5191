# `make demo` and `make test` set themselves up on a fresh machine: a virtualenv, torch, triton, the extension.
PYTHON ?= python3
VENV ?= .venv
# On a machine without a GPU this pin picks the local CPU wheel; elsewhere PyPI's build for the platform.
TORCH_SPEC ?= torch==2.13.0
# `make test` also checks that torchvision's and timm's ResNets fuse and match, so it adds both. PyPI's torchvision
# runs only beside the torch it was built with: this pair replaces TORCH_SPEC's torch in the virtualenv (on these
# machines a CUDA 13 build, from local disk, that runs on the CPU as well; it brings the triton it pins).
TEST_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TEST_EXTRAS ?= timm
# CUTLASS's headers for the Hopper CUDA kernels (csrc/cuda/sm90; build.py's CUTLASS_VERSION): headers only, so none
# of the package's Python dependencies.
CUTLASS_SPEC ?= nvidia-cutlass==4.2.0.0
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MAX_JOBS ?= 2
# Without a GPU the CUDA sources stay out of the build unless asked for (RESNET_FUSED_CUDA=1): a CUDA torch and nvcc
# would compile every kernel, minutes on 2 cores, for nothing that can run here (tests/test_cuda_compile.py
# compiles them with nvcc alone).
ifeq ($(shell nvidia-smi -L 2>/dev/null | grep -c GPU),0)
export RESNET_FUSED_CUDA ?= 0
endif
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
BUILD := $(PY) -m pip install --no-build-isolation --no-deps -e .

.PHONY: setup demo test bench clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "setuptools>=64" wheel
	$(PY) -m pip install "$(TORCH_SPEC)" ninja pybind11 pytest pytest-benchmark numpy matplotlib
	$(PY) -m pip install --no-deps "$(CUTLASS_SPEC)"
	$(PY) -m pip install triton || echo "triton is not installable here: the 'triton' backend stays unavailable"
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(PY) -m pip install $(TEST_TORCH_SPEC) $(TEST_EXTRAS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BUILD)
	touch $@

# The test stack replaced torch: the extension is rebuilt against it (and stands for `setup` too).
$(VENV)/.test-built: $(VENV)/.test-deps $(SOURCES)
	$(BUILD)
	touch $@ $(VENV)/.built

setup: $(VENV)/.built

demo: setup
	$(PY) -m resnet_fused demo

test: $(VENV)/.test-built
	$(PY) -m pytest tests -q
	$(PY) -m pytest benchmarks -q --benchmark-disable

bench: setup
	$(PY) -m pytest benchmarks --benchmark-group-by=group

clean:
	rm -rf build *.egg-info resnet_fused/*.so $(VENV)
