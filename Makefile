# Each command does its own set-up from nothing:
#   make book   executes every chapter at its default parameters and builds _build/html
#   make test   runs the whole test suite (chapters at their test-sized parameters included)
#   make lab    starts JupyterLab on book/ (a free local port; prints the URL) to run the chapters yourself
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS := constraints.txt
EXTRAS      := book,test
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.lmcore-installed

.PHONY: all setup book lab test test-gpu clean

all: test

setup: $(STAMP)

# Re-install whenever the package metadata or the pinned versions change.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

book: setup
	$(PY) -m lmcore.book build

lab: setup
	$(PY) -m lmcore.lab book

test: setup
	$(PY) -m pytest

# On a CUDA machine: the kernel tests at real sizes and every test marked gpu.
test-gpu: setup
	$(PY) -m pytest -q tests/kernels tests/sparse tests/train/test_fused_adamw.py
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf _build _stage .pytest_cache
