#!/bin/bash
# Issue 17 / 12 on the GPU machine, one call of the device tool: the Q4_K E4B decode after the
# tile change, Gemma 4 31B (dense) and 26B-A4B (MoE) shaped random Q4_K models through
# bench/runtime_cuda.py (peak GPU memory, pp512, decode), the GPU kernel tests that need no
# fixture build, and llama-bench on the same GGUFs once its build (started first) is done.
#   CARRY=build/ggqc bash bench/device_large.sh       (carry: build/ggqc, as device_issue17.sh)
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARRY=$(cd "${CARRY:-$ROOT/..}" && pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
W=/tmp/ggq_bench
T0=$(date +%s)
export NUMBA_CACHE_DIR=/tmp/numba PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$CARRY"/whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$ROOT GGQUANT_LLAMA_CPP_DIR=$CARRY/llama.cpp GGQUANT_CACHE=/tmp/ggq_cache
ln -sfn ../kernels/ggquant_kernels "$ROOT/ggquant/kernels"
ln -sfn ../fixtures/ggquant_fixtures "$ROOT/ggquant/fixtures"
cd "$ROOT"
if [ ! -x /tmp/llbuild/bin/llama-bench ]; then
  rm -rf /tmp/llsrc && cp -r "$CARRY/llama.cpp" /tmp/llsrc
  setsid nohup bash -c "cmake -S /tmp/llsrc -B /tmp/llbuild -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
    && cmake --build /tmp/llbuild --target llama-bench -j12; echo BUILD_RC=\$?" > /tmp/llbuild.log 2>&1 < /dev/null &
fi
NUMBA_NUM_THREADS=4 setsid nohup bash -c "for c in e4b 31b a4b; do python3 bench/runtime_cuda.py --build-only --config \$c \
  --weights q4_k --workdir $W; done; echo GGUF_RC=\$?" > /tmp/gguf.log 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/large.txt"
[ -f build/nvdev/run.py ] && PYTHONPATH=build/nvdev:$PYTHONPATH timeout 60 python3 build/nvdev/run.py 2>&1 | tail -3 | tee -a "$OUT/large.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x -k "matvec or keeps_packed or dequant_half or matmul_q or attention or rms" \
  tests/runtime/test_cuda_kernels.py tests/runtime/test_cuda_prefill.py 2>&1 | tail -4 | tee -a "$OUT/large.txt"
for c in e4b 31b a4b; do
  f=$W/gemma4-$c-q4_k-v1.gguf
  for i in $(seq 1 120); do [ -f $f ] && break; sleep 2; done
  D=128; [ $c = a4b ] && D=32
  timeout 150 python3 bench/runtime_cuda.py --config $c --weights q4_k --workdir $W --prompt 512 --decode $D --repeat 2 \
    --profile never --prefill cublas --json "$OUT/large_$c.json" 2>&1 | grep -v "^\s*$" | grep -v "prefill cublas \(graph\|eager\):" \
    | tee -a "$OUT/large.txt"
done
tail -2 /tmp/gguf.log | tee -a "$OUT/large.txt"
while [ $(( $(date +%s) - T0 )) -lt ${BUILD_WAIT:-400} ] && ! grep -q BUILD_RC /tmp/llbuild.log; do sleep 5; done
tail -1 /tmp/llbuild.log | tee -a "$OUT/large.txt"
if [ -x /tmp/llbuild/bin/llama-bench ]; then
  for c in e4b 31b a4b; do
    timeout 60 /tmp/llbuild/bin/llama-bench -m $W/gemma4-$c-q4_k-v1.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 2 -o md 2>/dev/null \
      | tee -a "$OUT/large.txt"
  done
fi
echo "elapsed $(( $(date +%s) - T0 )) s" | tee -a "$OUT/large.txt"
