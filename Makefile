# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv profiles lint format test test-fast demo ui bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# `snakemake --profile slurm` looks in ~/.config/snakemake: link the repo's profiles there, never over a user's own.
PROFILE_HOME := $(HOME)/.config/snakemake
profiles:
	@mkdir -p $(PROFILE_HOME)
	@for name in local slurm; do \
	  target=$(PROFILE_HOME)/$$name; \
	  if [ -L $$target ] && [ "$$(readlink $$target)" = "$(abspath workflow/profiles)/$$name" ]; then :; \
	  elif [ -e $$target ] || [ -L $$target ]; then echo "warning: $$target exists and is not this repo's profile; left as is (use --profile workflow/profiles/$$name)"; \
	  else ln -s $(abspath workflow/profiles)/$$name $$target && echo "linked $$target"; fi; \
	done

# ruff (format and lint) and snakefmt: nobody wraps lines by hand; `make format` rewrites, `make lint` checks.
SNAKE_FILES := Snakefile $(wildcard workflow/rules/*.smk)
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check $(SNAKE_FILES)

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/snakefmt $(SNAKE_FILES)

test: lint
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow and not cluster"

demo: $(STAMP) profiles
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile local all
	cat results/tables/ablation.md

ui: $(STAMP)  # the MLflow UI on the demo study's store, http://127.0.0.1:5000; the comparison view's address first
	@$(BIN)/python -c 'import json; print("open http://127.0.0.1:5000" + json.load(open("results/mlflow/logged.json"))["ui"])' \
		2>/dev/null || true
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath results/mlflow.db) --host 127.0.0.1 --port 5000

bench: $(STAMP)
	$(BIN)/python bench/bench_voxel_grid.py
	$(BIN)/python bench/bench_simulator.py
	$(BIN)/python bench/bench_store.py
	$(BIN)/python bench/bench_data_loader.py
	$(BIN)/python bench/bench_training.py
	$(BIN)/python bench/bench_learnability.py --config config.yaml --legs 2 --motion 4,0.6 0,0.3 --models cnn_bn vit_tiny_demo --lr 5e-4

clean:
	rm -rf results .snakemake
