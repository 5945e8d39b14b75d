# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# A virtual environment is created in .venv; torch 2.13.0 (the CPU wheel this machine carries)
# is installed only when no torch is importable there, so a CUDA build is never pulled by accident.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# glibc's allocator returns large blocks to the OS on free and page-faults them back on the next
# step; pinning its thresholds removes that noise from timings (docs/performance.md).
PINNED_MALLOC := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296

# The HTML report test drives a real headless Chromium (Debian's package; root or sudo needed once).
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HAVE_CHROMIUM := command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1

.PHONY: install browser demo test test-examples bench mutation clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[test,examples]"
	# torchtitan's MoE layer, used as it ships in the support matrix; --no-deps: its training-stack
	# dependencies (datasets, wandb, tensorboard) are not needed to build the layer
	$(PY) -m pip install --no-deps "torchtitan==0.3.0" "spmd_types==0.2.3" "tyro==1.0.17" \
	  "docstring_parser==0.18.0" "typeguard==4.6.1"
	# Megatron-LM's own .bin/.idx writer and reader, to test the import against (its indexed_dataset
	# module needs only torch and numpy)
	$(PY) -m pip install --no-deps "megatron-core==0.16.1"
	touch $(STAMP)

demo: $(STAMP)
	$(PINNED_MALLOC) $(PY) -m grouter_pass.demo

browser:
	@$(HAVE_CHROMIUM) || DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium \
	  || { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

# Two pytest workers on the 2-core CI; idle OpenMP threads sleep instead of spinning, since the two
# workers' thread teams share the cores (a spinning team slows the other worker many times over).
# --dist loadgroup spreads the tests one by one; files marked xdist_group keep their costly module
# fixture on one worker. The example scripts run end to end in fresh processes, each compiling from
# a cold Inductor cache, so they are their own target (CI runs both: .ci/run).
PYTEST := OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n 2 --dist loadgroup

test: $(STAMP) browser
	$(VENV)/bin/ruff check grouter_pass passes tests examples
	$(PYTEST) -m "not examples"

test-examples: $(STAMP)
	$(PYTEST) -m examples

bench: $(STAMP)
	$(PINNED_MALLOC) $(PY) examples/benchmarks/bench_sizes.py
	$(PINNED_MALLOC) $(PY) examples/benchmarks/bench_moe_block.py

# Small defects in the ops, the plan and the detector, each applied to a copy of the repository with
# the tests that must catch it (about 15 minutes; not part of `make test`; see docs/debugging.md).
mutation: $(STAMP)
	$(PY) -m tests.mutation

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
