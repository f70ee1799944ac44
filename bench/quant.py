"""Quantize / dequantize throughput: ggquant (numba) vs ggml C (ctypes) vs gguf-py (numpy), same run.

    .venv/bin/python bench/quant.py [--rows 2048] [--cols 2048] [--threads 2] [--types Q4_K,Q6_K,...]
                                    [--ops quantize,dequantize] [--dq-seconds 2]

MB/s are of float32 input (quantize) or float32 output (dequantize). ggml C is driven with the
same thread count by splitting rows across Python threads (ctypes releases the GIL). Targets
(issue 2): quantize Q4_K / Q6_K / IQ4_XS with imatrix >= 1.0x ggml C; dequantize >= 10x gguf-py.

Timing method. Every figure is the best (shortest) of several wall-clock runs, each call
allocating its output as real callers do. A dequantize takes milliseconds, so one descheduled
time slice (4 ms) on a loaded machine can halve its figure, and a 2-thread call needs both
cores free at once. Dequantize is therefore timed in interleaved rounds (ggquant, ggml C,
gguf-py, three back-to-back calls each per round, so all three see the same load) until
--dq-seconds have passed, with at least --repeat rounds; gguf-py gets as many calls as the
others (it used to get a single one). Output pages that are new to the process cost about
as much as a memory-bound dequantize itself (the kernel zeroes them on first touch), so the
back-to-back calls measure each contender's steady state, where an allocation reuses the
memory its previous result freed. The load average is printed before and after: compare
runs only at similar load.
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggquant.quant import types as qtypes  # noqa: E402
from tests.oracles import ggml as ggml_oracle  # noqa: E402

# every type ggquant quantizes, but F32 (a copy)
DEFAULT_TYPES = ",".join(t.name for t, e in qtypes.REGISTRY.items() if e.quantize_fn is not None and t != T.F32)


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_of_rounds(fns, min_rounds, seconds, burst=3):
    """Rounds of `burst` back-to-back calls of each callable (None: skipped), interleaved so
    that all see the same machine load; the best wall time of each. Back-to-back calls let
    each contender's allocations reuse the memory its previous call freed (its steady state,
    as in a loop over tensors), instead of paying the page faults that the other contenders'
    large allocations and frees would otherwise cause."""
    best = [float("inf") if f is not None else None for f in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - start < seconds:
        for i, f in enumerate(fns):
            for _ in range(burst if f is not None else 0):
                t = time.perf_counter()
                f()
                best[i] = min(best[i], time.perf_counter() - t)
        rounds += 1
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
    ap.add_argument("--ops", default="quantize,dequantize")
    ap.add_argument("--dq-seconds", type=float, default=2.0, help="time budget per type for dequantize rounds")
    a = ap.parse_args()
    ops = set(a.ops.split(","))
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.rows, a.cols)).astype(np.float32)
    im = rng.gamma(1.0, 1.0, a.cols).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"{a.rows}x{a.cols} float32 ({mb:.1f} MB), {a.threads} threads, quantize best of {a.repeat}, "
          f"dequantize best of >= {a.repeat} interleaved rounds / {a.dq_seconds:g} s; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    # The IQ quantizers' search tables (iq2xs_init_impl / iq3xs_init_impl), built once per process
    from ggquant.kernels.quants import iqtables

    t0 = time.perf_counter()
    built = {q.name: iqtables.tables(q).seconds for q in iqtables.KINDS if q != T.IQ1_M}  # IQ1_M shares IQ1_S's
    print(f"IQ search tables built in {time.perf_counter() - t0:.2f} s ("
          + ", ".join(f"{k} {v:.2f} s" for k, v in built.items()) + f"; {numba.get_num_threads()} threads)")
    # ggml's own build of the same tables (ggml_quantize_init, single-threaded; first call in this process)
    lib = ggml_oracle.libggml_base()
    ref_built = {}
    for name in built:
        t1 = time.perf_counter()
        lib.ggml_quantize_init(int(T[name]))
        ref_built[name] = time.perf_counter() - t1
    print(f"ggml C ggml_quantize_init of the same tables: {sum(ref_built.values()):.2f} s ("
          + ", ".join(f"{k} {v:.2f} s" for k, v in ref_built.items()) + ")")
    print(f"{'type':<8} {'op':<16} {'ggquant MB/s':>13} {'ggml C MB/s':>12} {'ratio':>7} {'gguf-py MB/s':>13} {'ratio':>8}")
    for name in a.types.split(","):
        qt = T[name]
        t = qtypes.get(qt)
        # types ggml_quantize_requires_imatrix (IQ2_XXS, IQ2_XS, IQ1_S) only with one: ggml asserts
        variants = ([] if t.requires_imatrix else [("quantize", None)]) + \
            ([("quantize+imatrix", im)] if t.uses_imatrix else [])
        for label, w in variants if "quantize" in ops else ():
            t.quantize(x[:8], w)  # compile
            ours = mb / best_of(lambda: t.quantize(x, w), a.repeat)
            ref = mb / best_of(lambda: ggml_threaded(lambda r: ggml_oracle.quantize(qt, r, w), x, a.threads), a.repeat)
            py = None
            if w is None and gguf_py(lambda gq, v, q: gq.quantize(v, q), qt, x[:8]) is not None:
                py = mb / best_of(lambda: gguf_py(lambda gq, v, q: gq.quantize(v, q), qt, x), 1)
            pys = f"{py:13.1f} {ours / py:7.1f}x" if py else f"{'n/a':>13} {'':>8}"
            print(f"{name:<8} {label:<16} {ours:13.1f} {ref:12.1f} {ours / ref:6.2f}x {pys}")
        if "dequantize" not in ops:
            continue
        q = t.quantize(x, im if t.requires_imatrix else None)
        t.dequantize(q[:8], (8, a.cols))  # compile
        has_py = gguf_py(lambda gq, v, qq: gq.dequantize(v, qq), qt, q[:8]) is not None
        times = best_of_rounds(
            [lambda: t.dequantize(q, x.shape),
             lambda: ggml_threaded(lambda r: ggml_oracle.dequantize(qt, r, a.cols), q, a.threads),
             (lambda: gguf_py(lambda gq, v, qq: gq.dequantize(v, qq), qt, q)) if has_py else None],
            a.repeat, a.dq_seconds)
        ours, ref = mb / times[0], mb / times[1]
        py = mb / times[2] if has_py else None
        pys = f"{py:13.1f} {ours / py:7.1f}x" if py else f"{'n/a':>13} {'':>8}"
        print(f"{name:<8} {'dequantize':<16} {ours:13.1f} {ref:12.1f} {ours / ref:6.2f}x {pys}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
