# Sourced by bench/device_issue17.sh and bench/device_large.sh on the GPU machine: the carried
# folder ($CARRY: llama.cpp/, whl/ with the gguf wheel), $OUT, the environment, the package links,
# and build_llama TARGETS... (llama.cpp with CUDA from the carried sdist tree, in the background:
# the build lines of research note anchor-cuda-h100.md; setsid: it outlives the call while the
# machine is warm).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARRY=$(cd "${CARRY:-$ROOT/..}" && pwd)  # the carried folder (default: the worktree's parent)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
W=/tmp/ggq_bench
export NUMBA_CACHE_DIR=/tmp/numba PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$CARRY"/whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$ROOT GGQUANT_LLAMA_CPP_DIR=$CARRY/llama.cpp GGQUANT_CACHE=/tmp/ggq_cache
ln -sfn ../kernels/ggquant_kernels "$ROOT/ggquant/kernels"
ln -sfn ../fixtures/ggquant_fixtures "$ROOT/ggquant/fixtures"
cd "$ROOT"

build_llama() {
  [ -x /tmp/llbuild/bin/llama-bench ] && return
  rm -rf /tmp/llsrc && cp -r "$CARRY/llama.cpp" /tmp/llsrc
  setsid nohup bash -c "cmake -S /tmp/llsrc -B /tmp/llbuild -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
    && cmake --build /tmp/llbuild --target $* -j12; echo BUILD_RC=\$?" > /tmp/llbuild.log 2>&1 < /dev/null &
}
