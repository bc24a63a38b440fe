# Quick start:  make demo   (venv + install + demo dataset + a real precompute run + reconstructions)
#               make test   (venv + install + lint + every test, slow ones included)

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the end-to-end tests mostly wait on Ray and subprocesses, so two
# share two cores well; 1 runs them in this process, one after another.
TEST_PROCESSES ?= 2

PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo demo-vae test test-fast lint format bench clean

install: $(VENV)/.installed

# torch first, so that `pip install -e .` finds it satisfied: a torch that the base Python
# already has (e.g. a CUDA build) is kept via --system-site-packages; otherwise the pinned
# version is installed, and on a machine without an NVIDIA GPU we make sure it is a CPU
# build (a plain `pip install torch` on Linux pulls several GB of CUDA libraries).
$(VENV)/.installed: pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "keeping the torch of $(PYTHON): $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then \
	    $(PIP) install "torch==$(TORCH_VERSION)"; \
	  else \
	    $(PIP) install --dry-run --quiet --report $(VENV)/torch-plan.json "torch==$(TORCH_VERSION)" && \
	    if grep -q '"name": "nvidia-' $(VENV)/torch-plan.json; then \
	      echo "no NVIDIA GPU: installing the CPU build of torch from $(TORCH_CPU_INDEX)"; \
	      $(PIP) install --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"; \
	    else \
	      $(PIP) install "torch==$(TORCH_VERSION)"; \
	    fi; \
	  fi; \
	fi
	$(PIP) install --quiet -e '.[test]'
	@touch $@

# The demo VAE (configs/demo-vae.safetensors) was trained on other synthetic videos (seed 1);
# the reconstructions of these (seed 0) show how it does on videos it never saw.
demo: install
	$(PY) -m jobs.demo_data --output $(DEMO_DIR)/data --shards 4 --samples-per-shard 6
	$(PY) -m jobs.precompute --config configs/demo.yaml \
	  --input '$(DEMO_DIR)/data/shard-{000000..000003}.tar' --output $(DEMO_DIR)/latents
	$(PY) -m jobs.validate $(DEMO_DIR)/latents
	$(PY) -m jobs.reconstruct --latents $(DEMO_DIR)/latents --output $(DEMO_DIR)/reconstructions --limit 4

# Retrains the committed demo VAE (about 15 minutes on one CPU core).
demo-vae: install
	OMP_NUM_THREADS=1 $(PY) -m jobs.train_demo_vae --output configs/demo-vae.safetensors

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Every test, the slow end-to-end ones included (CI runs this).
test: lint
	$(PY) -m pytest -n $(TEST_PROCESSES) $(PYTEST_ARGS)

# The quick inner loop: skips the tests marked slow.
test-fast: install
	$(PY) -m pytest -n $(TEST_PROCESSES) -m "not slow" $(PYTEST_ARGS)

# The CPU benchmarks (figures, not pass/fail): throughput against its bound and baselines, the encoder
# per technique, decode memory, load memory.
bench: install
	$(PIP) install --quiet pandas  # for the Ray Data baseline
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/encoder.py
	$(PY) benchmarks/decode_memory.py
	$(PY) benchmarks/load_memory.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
