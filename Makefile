# Two commands on a fresh machine: `make demo` and `make test`. Both create the project-local
# virtual environment first. torch is installed on its own, pinned, before the package, so that
# nothing ever resolves a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv demo test test-py test-js js clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m aiaas_lab demo

test: venv test-js test-py

test-py: venv
	$(PY) -m pytest $(PYTEST_ARGS)

js:
	cd js && npm ci --no-audit --no-fund --loglevel=error && npm run build

test-js:
	@if [ -f js/package.json ]; then cd js && npm ci --no-audit --no-fund --loglevel=error && npm test; fi

clean:
	rm -rf $(VENV) js/node_modules .pytest_cache
