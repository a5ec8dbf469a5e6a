# Two commands: `make demo` and `make test`. Each builds .venv and the data it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test data venv clean

venv: $(STAMP)

# torch: on a machine without an NVIDIA GPU install the CPU build (torch==2.13.0 is a local
# CPU wheel on the project's machines); with a GPU keep whatever CUDA torch >= 2.6 is there.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q "torch>=2.6"; \
	else \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package where apt is usable;
# elsewhere `fedistill data fetch fashion-mnist` downloads and checks it.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  $(PY) -m launch data fetch fashion-mnist; \
	fi

demo: $(STAMP) data
	$(PY) -m launch run configs/demo.toml --against fedavg

test: $(STAMP) data
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
