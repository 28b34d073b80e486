PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo demo-wheels scenarios lint bench examples clean browser prometheus etcd

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip uninstall -q -y aether 2>/dev/null || true  # the distribution's old name (now aether-slices)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# What CI promises (.ci/run calls `make test`): lint first, then the suite, on PYTEST_WORKERS
# pytest-xdist workers (2; 0 runs it in one process). Whole files go to one worker (loadfile):
# module fixtures (an etcd cluster, a process cluster) stay shared by their tests. Most of the
# suite's time is spent waiting on real node processes, so two workers nearly halve it. Files
# are handed out longest first (tests/conftest.py, tests/file_seconds.json; xdist's own reorder,
# by number of tests, is off), so that both workers finish together.
# The 25 slowest tests are listed at the end: CI's output then shows what to trim when the suite
# nears its 15 minutes.
PYTEST_WORKERS ?= 2

test: lint browser prometheus etcd
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# Debian's Chromium for the dashboard's browser tests (tests/test_forge_dashboard.py drives it with
# Playwright; `playwright install` would download browsers, which we do not). Installed only when
# missing and we are root with apt-get; otherwise says why it did nothing and succeeds: the tests
# then skip with the reason.
CHROMIUM ?= /usr/bin/chromium

browser:
	@if [ -x $(CHROMIUM) ]; then \
		echo "browser: $(CHROMIUM) present"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "browser: $(CHROMIUM) missing and not root: not installing (the browser tests will skip)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "browser: $(CHROMIUM) missing and no apt-get: not installing (the browser tests will skip)"; \
	else \
		echo "browser: installing Debian's chromium with apt-get"; \
		{ apt-cache show chromium >/dev/null 2>&1 || apt-get update -q; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
			|| echo "browser: apt-get install chromium failed (the browser tests will skip)"; \
	fi

# Debian's Prometheus (the server and promtool) for tests/test_prometheus.py: `promtool check metrics`
# on the node's exposition and a real Prometheus scraping a 3-node cluster for the Grafana
# dashboard's queries (docs/grafana/aether.json). Installed like the browser above: only when
# missing and we are root with apt-get; otherwise the tests skip with the reason.
PROMETHEUS ?= /usr/bin/prometheus

prometheus:
	@if [ -x $(PROMETHEUS) ] && command -v promtool >/dev/null 2>&1; then \
		echo "prometheus: $(PROMETHEUS) and promtool present"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "prometheus: missing and not root: not installing (the Prometheus tests will skip)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "prometheus: missing and no apt-get: not installing (the Prometheus tests will skip)"; \
	else \
		echo "prometheus: installing Debian's prometheus with apt-get"; \
		{ apt-cache show prometheus >/dev/null 2>&1 || apt-get update -q; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
			|| echo "prometheus: apt-get install prometheus failed (the Prometheus tests will skip)"; \
	fi

# Debian's etcd (etcd-server: /usr/bin/etcd; etcd-client: etcdctl) for tests/test_etcd_client.py,
# which starts a real 3-member etcd cluster (tests/etcd_cluster.py). Installed like the browser
# above: only when missing and we are root with apt-get; otherwise the etcd tests skip with the reason.
ETCD ?= /usr/bin/etcd

etcd:
	@if [ -x $(ETCD) ] && command -v etcdctl >/dev/null 2>&1; then \
		echo "etcd: $(ETCD) and etcdctl present"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "etcd: missing and not root: not installing (the etcd tests will skip)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "etcd: missing and no apt-get: not installing (the etcd tests will skip)"; \
	else \
		echo "etcd: installing Debian's etcd-server and etcd-client with apt-get"; \
		{ apt-cache show etcd-server >/dev/null 2>&1 || apt-get update -q; } && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server etcd-client \
			|| echo "etcd: apt-get install etcd-server etcd-client failed (the etcd tests will skip)"; \
	fi

# ruff; mypy on the packages listed in pyproject ([tool.mypy]); the import contract between the
# packages of src/aether ([tool.importlinter] in pyproject, see docs/architecture.md "Layers").
lint: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The order demo in Aether Forge (see docs/forge.md and docs/order-demo.md): builds the demo wheels,
# starts 5 nodes, deploys the wheels, applies the blueprint, prints curl commands and the dashboard
# URL, drives load, and runs until Ctrl-C, then stops the nodes.
DEMO_WHEELS := build/examples/order_demo

demo: demo-wheels
	$(BIN)/aether forge --config examples/order_demo/forge-config.toml

# The six demo wheels, plus place-order 0.1.1 (the same code, another version) so that a Forge
# started by `make demo` can be updated: `aether forge scenario update`, or `aether update
# org.demo:place-order --to 0.1.1` against its nodes (docs/order-demo.md). The blueprints keep 0.1.0.
demo-wheels: install
	rm -rf $(DEMO_WHEELS)
	$(BIN)/python examples/build.py --only order_demo --no-deploy --out $(DEMO_WHEELS)
	$(BIN)/python examples/build.py --only order_demo --project place-order --set-version 0.1.1 \
		--no-deploy --out $(DEMO_WHEELS)

# Forge's scenarios headless with a pass/fail report (docs/forge.md "Scenarios"); SCENARIOS=all for all.
SCENARIOS ?= ci
scenarios: demo-wheels
	$(BIN)/aether forge scenario $(SCENARIOS) --config examples/order_demo/forge-config.toml

examples: install
	$(BIN)/python examples/build.py $(if $(REPOSITORY),--repository $(REPOSITORY))

bench: install
	$(BIN)/python bench/kv_bench.py --nodes 3 --clients 64 --seconds 10

clean:
	rm -rf $(VENV) .aether build dist *.egg-info src/*.egg-info
