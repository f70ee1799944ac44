"""imatrix collection speed: ggquant's runtime vs llama.cpp's own collection (cb_eval), same run.

    .venv/bin/python bench/imatrix.py [--model F32.gguf] [--ctx 256] [--chunks 4] [--threads 2]
    .venv/bin/python bench/imatrix.py --devices cuda:0 cuda:0,cuda:1 ...   # data-parallel scaling

--devices: instead, time `imatrix --devices` for each device list (the first is the baseline),
print tokens/s, the speed-up per device against linear (issue 18: >= 0.9x), and check that every
list wrote the same statistics as the first (bit for bit).

Default model: the F32 dequantization of the real Gemma 3 270M (made once under .cache/bench).
Both engines see the same chunks (BOS first, one sequence per decode) and the same threads;
llama.cpp's side is the cb_eval port in tests/imatrix/llama_imatrix.py. Target: >= 1.0x.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ggquant.imatrix.collect import collect_imatrix  # noqa: E402
from ggquant.convert.gguf_to_gguf import quantize_gguf  # noqa: E402
from tests.oracles import real_text  # noqa: E402
from tests.oracles import llama_imatrix  # noqa: E402
from tests.oracles.llama_imatrix import chunks_like_llama_imatrix  # noqa: E402
from tests.oracles.real_models import gemma3_270m_gguf  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--devices", nargs="+", metavar="D1,D2,...", help="device lists to compare (data parallel)")
    a = ap.parse_args()
    work = ROOT / ".cache" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else work / "gemma3-270m-F32.gguf"
    if not model.exists():
        quantize_gguf(gemma3_270m_gguf(), model, "F32", allow_requantize=True, progress=False)
    text = real_text.write(work / "calibration.txt", real_text.calibration_text())
    n_tok = a.ctx * a.chunks
    if a.devices:
        return scaling(model, text, a)
    collect_imatrix(model, text, ctx=a.ctx, chunks=1, threads=a.threads, progress=False)  # warm-up (compile)
    t = time.perf_counter()
    collect_imatrix(model, text, ctx=a.ctx, chunks=a.chunks, threads=a.threads, progress=False)
    ours = n_tok / (time.perf_counter() - t)
    chunks = chunks_like_llama_imatrix(model, real_text.calibration_text(), a.ctx, a.chunks)
    t = time.perf_counter()
    llama_imatrix.collect(model, chunks, a.ctx, threads=a.threads)
    ref = n_tok / (time.perf_counter() - t)
    print(f"{model.name}: {a.chunks} chunks x {a.ctx} tokens, {a.threads} threads")
    print(f"ggquant imatrix   {ours:8.1f} tokens/s")
    print(f"llama.cpp cb_eval {ref:8.1f} tokens/s")
    print(f"ratio             {ours / ref:8.2f}x")


def scaling(model, text, a):
    import numpy as np

    base = None
    for spec in a.devices:
        devices = spec.split(",")
        im, stats = collect_imatrix(model, text, ctx=a.ctx, chunks=a.chunks, threads=a.threads, progress=False,
                                    devices=devices)
        same = "" if base is None else "same statistics" if all(
            np.array_equal(e.sums, base[0].entries[n].sums) for n, e in im.entries.items()) else "DIFFERENT statistics"
        if base is None:
            base = (im, stats["tokens_per_s"], len(devices))
        per_device = stats["tokens_per_s"] / base[1] * base[2] / len(devices)
        print(f"--devices {spec:24} {stats['tokens_per_s']:9.1f} tokens/s  {per_device:5.2f}x linear  {same}")


if __name__ == "__main__":
    main()
