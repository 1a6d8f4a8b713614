# Two entry points for a fresh machine: `make train` and `make test`. Both create and reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install train test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python -m seg_densenet.train $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check seg_densenet tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check seg_densenet tests benchmarks
	$(BIN)/ruff format --check seg_densenet tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun
