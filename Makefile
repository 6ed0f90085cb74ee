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
DEMO_PORT   ?= 18001

.PHONY: install test lint format protos demo demo-serve demo-score demo-data prometheus-tools browser perf-analyzer clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24,<27"
	$(BIN)/python -m pip install --quiet -e ".[train,serve,dev,ray]"
	touch $(STAMP)

install: $(STAMP)

test: install prometheus-tools browser perf-analyzer
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy imaging training export service

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

# Debian's prometheus (prometheus + promtool) for tests/deploy when we can install it (root +
# apt). Without it those tests fail where this could have installed it, and skip (saying why)
# where it could not.
prometheus-tools:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's prometheus (for tests/deploy) ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends prometheus >/dev/null) || echo "could not install prometheus"; \
	else \
	  echo "NOTE: prometheus/promtool missing (not root or no apt): tests/deploy skips the Prometheus tests"; \
	fi

# Debian's chromium and chromium-driver (the page at / is tested in a real browser with
# selenium) when we can install them (root + apt); otherwise that test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium and chromium-driver (for the page's browser test) ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver >/dev/null) \
	    || echo "could not install chromium"; \
	else \
	  echo "NOTE: chromium/chromedriver missing (not root or no apt): the browser test skips"; \
	fi

# Triton's perf_analyzer (C++, from the tritonclient 2.50 wheel; libcudart from PyPI, Debian's
# libb64-0d) into build/perf_analyzer for its test; where it cannot be fetched the test skips.
perf-analyzer: install
	@mkdir -p build; $(BIN)/python bench/perf_analyzer.py --fetch-only >/dev/null 2>build/perf-analyzer-fetch.log \
	  || echo "NOTE: could not fetch perf_analyzer (build/perf-analyzer-fetch.log): its test skips"

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
	@$(MAKE) --no-print-directory demo-serve
	@$(MAKE) --no-print-directory demo-score

# Serve the exported model, classify one real test image per class over gRPC, stop the server.
demo-serve: install
	@set -e; rm -rf $(DEMO_RUN)-images; \
	$(BIN)/python -m training.write_images $(DEMO_RUN)-images --data-dir tests/data/fashion-mnist \
	  --per-class 1 > /dev/null; \
	echo "starting the server on 127.0.0.1:$(DEMO_PORT) (log: $(DEMO_RUN).serve.log) ..."; \
	$(BIN)/python -m service serve --repository $(DEMO_REPO) --host 127.0.0.1 \
	  --grpc-port $(DEMO_PORT) --http-port -1 --metrics-port -1 --poll-interval-s 0 2> $(DEMO_RUN).serve.log & \
	pid=$$!; trap 'kill -TERM $$pid 2>/dev/null; wait $$pid' EXIT; \
	$(BIN)/python -m service health --server 127.0.0.1:$(DEMO_PORT) --wait-s 60 > /dev/null; \
	echo "classifying one test image per class (folder = true label) over gRPC:"; \
	$(BIN)/python -m service classify --server 127.0.0.1:$(DEMO_PORT) --model $(DEMO_MODEL) \
	  --top-k 2 $(DEMO_RUN)-images/*/*.png

# Score a folder of real test images (50 per class, plus one broken file) into a Parquet table.
demo-score: install
	@set -e; rm -rf $(DEMO_RUN)-folder; \
	$(BIN)/python -m training.write_images $(DEMO_RUN)-folder --data-dir tests/data/fashion-mnist \
	  --per-class 50 > /dev/null; \
	echo "this is not a picture" > $(DEMO_RUN)-folder/broken.png; \
	echo "scoring $(DEMO_RUN)-folder (501 files) into $(DEMO_RUN)-scores.parquet ..."; \
	$(BIN)/python -m service score $(DEMO_RUN)-folder --model $(DEMO_MODEL) \
	  --repository $(DEMO_REPO) --out $(DEMO_RUN)-scores.parquet --overwrite 2> $(DEMO_RUN).score.log; \
	echo "summary: $(DEMO_RUN)-scores.parquet.summary.json, map: $(DEMO_RUN)-scores.parquet.bottleneck.png"

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
