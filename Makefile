PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench examples clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

demo: install
	$(BIN)/aether cluster demo --nodes 3

examples: install
	$(BIN)/python examples/build.py $(if $(REPOSITORY),--repository $(REPOSITORY))

bench: install
	$(BIN)/python bench/kv_bench.py --nodes 3 --clients 64 --seconds 10

clean:
	rm -rf $(VENV) .aether build *.egg-info src/*.egg-info
