# The README's two commands: `make demo` (set up + run the demo) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python

.PHONY: setup demo test bench clean

# Re-install only when the dependencies change. Plain PyPI torch + torchvision + timm (CPU works).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/vitdeploy demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/real_models.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
