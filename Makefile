# Everything a fresh machine needs: `make test` and `make demo` create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pins torch to the CPU wheel on the development machines (see constraints.txt).
PIP_INSTALL := $(PIP) install --constraint constraints.txt
XVFB := $(shell command -v xvfb-run 2>/dev/null)
XVFB_ARGS := -a -s "-screen 0 1600x1000x24"
XVFB_RUN := $(if $(XVFB),xvfb-run $(XVFB_ARGS),)
# make test always runs the GUI tests in a real (virtual) window: on Linux under Xvfb, which
# .ci/gui-packages installs when missing (or says how), since napari renders nothing offscreen.
ifeq ($(shell uname -s),Linux)
TEST_RUN := xvfb-run $(XVFB_ARGS)
endif
export QT_API ?= pyqt6

.PHONY: install install-test gui-packages test demo bench clean

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

gui-packages:
	@.ci/gui-packages

test: install-test gui-packages
	$(PY) -m ruff check src tests benchmarks docs
	$(TEST_RUN) $(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/phenotwin demo --viewer --out demo-output

# ~15 min on an idle 2-core CPU; prints a Markdown table, writes bench-results.json (docs/benchmarks.md).
bench: install
	$(XVFB_RUN) $(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist demo-output .pytest_cache bench-results.json
