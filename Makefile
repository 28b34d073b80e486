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

# What CI promises (.ci/run calls `make test`): lint first, then the suite.
test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# ruff; mypy on the packages listed in pyproject ([tool.mypy]); the import contract between the
# packages of src/aether ([tool.importlinter] in pyproject, see docs/architecture.md "Layers").
lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The order demo on a local 3-node cluster (see docs/order-demo.md): builds the demo wheels, deploys
# them into the cluster's repository (.aether/cluster/repository), applies the blueprint, prints
# curl commands and runs until Ctrl-C, then stops the nodes.
DEMO_WHEELS := build/examples/order_demo

demo: install
	rm -rf $(DEMO_WHEELS)
	$(BIN)/python examples/build.py --only order_demo --no-deploy --out $(DEMO_WHEELS)
	$(BIN)/aether cluster demo --nodes 3 --wheels $(DEMO_WHEELS) \
		--blueprint examples/order_demo/demo-order.blueprint

examples: install
	$(BIN)/python examples/build.py $(if $(REPOSITORY),--repository $(REPOSITORY))

bench: install
	$(BIN)/python bench/kv_bench.py --nodes 3 --clients 64 --seconds 10

clean:
	rm -rf $(VENV) .aether build *.egg-info src/*.egg-info
