#!/bin/bash
# Issue 17 on the GPU machine, in two calls of the device tool (each under its 10-minute limit; the
# second must follow while the machine is still warm, so the llama.cpp build and the GGUFs in /tmp
# are still there). The device tool sends the checkout; $CARRY names a carried (ignored) folder
# holding (default: the checkout's parent):
#   <carry>/llama.cpp llama.cpp's tree from the llama-cpp-python 0.3.36 sdist, trimmed as in
#                     research note anchor-cuda-h100.md (tools/: llama-bench and imatrix only)
#   <carry>/whl       gguf-0.19.0 wheel;  <carry>/tiny  tiny reference GGUFs (tests' cache)
#   CARRY=build/ggqc bash bench/device_issue17.sh 1    # llama.cpp build (background), tests, matmul bench, GGUFs
#   CARRY=build/ggqc bash bench/device_issue17.sh 2    # model bench vs llama-bench / llama-imatrix
#   CARRY=build/ggqc bash bench/device_issue17.sh all  # both in one call (tight for the 10-minute limit)
set -u
source "$(dirname "$0")/device_env.sh"

if [ "$1" = 1 ] || [ "$1" = all ]; then
  build_llama llama-bench llama-imatrix
  # the E4B-size GGUFs (bench/runtime_cuda.py's builder, atomic writes), alongside
  NUMBA_NUM_THREADS=8 setsid nohup bash -c "python3 bench/runtime_cuda.py --build-only --weights q4_k,q8_0,bf16 \
    --workdir $W; echo GGUF_RC=\$?" > /tmp/gguf.log 2>&1 < /dev/null &
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/phase1.txt"
  python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)" | tee -a "$OUT/phase1.txt"
  # the CUDA tests of every issue (they skip in CI) that need no fixture build (the image's
  # transformers is older than the lock's); cuda_check below runs the model-level ones on the
  # carried tiny GGUFs (llama.cpp's conversions of the fixtures)
  [ -n "${SKIP_TESTS:-}" ] || timeout ${TEST_TIMEOUT:-360} python3 -m pytest -q -p no:cacheprovider --timeout 300 \
    -k "not agrees_with_cpu and not runs_quantized and not graph_decode and not half_prefill" \
    tests/runtime/test_cuda_prefill.py tests/runtime/test_cuda_kernels.py tests/runtime/test_cuda.py 2>&1 \
    | tail -25 | tee -a "$OUT/phase1.txt"
  python3 bench/runtime_cuda.py --tiny --build-only --weights bf16,q8_0,q4_k --workdir /tmp/tiny > /dev/null 2>&1
  [ -n "${SKIP_PREFILL_CHECK:-}" ] || PREFILL_CHECK_CPU=${PREFILL_CHECK_CPU:-0} python3 bench/prefill_check.py "$CARRY"/tiny/*.gguf /tmp/tiny/*.gguf 2>&1 | tee -a "$OUT/phase1.txt"
  timeout 240 python3 bench/cuda_check.py "$CARRY"/tiny/*.gguf 2>&1 | tee -a "$OUT/phase1.txt"
  [ -n "${SKIP_MATMUL:-}" ] || python3 bench/prefill_matmul.py --tokens 512 --json "$OUT/prefill_matmul.json" 2>&1 | tee -a "$OUT/phase1.txt"
  [ -z "${TUNE:-}" ] || timeout 240 python3 bench/matvec_tune.py $TUNE 2>&1 | tee -a "$OUT/phase1.txt"
  tail -5 /tmp/gguf.log | tee -a "$OUT/phase1.txt"
  tail -3 /tmp/llbuild.log | tee -a "$OUT/phase1.txt"
fi

if [ "$1" = 2 ] || [ "$1" = all ]; then
  # per weight type, as soon as its GGUF is there; llama.cpp's tools join once their build is done
  late=""
  for w in ${WEIGHTS:-q4_k q8_0 bf16}; do
    f=$W/gemma4-e4b-$w-v1.gguf
    for i in $(seq 1 90); do [ -f $f ] && break; sleep 2; done
    LB=""; LI=""
    [ -x /tmp/llbuild/bin/llama-bench ] && LB="--llama-bench /tmp/llbuild/bin/llama-bench" || late="$late $f"
    [ -x /tmp/llbuild/bin/llama-imatrix ] && LI="--llama-imatrix /tmp/llbuild/bin/llama-imatrix"
    python3 bench/runtime_cuda.py --weights $w --workdir $W --prompt 512 --decode 128 --repeat ${REPEAT:-2} --profile ${PROFILE:-never} \
      --imatrix --prefill ${PREFILL:-cublas,triton,cublas+cache} $LB $LI --json "$OUT/runtime_cuda_$w.json" 2>&1 \
      | tee -a "$OUT/bench.txt"
  done
  tail -2 /tmp/gguf.log /tmp/llbuild.log | tee -a "$OUT/bench.txt"
  if [ -n "$late" ]; then
    for i in $(seq 1 60); do grep -q BUILD_RC /tmp/llbuild.log 2>/dev/null && break; sleep 5; done
    for f in $late; do
      /tmp/llbuild/bin/llama-bench -m $f -ngl 99 -fa 1 -p 512 -n 128 -r 3 -o json 2>/dev/null | tee -a "$OUT/llama_bench_late.json"
    done
  fi
fi
