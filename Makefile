# mdgru-keras — every target runs inside .venv, created by `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint bench-layer bench-data export bench-predict bench-localize

# `make export RUN_COARSE=runs/coarse RUN_FINE=runs/fine [EXPORT=export] [NAME=mdgru] [VERSION=3]`
RUN_COARSE ?= runs/coarse
RUN_FINE ?= runs/fine
EXPORT ?= export
NAME ?= mdgru
VERSION ?=

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

export: $(STAMP)
	$(BIN)/mdgru-localize export --coarse $(RUN_COARSE) --fine $(RUN_FINE) --out $(EXPORT) --name $(NAME) \
		$(if $(VERSION),--version $(VERSION),)

bench-predict: $(STAMP)
	$(BIN)/python -m bench.bench_predict

bench-localize: $(STAMP)
	$(BIN)/python -m bench.bench_localize
