"""Quantize / dequantize throughput: ggquant (numba) vs ggml C (ctypes) vs gguf-py (numpy), same run.

    .venv/bin/python bench/quant.py [--rows 2048] [--cols 2048] [--threads 2] [--types Q4_K,Q6_K,...]

MB/s are of float32 input (quantize) or float32 output (dequantize). ggml C is driven with the
same thread count by splitting rows across Python threads (ctypes releases the GIL). Targets
(issue 2): quantize Q4_K / Q6_K / IQ4_XS with imatrix >= 1.0x ggml C; dequantize >= 10x gguf-py.
"""

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggquant.quant import types as qtypes  # noqa: E402
from tests import ggml_oracle  # noqa: E402

DEFAULT_TYPES = "Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS,F16,BF16"


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def ggml_threaded(fn, x, threads):
    parts = np.array_split(np.arange(x.shape[0]), threads)
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda idx: fn(x[idx[0] : idx[-1] + 1]), parts))


def gguf_py(op, qtype, arg):
    import gguf.quants as gq

    try:
        return op(gq, arg, qtype)
    except NotImplementedError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.rows, a.cols)).astype(np.float32)
    im = rng.gamma(1.0, 1.0, a.cols).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"{a.rows}x{a.cols} float32 ({mb:.1f} MB), {a.threads} threads, best of {a.repeat}")
    print(f"{'type':<8} {'op':<16} {'ggquant MB/s':>13} {'ggml C MB/s':>12} {'ratio':>7} {'gguf-py MB/s':>13} {'ratio':>8}")
    for name in a.types.split(","):
        qt = T[name]
        t = qtypes.get(qt)
        variants = [("quantize", None)] + ([("quantize+imatrix", im)] if t.uses_imatrix else [])
        for label, w in variants:
            t.quantize(x[:8], w)  # compile
            ours = mb / best_of(lambda: t.quantize(x, w), a.repeat)
            ref = mb / best_of(lambda: ggml_threaded(lambda r: ggml_oracle.quantize(qt, r, w), x, a.threads), a.repeat)
            py = None
            if w is None and gguf_py(lambda gq, v, q: gq.quantize(v, q), qt, x[:8]) is not None:
                py = mb / best_of(lambda: gguf_py(lambda gq, v, q: gq.quantize(v, q), qt, x), 1)
            pys = f"{py:13.1f} {ours / py:7.1f}x" if py else f"{'n/a':>13} {'':>8}"
            print(f"{name:<8} {label:<16} {ours:13.1f} {ref:12.1f} {ours / ref:6.2f}x {pys}")
        q = t.quantize(x)
        t.dequantize(q[:8], (8, a.cols))
        ours = mb / best_of(lambda: t.dequantize(q, x.shape), a.repeat)
        ref = mb / best_of(lambda: ggml_threaded(lambda r: ggml_oracle.dequantize(qt, r, a.cols), q, a.threads), a.repeat)
        py = None
        if gguf_py(lambda gq, v, qq: gq.dequantize(v, qq), qt, q[:8]) is not None:
            py = mb / best_of(lambda: gguf_py(lambda gq, v, qq: gq.dequantize(v, qq), qt, q), 1)
        pys = f"{py:13.1f} {ours / py:7.1f}x" if py else f"{'n/a':>13} {'':>8}"
        print(f"{name:<8} {'dequantize':<16} {ours:13.1f} {ref:12.1f} {ours / ref:6.2f}x {pys}")


if __name__ == "__main__":
    main()
