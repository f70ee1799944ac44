#!/bin/bash
# Issue 17 / 12 on the GPU machine, one call of the device tool: the Q4_K E4B decode after the
# tile change, Gemma 4 31B (dense) and 26B-A4B (MoE) shaped random Q4_K models through
# bench/runtime_cuda.py (peak GPU memory, pp512, decode), the GPU kernel tests that need no
# fixture build, and llama-bench on the same GGUFs once its build (started first) is done.
#   CARRY=build/ggqc bash bench/device_large.sh       (carry: build/ggqc, as device_issue17.sh)
set -u
CONFIGS=${CONFIGS:-e4b 31b a4b}
source "$(dirname "$0")/device_env.sh"
[ -n "${NO_LLAMA:-}" ] || build_llama llama-bench
T0=$(date +%s)
NUMBA_NUM_THREADS=4 setsid nohup bash -c "for c in $CONFIGS; do python3 bench/runtime_cuda.py --build-only --config \$c \
  --weights q4_k --workdir $W; done; echo GGUF_RC=\$?" > /tmp/gguf.log 2>&1 < /dev/null &
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/large.txt"
[ -f build/nvdev/run.py ] && PYTHONPATH=build/nvdev:$PYTHONPATH timeout 60 python3 build/nvdev/run.py 2>&1 | tail -3 | tee -a "$OUT/large.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x -k "matvec or keeps_packed or dequant_half or matmul_q or matmul_id or attention or rms" \
  tests/runtime/test_cuda_kernels.py tests/runtime/test_cuda_prefill.py 2>&1 | tail -4 | tee -a "$OUT/large.txt"
timeout 100 python3 bench/attention_cuda.py --reps 5 2>&1 | tail -20 | tee -a "$OUT/large.txt"  # prefill attention: torch vs Triton
# the carried tiny reference GGUFs (CUDA vs CPU backend, graphs vs eager: bench/cuda_check.py)
[ -z "$(ls "$CARRY"/tiny/*.gguf 2>/dev/null)" ] || timeout 200 python3 bench/cuda_check.py "$CARRY"/tiny/*.gguf 2>&1 \
  | tail -25 | tee -a "$OUT/large.txt"
for c in $CONFIGS; do
  f=$W/gemma4-$c-q4_k-v1.gguf
  for i in $(seq 1 120); do [ -f $f ] && break; sleep 2; done
  D=128
  timeout 150 python3 bench/runtime_cuda.py --config $c --weights q4_k --workdir $W --prompt 512 --decode $D --repeat 2 \
    --profile never --prefill cublas --json "$OUT/large_$c.json" 2>&1 | grep -v "^\s*$" | grep -v "prefill cublas \(graph\|eager\):" \
    | tee -a "$OUT/large.txt"
done
tail -2 /tmp/gguf.log | tee -a "$OUT/large.txt"
while [ -z "${NO_LLAMA:-}" ] && [ $(( $(date +%s) - T0 )) -lt ${BUILD_WAIT:-400} ] && ! grep -q BUILD_RC /tmp/llbuild.log; do sleep 5; done
tail -1 /tmp/llbuild.log 2>/dev/null | tee -a "$OUT/large.txt"
if [ -x /tmp/llbuild/bin/llama-bench ]; then
  for c in $CONFIGS; do
    timeout 90 /tmp/llbuild/bin/llama-bench -m $W/gemma4-$c-q4_k-v1.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 2 -o md 2>/dev/null \
      | tee -a "$OUT/large.txt"
  done
fi
echo "elapsed $(( $(date +%s) - T0 )) s" | tee -a "$OUT/large.txt"
