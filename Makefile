# The two commands of the README: `make train` (the main job) and `make test`.
# Each prepares what it needs (a virtual environment in .venv, the package installed editable with
# its extras, the Fashion-MNIST files from Debian's package) and skips the steps already done.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TRAIN_ARGS ?=

.PHONY: all install data train test lint bench docs clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
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

test: $(INSTALLED) data
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q tests bench --benchmark-disable

lint: $(INSTALLED)
	$(BIN)/python -m ruff check .

bench: $(INSTALLED)
	$(BIN)/python -m pytest bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .benchmarks
