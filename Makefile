# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install clean reliability soak bench screenshots

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	scripts/ensure-postgresql
	scripts/ensure-prometheus
	scripts/ensure-chromium
	$(BIN)/python -m pytest -q

# The console screenshots in docs/images/, taken by the browser tests.
screenshots: $(STAMP)
	scripts/ensure-chromium
	KG_SCREENSHOTS_DIR=docs/images $(BIN)/python -m pytest -q tests/browser

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

reliability: $(STAMP)
	$(BIN)/python scripts/reliability_report.py

soak: $(STAMP)
	$(BIN)/python scripts/reliability_report.py --soak

# The benchmark (docs/benchmarks.md): about 40 min on 2 cores; run it on a quiet machine.
# BENCH_ARGS=--quick for a few minutes at small sizes, BENCH_ARGS='--only growth' for one section.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo-data
