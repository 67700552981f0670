# The two commands a new user needs: `make demo` and `make test`. `make lint` checks the layering and the style.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser test lint demo bench clean

install: $(STAMP) browser

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on disk on the project's CI machines; a GPU machine keeps its own.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The chat page's tests drive Debian's chromium package through Playwright (never `playwright install`'s
# download). Installed here when missing, as root with apt-get; elsewhere those tests skip and say why.
browser:
	@command -v chromium >/dev/null && exit 0; \
	if ! command -v apt-get >/dev/null; then \
		echo "make: no chromium and no apt-get: tests/test_serve_page.py will skip (put a Chromium on PATH as chromium)"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "make: no chromium: 'sudo apt-get install chromium' lets tests/test_serve_page.py run (it skips without)"; \
	else \
		echo "make: installing Debian's chromium for tests/test_serve_page.py"; \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium) \
			|| echo "make: apt-get could not install chromium (above): tests/test_serve_page.py will skip"; \
	fi

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

BENCHMARKS := train_step decode pretrain_throughput prepare_throughput pretrain_memory eval_mmlu serve_throughput
bench: install
	set -e; for name in $(BENCHMARKS); do $(PY) benchmarks/$$name.py; done

clean:
	rm -rf $(VENV) runs
