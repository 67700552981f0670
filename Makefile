# The two commands a new user needs: `make demo` and `make test`. `make lint` checks the layering and the style.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on disk on the project's CI machines; a GPU machine keeps its own.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(PY) -m pytest

# The import contract in pyproject.toml (layers, TinyWorld's independence, no cycles), then ruff.
LINTED := gptlab tests benchmarks
lint: install
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

PRESET ?= default
demo: install
	$(VENV)/bin/gptlab demo --preset $(PRESET) --out runs/demo

BENCHMARKS := train_step decode pretrain_throughput prepare_throughput pretrain_memory eval_mmlu
bench: install
	set -e; for name in $(BENCHMARKS); do $(PY) benchmarks/$$name.py; done

clean:
	rm -rf $(VENV) runs
