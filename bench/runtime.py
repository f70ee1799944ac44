"""Runtime speed: ggquant's CPU backend vs llama.cpp (llama-cpp-python) on Gemma 3 270M Q4_K_M.

Same run, same thread count: prompt processing (tokens/s over a 256-token prompt, one batch) and
decoding (tokens/s over 64 tokens generated one at a time with the KV cache). Each measurement
is the best of --repeat runs, alternating the engines, so a busy machine penalises both alike.
Printed as a table and ratios (ggquant / llama.cpp); --json for scripts.

    .venv/bin/python bench/runtime.py [--threads 2] [--prompt 256] [--decode 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _prompt_ids(tok, n: int) -> list[int]:
    text = Path(sysconfig.get_paths()["stdlib"], "LICENSE.txt").read_text()
    ids = tok.encode(text, add_special=True)
    while len(ids) < n:
        ids += ids[1:]
    return ids[:n]


def bench_ggquant(path, ids, n_decode, threads):
    from ggquant.runtime.model import Session, load_model

    m = load_model(path, threads=threads)
    s = Session(m, n_ctx=len(ids) + n_decode + 8, n_batch=512)
    t0 = time.perf_counter()
    last = s.eval(ids, "last")[-1]
    tp = time.perf_counter() - t0
    tok = int(np.argmax(last))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(s.eval([tok], "last")[-1]))
    td = time.perf_counter() - t0
    return len(ids) / tp, n_decode / td


def bench_llama(path, ids, n_decode, threads):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(ids) + n_decode + 8, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False, seed=0)
    t0 = time.perf_counter()
    llm.eval(ids)
    tp = time.perf_counter() - t0
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    td = time.perf_counter() - t0
    llm.close()
    return len(ids) / tp, n_decode / td


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: the Gemma 3 270M Q4_K_M test model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import numba

    numba.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if a.model is None:
        from tests.oracles.real_models import gemma3_270m_gguf

        a.model = gemma3_270m_gguf()
    from ggquant.formats.gguf import GGUFReader
    from ggquant.runtime.tokenizer import Tokenizer

    ids = _prompt_ids(Tokenizer.from_gguf(GGUFReader(a.model)), a.prompt)
    bench_ggquant(a.model, ids[:16], 2, a.threads)  # warm-up: numba cache load / compile
    res = {"ggquant": [], "llama.cpp": []}
    for _ in range(a.repeat):
        res["llama.cpp"].append(bench_llama(a.model, ids, a.decode, a.threads))
        res["ggquant"].append(bench_ggquant(a.model, ids, a.decode, a.threads))
    best = {k: (max(r[0] for r in v), max(r[1] for r in v)) for k, v in res.items()}
    out = {
        "model": str(a.model), "threads": a.threads, "prompt_tokens": a.prompt, "decode_tokens": a.decode,
        "ggquant_prompt_tps": best["ggquant"][0], "ggquant_decode_tps": best["ggquant"][1],
        "llama_prompt_tps": best["llama.cpp"][0], "llama_decode_tps": best["llama.cpp"][1],
        "prompt_ratio": best["ggquant"][0] / best["llama.cpp"][0],
        "decode_ratio": best["ggquant"][1] / best["llama.cpp"][1],
    }
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{Path(a.model).name}, {a.threads} threads, best of {a.repeat}")
    print(f"{'':10s} {'prompt tok/s':>14s} {'decode tok/s':>14s}")
    print(f"{'llama.cpp':10s} {out['llama_prompt_tps']:14.1f} {out['llama_decode_tps']:14.1f}")
    print(f"{'ggquant':10s} {out['ggquant_prompt_tps']:14.1f} {out['ggquant_decode_tps']:14.1f}")
    print(f"{'ratio':10s} {out['prompt_ratio']:14.2f} {out['decode_ratio']:14.2f}")


if __name__ == "__main__":
    main()
