# mdgru-keras — every target runs inside .venv, created by `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint bench-layer bench-data

install: $(STAMP)

$(STAMP): setup.py
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench-layer: $(STAMP)
	$(BIN)/python -m bench.bench_layer

bench-data: $(STAMP)
	$(BIN)/python -m bench.bench_data
