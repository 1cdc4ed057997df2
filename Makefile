# The two commands of the README: `make train` (the main job) and `make test`.
# Each prepares what it needs and skips the steps already done: `make train` a virtual environment
# in .venv with the package installed editable with its trainer's extra, `make test` nox in .venv
# (nox builds one environment per torch/Triton pair in .nox, see noxfile.py); both the
# Fashion-MNIST files from Debian's package.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TOOLS := $(VENV)/.tools
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TRAIN_ARGS ?=

.PHONY: all install data train test lint bench docs clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[train,bench]"
	touch $@

$(TOOLS): | $(BIN)/python
	$(BIN)/python -m pip install "nox>=2024.4" "ruff>=0.6"
	touch $@

install: $(INSTALLED)

# Debian's dataset-fashion-mnist puts the four .gz files in /usr/share/datasets/fashion-mnist.
# Without apt-get (or root) the trainer still finds data through --data-dir or $$TRITONBN_DATA.
data:
	@if [ -f $(FASHION_MNIST) ]; then \
		echo "Fashion-MNIST: found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist || \
		{ apt-get update -q && apt-get install -y -q dataset-fashion-mnist; } || \
		echo "warning: could not install dataset-fashion-mnist; see README (Data)"; \
	else \
		echo "warning: Fashion-MNIST not installed and apt-get unavailable; see README (Data)"; \
	fi

train: $(INSTALLED) data
	$(BIN)/tritonbn-train $(TRAIN_ARGS)

# ruff, then the suite and each benchmark once on the newest and the oldest supported pair.
test: $(TOOLS) data
	$(BIN)/nox

lint: $(TOOLS)
	$(BIN)/ruff check .

bench: $(INSTALLED)
	$(BIN)/python -m pytest bench

clean:
	rm -rf $(VENV) .nox .pytest_cache .ruff_cache .hypothesis .benchmarks
