# The two commands a new user needs: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

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

demo: install
	$(VENV)/bin/gptlab demo --out runs/demo

bench: install
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV) runs
