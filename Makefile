# Two commands on a fresh machine:
#   make demo   -> installs into .venv if needed, materializes the whole asset graph on the bundled demo (CPU, offline)
#   make test   -> installs into .venv if needed: lint, the whole test suite, and a non-editable install check
# Also: make test-fast (skips tests marked slow), make lint, make ui (the instance make demo wrote).
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test test-fast lint check-install install benchmarks ui screenshots browser clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch must be exactly 2.13.0 (CPU wheel) and installed first; every later call is constrained to it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# make demo ARGS=--force (re-run up-to-date stages) / ARGS=--verbose (every Dagster event)
demo: $(STAMP)
	$(PY) -m spatial_assets.orchestration.demo_run $(ARGS)

# The UI tests drive a real headless Chromium (Debian's package); installed here when running as root.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: tests/test_ui.py will be skipped"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) browser lint
	$(PY) -m pytest -q tests
	$(MAKE) check-install

test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow" tests

# A wheel installed (non-editable) into a throw-away venv runs a small graph from another folder.
check-install: $(STAMP)
	bash scripts/check_install.sh

benchmarks: $(STAMP)
	$(PY) -m benchmarks.run_all

ui: $(STAMP)
	SPATIAL_ASSETS_CONFIG=$(CURDIR)/dagster_project.yaml DAGSTER_HOME=$(CURDIR)/work/dagster_home $(VENV)/bin/dagster dev -w workspace.yaml

screenshots: $(STAMP) browser
	$(PY) scripts/ui_screenshots.py --dagster-home work/dagster_home --config dagster_project.yaml --out work/screenshots

clean:
	rm -rf work dagster_home benchmarks/results
