# Quick start: `make demo`, `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxprune-installed

.PHONY: demo test bench clean

# torch==2.13.0 goes first: a plain `torch` requirement resolved by pip on a machine without torch
# pulls a multi-GB CUDA build; the package itself only asks for torch>=2.4.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/transform_speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
