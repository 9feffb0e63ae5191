# `make demo` and `make test` set themselves up on a fresh machine: a virtualenv, torch, triton, the extension.
PYTHON ?= python3
VENV ?= .venv
# On a machine without a GPU this pin picks the local CPU wheel; elsewhere PyPI's build for the platform.
TORCH_SPEC ?= torch==2.13.0
# CUTLASS's headers for the Hopper CUDA kernels (csrc/cuda/sm90; build.py's CUTLASS_VERSION): headers only, so none
# of the package's Python dependencies.
CUTLASS_SPEC ?= nvidia-cutlass==4.2.0.0
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export MAX_JOBS ?= 2
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: setup demo test bench clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "setuptools>=64" wheel
	$(PY) -m pip install "$(TORCH_SPEC)" ninja pybind11 pytest pytest-benchmark numpy matplotlib
	$(PY) -m pip install --no-deps "$(CUTLASS_SPEC)"
	$(PY) -m pip install triton || echo "triton is not installable here: the 'triton' backend stays unavailable"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built

demo: setup
	$(PY) -m resnet_fused demo

test: setup
	$(PY) -m pytest tests -q
	$(PY) -m pytest benchmarks -q --benchmark-disable

bench: setup
	$(PY) -m pytest benchmarks --benchmark-group-by=group

clean:
	rm -rf build *.egg-info resnet_fused/*.so $(VENV)
