# Everything a fresh machine needs: `make test` and `make demo` create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pins torch to the CPU wheel on the development machines (see constraints.txt).
PIP_INSTALL := $(PIP) install --constraint constraints.txt
XVFB := $(shell command -v xvfb-run 2>/dev/null)
XVFB_RUN := $(if $(XVFB),xvfb-run -a -s "-screen 0 1600x1000x24",)
export QT_API ?= pyqt6

.PHONY: install install-test test demo bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed-test: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e ".[napari,test]"
	touch $@

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e ".[napari]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

test: install-test
	$(PY) -m ruff check src tests benchmarks docs
	$(XVFB_RUN) $(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/phenotwin demo --viewer --out demo-output

# ~15 min on an idle 2-core CPU; prints a Markdown table, writes bench-results.json (docs/benchmarks.md).
bench: install
	$(XVFB_RUN) $(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist demo-output .pytest_cache bench-results.json
