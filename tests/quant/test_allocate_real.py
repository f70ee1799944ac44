"""--target-size on the real Gemma 3 270M beats llama.cpp's preset of the same size, measured by llama.cpp.

The reference is the F32 dequantization of the PyPI Q4_K_M model; the imatrix comes from one half
of Python's reference documentation and KL from the other (tests/oracles/real_text.py). The full
table (every preset, the measured mode) is bench/allocation.py's; this checks the claim at one
preset on every run: no larger than Q3_K_M, and lower mean KL than Q3_K_M and than the best single
GGML type that fits the same size (Q5_1 here: 6.0 bpw; Q6_K is 8.2).
"""

import pytest

from ggquant.convert.gguf_to_gguf import quantize_gguf
from ggquant.convert.mix import Mix
from ggquant.imatrix.collect import collect_imatrix
from ggquant.imatrix.files import save_gguf
from ggquant.parity.engines import LlamaCppEngine
from ggquant.parity.stats import ParityStats
from tests.oracles import real_text
from tests.oracles.imatrix_quality import eval_chunks
from tests.oracles.real_models import gemma3_270m_gguf

CTX = 128


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("real-alloc")
    f32 = d / "f32.gguf"
    quantize_gguf(gemma3_270m_gguf(), f32, "F32", allow_requantize=True, progress=False)
    cal = real_text.write(d / "cal.txt", real_text.calibration_text())
    im, _ = collect_imatrix(f32, cal, ctx=CTX, chunks=4, progress=False)
    chunks = eval_chunks(f32, CTX, 2)
    ref = LlamaCppEngine(f32, n_ctx=CTX)
    refs = [ref.eval(c) for c in chunks]
    ref.close()
    return {"dir": d, "f32": f32, "imatrix": save_gguf(im, d / "imatrix.gguf"), "chunks": chunks, "refs": refs}


def _kl(real, **kw):
    out = real["dir"] / "q.gguf"
    res = quantize_gguf(real["f32"], out, imatrix=real["imatrix"], force=True, progress=False, **kw)
    eng = LlamaCppEngine(out, n_ctx=CTX)
    st = ParityStats()
    for c, r in zip(real["chunks"], real["refs"]):
        st.update(eng.eval(c), r, c)
    eng.close()
    return res.bytes_out, st.summary()["kl_mean"]


def test_target_size_beats_the_preset_and_the_best_single_type(real):
    size, kl_preset = _kl(real, outtype="Q3_K_M")
    single_size, kl_single = _kl(real, outtype="Q8_0", tensor_types=[".*=q5_1"])
    assert single_size <= size
    ours_size, kl_ours = _kl(real, mix=Mix(target_size=size))
    assert ours_size <= size
    assert kl_ours < kl_preset and kl_ours < kl_single, (kl_ours, kl_preset, kl_single)
