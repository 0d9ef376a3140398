# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: serve serve-sparse test lint install clean gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a requirement that admits a newer torch would pull CUDA wheels on a CPU machine.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/hotcold serve --model default $(SERVE_ARGS)

# The same with the FFNs run sparsely through a plan that is profiled once on first run and cached.
serve-sparse: $(STAMP)
	$(VENV)/bin/hotcold serve --model default --plan auto $(SERVE_ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The wheels benchmarks/gpu_check.sh needs on the lent GPU machine (Python 3.12, no network; it lacks only
# gguf, whose own needs are there): carry .whl with the device call.
gpu-wheels: $(STAMP)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		gguf==$$($(PY) -c "import importlib.metadata as m; print(m.version('gguf'))")

clean:
	rm -rf $(VENV) .pytest_cache
