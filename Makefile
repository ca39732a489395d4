# Two entry points, both from nothing: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine serves a local CPU build of torch for this exact pin; an unpinned torch pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0
# Tests read Omniglot from the shared read-only data folder beside the checkout, and cache decodes locally.
test: export METALAB_DATA ?= $(abspath ../shared/data)
test: export METALAB_CACHE ?= $(abspath .cache)

.PHONY: demo test lint format report bench-sampler docs clean

$(BIN)/metalab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test,mujoco]"
	touch $@

demo: $(BIN)/metalab
	$(BIN)/metalab train configs/maml_sinusoid.yaml

test: $(BIN)/metalab
	$(BIN)/ruff check metalab tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(BIN)/metalab
	$(BIN)/ruff check metalab tests benchmarks
	$(BIN)/ruff format --check metalab tests benchmarks

format: $(BIN)/metalab
	$(BIN)/ruff format metalab tests benchmarks
	$(BIN)/ruff check --fix metalab tests benchmarks

# API pages from the docstrings into site/; --strict fails on any warning (a broken link or cross-reference).
$(BIN)/mkdocs: pyproject.toml $(BIN)/metalab
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

docs: $(BIN)/mkdocs
	$(BIN)/mkdocs build --strict

report: $(BIN)/metalab
	$(BIN)/metalab report

bench-sampler: $(BIN)/metalab
	$(BIN)/python -m benchmarks.sampler

clean:
	rm -rf $(VENV) runs .pytest_cache
