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

.PHONY: setup test test-wheel ci test-gpu lint format demo reproduce data bench bench-gpu fuzz \
	test-large figures clean test-interop

# The editable install compiles the fused CPU kernels into src/ for every instruction-set level
# of this architecture (setup.py; a few minutes on 2 cores, once). It builds against the venv's
# torch (--no-build-isolation). set-up then recompiles only when a kernel source changed
# (groupnorm build --inplace); without a compiler the CPU norms use torch's kernels, so a failed
# build does not fail set-up.
setup: $(STAMP)
	@$(PY) -m groupnorm build --inplace || echo "note: the fused CPU kernels did not build; CPU norms will use torch's kernels"

$(STAMP): pyproject.toml Makefile setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" "setuptools>=64" wheel
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]"
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
	$(PY) -m ruff check src tests benchmarks scripts tools conftest.py setup.py
	$(PY) -m ruff format --check src tests benchmarks scripts tools conftest.py setup.py

format: setup
	$(PY) -m ruff format src tests benchmarks scripts tools conftest.py setup.py
	$(PY) -m ruff check --fix src tests benchmarks scripts tools conftest.py setup.py

# The whole suite on the best instruction-set level this CPU runs, then the CPU-kernel tests
# again on each lower level it runs (GROUPNORM_CPU_ISA caps the level): an AVX-512 machine tests
# x86-64-v4, v3 and v2, an AVX2 machine v3 and v2.
CPU_KERNEL_TESTS ?= tests/test_cpu_kernels.py tests/test_numerics.py tests/test_determinism.py \
	tests/test_cpu_build.py tests/test_dispatch.py \
	tests/test_gradients_grid.py::test_fast_path_gradients_for_each_set_of_inputs_that_need_them \
	tests/test_gradients_grid.py::test_fast_path_double_backward_is_differentiable
test: setup lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q --doctest-modules tests src/groupnorm
	@levels="$$($(PY) -m groupnorm build --levels)"; best="$$(echo "$$levels" | tail -n 1)"; \
	for level in $$levels; do \
		[ "$$level" = "$$best" ] && continue; \
		echo "== the CPU-kernel tests on $$level (this CPU runs: $$(echo $$levels))"; \
		GROUPNORM_CPU_ISA=$$level $(PY) -m pytest -q $(CPU_KERNEL_TESTS) || exit 1; \
	done

# The package as users get it: a wheel (it copies the in-place build of the same sources),
# installed into a fresh venv, tested in processes with no C++ compiler on PATH and a cache
# that cannot be written.
WHEEL_VENV ?= .venv-wheel
test-wheel: setup
	rm -rf dist && $(PY) -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps . -w dist
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" "pytest>=7" hypothesis numpy
	$(WHEEL_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps dist/groupnorm-*.whl
	env -i PATH="$(CURDIR)/$(WHEEL_VENV)/bin" HOME=/nonexistent GROUPNORM_CACHE_DIR=/dev/null/cache \
		GROUPNORM_INSTALLED_TEST=1 $(WHEEL_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_installed.py $(CPU_KERNEL_TESTS)

# What CI runs (.ci/run): the suite on every level this CPU runs, then the installed wheel.
ci: test test-wheel

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
	rm -rf $(VENV) $(INTEROP_VENV) $(WHEEL_VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
