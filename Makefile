# Two commands do all the set-up on a fresh machine:
#   make run    - create .venv, install, and generate an image with the shipped model
#   make test   - create .venv, install (plus the Debian packages the tests use), and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROMPT ?= red heart, twemoji style
OUT    ?= outputs/sample.png

.PHONY: install system-deps run lint test clean

$(VENV)/.installed: setup.cfg constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[train,demo,test]"
	# OpenAI's CLIP BPE vocabulary ships inside open_clip_torch; --no-deps keeps its torchvision requirement out.
	$(PY) -m pip install -q --no-deps open_clip_torch
	touch $@

install: $(VENV)/.installed

# Debian packages the tests use: Chromium for the browser test, Noto emoji and Fashion-MNIST as real data, and g++
# with ninja to build the C++ kernels (hf_scratch/fast/kernels/: Winograd tiles, bfloat16 attention).
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in chromium fonts-noto-color-emoji dataset-fashion-mnist g++ ninja-build; do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi; \
	else echo "not root: skipping apt packages (chromium, fonts-noto-color-emoji, dataset-fashion-mnist, g++, ninja-build); tests that need them will skip or fail"; fi

run: install
	$(VENV)/bin/hf-scratch generate "$(PROMPT)" --output $(OUT) --upscale 8

# Style kept by the tools (pyproject.toml's [tool.ruff]); CI runs it before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install system-deps
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) outputs
