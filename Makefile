# The README's two commands: `make demo` and `make test`. Both set themselves up on a fresh
# machine (a .venv with every extra installed); `make lint` runs ruff and mypy.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEBIAN_FASHION_MNIST := /usr/share/datasets/fashion-mnist

DEMO_RUN    ?= runs/demo
DEMO_REPO   ?= models
DEMO_MODEL  ?= fashion
DEMO_EPOCHS ?= 3

.PHONY: install test lint format protos demo demo-data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24,<27"
	$(BIN)/python -m pip install --quiet -e ".[train,serve,dev]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy training export service

# Regenerate service/_proto from protos/*.proto (a test fails when they drift apart).
protos: install
	$(BIN)/python protos/generate.py service/_proto

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Full Fashion-MNIST from Debian when we can install it (root + apt); else the committed sample.
demo-data:
	@if [ -d $(DEBIAN_FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's dataset-fashion-mnist ..."; \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "could not install dataset-fashion-mnist"; \
	fi

demo: install demo-data
	@if [ -d $(DEBIAN_FASHION_MNIST) ]; then data=$(DEBIAN_FASHION_MNIST); \
	else data=tests/data/fashion-mnist; \
	  echo "NOTE: full Fashion-MNIST unavailable (not root or no apt): training on the committed 2,000-image sample"; fi; \
	set -e; mkdir -p $$(dirname $(DEMO_RUN)); \
	$(BIN)/python -m training scratch --data-dir $$data --epochs $(DEMO_EPOCHS) \
	  --out $(DEMO_RUN) --overwrite > $(DEMO_RUN).summary.json; \
	$(BIN)/python -m export $(DEMO_RUN) --repository $(DEMO_REPO) --name $(DEMO_MODEL) \
	  --quiet > $(DEMO_RUN).export.json; \
	$(BIN)/python -m training.summary $(DEMO_RUN) $(DEMO_RUN).export.json

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
