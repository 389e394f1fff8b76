# Two commands on a fresh machine (python3, pip, gcc): `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test build bench bench-full annotate clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Reinstall when any source the build reads changes.
SOURCES := setup.py pyproject.toml requirements-dev.txt tools/pgo_build.py $(wildcard cli/*.pyx engine/*.pyx engine/*.pxd ledger/*.pyx ledger/*.pxd ledger/*.h protocols/*.pyx protocols/*.pxd protocols/*.h)
# The build runs without isolation so that the extensions compile against the numpy the venv
# runs (one ABI); its build requirements (pyproject.toml) are therefore installed first.
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install -q "setuptools>=68" wheel "Cython>=3.0,<4" "numpy>=1.26"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	@# the engine's core again, profile-guided (tools/pgo_build.py; skipped for a debug build)
	if [ -z "$$YIKATONG_DEBUG" ] || [ "$$YIKATONG_DEBUG" = 0 ]; then $(PY) tools/pgo_build.py; fi
	touch $(STAMP)

build: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/yikatong demo

test: $(STAMP)
	@tools/install-chromium.sh
	$(PY) -m pytest -q tests bench --benchmark-disable -p no:cacheprovider

# CI-sized benchmarks (small sizes), with the figures printed.
bench: $(STAMP)
	YIKATONG_BENCH_SIZE=small $(PY) -m pytest -q bench --benchmark-only --benchmark-columns=min,median,mean,ops -p no:cacheprovider

# Full-size benchmarks for bench/README.md.
bench-full: $(STAMP)
	YIKATONG_BENCH_SIZE=full $(PY) -m pytest -q bench --benchmark-only --benchmark-columns=min,median,mean,ops -p no:cacheprovider

# HTML annotation of the Cython modules (cython -a): white lines are pure C.
annotate: $(STAMP)
	$(VENV)/bin/cython -3 -a -I engine -I protocols -I ledger engine/*.pyx protocols/*.pyx ledger/*.pyx cli/*.pyx 2>/dev/null || true
	@ls -1 engine/*.html protocols/*.html ledger/*.html cli/*.html 2>/dev/null

clean:
	rm -rf build *.egg-info $(VENV) cli/*.c cli/*.so engine/*.c engine/*.so ledger/*.c ledger/*.so protocols/*.c protocols/*.so
