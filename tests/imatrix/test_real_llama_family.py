"""imatrix statistics of the real llama / qwen2 models from PyPI (SmolLM2-135M Q4_1, Qwen2.5-Coder-0.5B Q4_K_M)
equal llama.cpp's own collection (cb_eval), bit for bit: the same inputs reach every matmul on this host."""

import pytest

from ggquant.imatrix.collect import collect_imatrix
from tests.imatrix.test_collect import assert_same_statistics
from tests.oracles import llama_imatrix, real_text
from tests.oracles.llama_imatrix import chunks_like_llama_imatrix
from tests.oracles.real_models import qwen25_coder_gguf, smollm2_gguf

MODELS = {"smollm2": (smollm2_gguf, 30), "qwen25_coder": (qwen25_coder_gguf, 24)}


@pytest.mark.parametrize("name", MODELS)
def test_real_statistics_equal_llama_cpp(name, tmp_path):
    path, n_layer = MODELS[name][0](), MODELS[name][1]
    text = real_text.calibration_text()[:40000]
    ctx, n = 128, 2
    im, stats = collect_imatrix(path, real_text.write(tmp_path / "cal.txt", text), ctx=ctx, chunks=n, progress=False)
    ref = llama_imatrix.collect(path, chunks_like_llama_imatrix(path, text, ctx, n), ctx)
    assert len(ref) == n_layer * 7 and stats["chunks"] == n
    assert_same_statistics(im, ref)
