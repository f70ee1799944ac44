"""Imatrix quality on the real Gemma 3 270M: KL(F32 || quantized) with and without an imatrix.

The reference is the F32 dequantization of the PyPI Q4_K_M model. An imatrix is collected by
ggquant from one half of Python's reference documentation (pydoc_data, shipped with the
interpreter); each preset is quantized from the F32 file with and without it, and KL and top-1
agreement are measured by llama.cpp on the other, held-apart half. Used by
bench/imatrix_quality.py (the figures in the README) and by a test.
"""

import time
from pathlib import Path

from ggquant.formats.gguf import GGUFReader
from ggquant.imatrix.collect import collect_imatrix
from ggquant.imatrix.files import save_gguf
from ggquant.parity.engines import LlamaCppEngine
from ggquant.parity.stats import ParityStats
from ggquant.convert.gguf_to_gguf import quantize_gguf
from ggquant.runtime.tokenizer import Tokenizer
from tests.oracles import real_text
from tests.oracles.real_models import gemma3_270m_gguf


def eval_chunks(model_path, ctx, n):
    with GGUFReader(model_path) as r:
        tok = Tokenizer.from_gguf(r)
    ids = tok.encode(real_text.heldout_text(), add_special=False)
    return [[tok.bos_id] + ids[i * ctx:(i + 1) * ctx - 1] for i in range(n)]


def kl_of(ref_path, model_path, chunks, ctx):
    ref, mod = LlamaCppEngine(ref_path, n_ctx=ctx), LlamaCppEngine(model_path, n_ctx=ctx)
    st = ParityStats()
    for c in chunks:
        st.update(mod.eval(c), ref.eval(c), c)
    ref.close()
    mod.close()
    return st.summary()


def measure(work: Path, presets, ctx=256, cal_chunks=8, eval_chunks_n=4, log=print):
    f32 = work / "gemma3-270m-F32.gguf"
    if not f32.exists():
        quantize_gguf(gemma3_270m_gguf(), f32, "F32", allow_requantize=True, progress=False)
    cal = real_text.write(work / "calibration.txt", real_text.calibration_text())
    t = time.perf_counter()
    im, stats = collect_imatrix(f32, cal, ctx=ctx, chunks=cal_chunks, progress=False)
    log(f"imatrix: {stats['entries']} entries, {stats['tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s "
        f"({time.perf_counter() - t:.0f} s)")
    im_path = save_gguf(im, work / "imatrix.gguf", force=True)
    chunks = eval_chunks(f32, ctx, eval_chunks_n)
    rows = []
    for p in presets:
        res = {}
        for label, imx in (("without", None), ("with", im_path)):
            out = work / f"{p}-{label}.gguf"
            quantize_gguf(f32, out, p, imatrix=imx, force=True, progress=False)
            res[label] = kl_of(f32, out, chunks, ctx)
            out.unlink()
        rows.append((p, res))
        log(f"{p:<7} without: KL {res['without']['kl_mean']:.5f} top-1 {res['without']['top1_agreement']:.2%}   "
            f"with imatrix: KL {res['with']['kl_mean']:.5f} top-1 {res['with']['top1_agreement']:.2%}")
    return rows
