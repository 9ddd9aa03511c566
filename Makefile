# Two entry points (see README): `make run` (main job) and `make test` (whole test suite).
# Both create .venv if needed and install what they need; on machines without an NVIDIA GPU the CPU
# build of torch is installed first, so pip never pulls the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test install

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.2,<3"; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	@touch $@

$(VENV)/.installed-run: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[examples]"
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[test]"
	@touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(PY) scripts/train_digits.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -q
