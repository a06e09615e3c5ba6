# `make test` and `make demo` each build .venv on first use; nothing else needs installing.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-only machine gets the CPU build of torch; a machine with an NVIDIA driver gets the default build.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: venv test demo study bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,wandb,text]"
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) examples/digits.py

study: venv
	$(PY) -m lightning_ntk.studies.paper --out outputs/study

bench: venv
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/featurize_speed.py

clean:
	rm -rf $(VENV) lightning_logs wandb ntk_store benchmarks/results outputs
