# Quick start: `make demo`, `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxprune-installed

.PHONY: demo test bench bench-llm bench-llm-peer bench-compact bench-compact-peer clean

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

# LLM one-shot pruning beside llm-compressor (docs/llm.md). The peer lives in its own venv: it pins
# its own transformers, and it is a bench extra, never a dependency of fxprune.
LLMC_VENV := .venv-llmc
LLMC_STAMP := $(LLMC_VENV)/.llmcompressor-installed

$(LLMC_STAMP):
	$(PYTHON) -m venv $(LLMC_VENV)
	$(LLMC_VENV)/bin/pip install --quiet torch==2.13.0
	$(LLMC_VENV)/bin/pip install --quiet llmcompressor==0.14.0.1
	touch $(LLMC_STAMP)

bench-llm-peer: $(LLMC_STAMP)

bench-llm: $(STAMP) $(LLMC_STAMP)
	$(BIN)/python bench/llm.py --peer-python $(LLMC_VENV)/bin/python

# Compaction coverage and speed beside Torch-Pruning (docs/compact.md), the peer in its own venv.
TP_VENV := .venv-tp
TP_STAMP := $(TP_VENV)/.torch-pruning-installed

$(TP_STAMP):
	$(PYTHON) -m venv $(TP_VENV)
	$(TP_VENV)/bin/pip install --quiet torch==2.13.0
	$(TP_VENV)/bin/pip install --quiet torch-pruning==1.6.1 "transformers>=4.45" numpy
	touch $(TP_STAMP)

bench-compact-peer: $(TP_STAMP)

bench-compact: $(STAMP) $(TP_STAMP)
	$(BIN)/python bench/compact_coverage.py --peer-python $(TP_VENV)/bin/python

clean:
	rm -rf $(VENV) $(LLMC_VENV) $(TP_VENV) build *.egg-info .pytest_cache
