# Two commands on a fresh machine:
#   make demo   -> installs into .venv if needed, materializes the whole asset graph on the bundled demo (CPU, offline)
#   make test   -> installs into .venv if needed, runs the test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test install benchmarks ui screenshots browser clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch must be exactly 2.13.0 (CPU wheel) and installed first; every later call is constrained to it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m spatial_assets.demo_run

# The UI tests drive a real headless Chromium (Debian's package); installed here when running as root.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: tests/test_ui.py will be skipped"; }

test: $(STAMP) browser
	$(PY) -m pytest -q tests

benchmarks: $(STAMP)
	$(PY) -m benchmarks.run_all

ui: $(STAMP)
	DAGSTER_HOME=$(CURDIR)/dagster_home $(VENV)/bin/dagster dev -w workspace.yaml

screenshots: $(STAMP) browser
	$(PY) scripts/ui_screenshots.py --dagster-home work/dagster_home --config dagster_project.yaml --out work/screenshots

clean:
	rm -rf work dagster_home benchmarks/results
