# Every target does its own set-up on a fresh machine: a virtual environment in $(VENV), torch
# from $(TORCH_SPEC) (override for a CUDA build, e.g. make test TORCH_SPEC="torch==2.13.0"
# with your own index), then this package in editable mode with its dev tools.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
DATA_DIR ?= /usr/share/datasets/fashion-mnist
PY := $(VENV)/bin/python
STAMP := $(VENV)/.groupnorm-installed

.PHONY: setup test test-isa ci test-gpu lint format demo reproduce data bench bench-gpu fuzz \
	test-large figures clean test-interop

# set-up ends by building the fused CPU kernels (groupnorm build: about a minute once, then
# cached), so that no test or demo pays for it inside a timed step; without a compiler the
# CPU norms use torch's kernels, so a failed build does not fail set-up.
setup: $(STAMP)
	@$(PY) -m groupnorm build || echo "note: the fused CPU kernels did not build; CPU norms will use torch's kernels"

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check "$(TRITON_SPEC)" \
		|| echo "note: $(TRITON_SPEC) did not install; Triton interpreter tests will be skipped"
	touch $(STAMP)

# Fashion-MNIST from Debian's package when it is missing and apt-get can install it.
data:
	@if [ -f "$(DATA_DIR)/train-images-idx3-ubyte.gz" ] || [ -f "$(DATA_DIR)/train-images-idx3-ubyte" ]; then \
		echo "Fashion-MNIST found in $(DATA_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	else \
		echo "Fashion-MNIST is missing from $(DATA_DIR): install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) or pass DATA_DIR=..."; exit 1; \
	fi

lint: setup
	$(PY) -m ruff check src tests benchmarks scripts tools conftest.py
	$(PY) -m ruff format --check src tests benchmarks scripts tools conftest.py

format: setup
	$(PY) -m ruff format src tests benchmarks scripts tools conftest.py
	$(PY) -m ruff check --fix src tests benchmarks scripts tools conftest.py

test: setup lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q --doctest-modules tests src/groupnorm

# The CPU-kernel tests against a second build of the kernels for another instruction set
# (its own cache key): x86-64-v3 (AVX2, FMA, F16C) has no AVX-512, so the code paths that the
# native build of an AVX-512 machine skips run here. A few minutes on 2 cores.
CPU_ISA2 ?= x86-64-v3
CPU_KERNEL_TESTS ?= tests/test_cpu_fast.py tests/test_numerics.py tests/test_determinism.py tests/test_cpu_build.py
test-isa: setup
	GROUPNORM_CPU_ISA=$(CPU_ISA2) $(PY) -m groupnorm build
	GROUPNORM_CPU_ISA=$(CPU_ISA2) $(PY) -m pytest -q $(CPU_KERNEL_TESTS)

# What CI runs (.ci/run): the whole suite on the native build, then the CPU-kernel tests on the
# second instruction set.
ci: test test-isa

# Property tests with a big budget: $(FUZZ_EXAMPLES) random examples per property (fresh seeds
# each run); prints how many examples ran. make test runs the same properties with 50 each.
FUZZ_EXAMPLES ?= 10000
fuzz: setup
	GROUPNORM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s tests/test_properties.py

# Tensors beyond 2^31 elements on the CPU path (about 13 GiB of RAM, a few minutes).
# The Triton tests compiled on a CUDA GPU instead of the interpreter. Needs a CUDA build of
# torch: e.g. make test-gpu TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
test-gpu: setup
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/test_triton_interpreter.py

test-large: setup
	GROUPNORM_LARGE_TESTS=1 $(PY) -m pytest -q tests/test_large.py

# The paper's Figure 1 in miniature (BN vs GN at 32 and 1 images per worker, a few minutes):
# writes runs/quick/{results.jsonl,table.txt,error_vs_batch.png,report.md}. A second call
# reuses the finished runs and only redraws the table and plot (groupnorm demo is
# groupnorm reproduce --preset quick --resume).
demo: setup data
	$(PY) -m groupnorm demo --data $(DATA_DIR) --out runs/quick

# GPU benchmark of the Triton kernels (needs a CUDA build of torch and a GPU; see docs/triton.md).
bench-gpu: setup
	$(PY) benchmarks/bench_triton_gpu.py

figures: setup
	$(PY) scripts/draw_figure2.py docs/figure2.png

# The benchmark suite (a few minutes on 2 cores); BENCH_ARGS=--quick for a smoke run.
BENCH_ARGS ?=
bench: setup
	$(PY) -m groupnorm bench --plot $(BENCH_ARGS)

# Conversions of real timm and torchvision models (tests/interop), in a virtual environment of
# their own: torchvision's wheels need the full torch build from the package index (several
# GB with its CUDA libraries; the tests run on the CPU), so this is not part of make test.
# INTEROP_TORCH_SPEC uses === (this exact version string) so that a CPU-only local build such
# as 2.13.0+cpu is not picked in its place; keep it the same release as TORCHVISION_SPEC needs.
INTEROP_VENV ?= .venv-interop
INTEROP_TORCH_SPEC ?= torch===2.13.0
TORCHVISION_SPEC ?= torchvision==0.28.0
TIMM_SPEC ?= timm==1.0.31
INTEROP_PY := $(INTEROP_VENV)/bin/python
INTEROP_STAMP := $(INTEROP_VENV)/.groupnorm-installed

$(INTEROP_STAMP): pyproject.toml Makefile
	test -x $(INTEROP_PY) || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_PY) -m pip install -q --disable-pip-version-check "$(INTEROP_TORCH_SPEC)" \
		"$(TORCHVISION_SPEC)" "$(TIMM_SPEC)"
	$(INTEROP_PY) -m pip install -q --disable-pip-version-check -e ".[interop]" "pytest>=7"
	touch $(INTEROP_STAMP)

test-interop: $(INTEROP_STAMP)
	GROUPNORM_INTEROP_TESTS=1 $(INTEROP_PY) -m pytest -q tests/interop

clean:
	rm -rf $(VENV) $(INTEROP_VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
