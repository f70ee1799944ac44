"""Real weights: Gemma 3 270M Q4_K_M, ggquant vs llama.cpp on 512 tokens of real text
(Python's own LICENSE.txt, read at test time). Target (issue 4): mean KL <= 1e-3, top-1 >= 99%."""

from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import pytest
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.parity.run import run_parity
from tests.oracles.real_models import gemma3_270m_gguf

llama_cpp = pytest.importorskip("llama_cpp")


def _text() -> str:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8") as f:
        return f.read()


def test_gemma3_270m_q4_k_m_matches_llama_cpp_on_512_tokens():
    res = run_parity(gemma3_270m_gguf(), "llama.cpp", _text(), ctx=512, chunks=1, threads=2)
    s = res.stats.summary()
    assert s["positions"] == 512
    assert s["kl_mean"] <= 1e-3
    assert s["top1_agreement"] >= 0.99
    assert np.isfinite(s["ppl_model"]) and abs(s["ppl_model"] / s["ppl_reference"] - 1) < 0.01


def test_run_greedy_text_and_logits_out_match_llama_cpp(tmp_path):
    path = gemma3_270m_gguf()
    prompt = "The history of the software began"
    out = tmp_path / "logits.npy"
    r = CliRunner().invoke(main, ["run", str(path), "--prompt", prompt, "-n", "12", "--temp", "0",
                                  "--threads", "2", "--logits-out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output[r.output.index("{"):])
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, type_k=0, type_v=0,
                          flash_attn=False, n_threads=2, verbose=False, seed=0)
    ids = llm.tokenize(prompt.encode(), add_bos=True)
    assert got["prompt_tokens"] == len(ids)
    llm.eval(ids)
    ref = np.array(llm.scores[:len(ids)], dtype=np.float32)
    logits = np.load(out)
    assert logits.shape == (len(ids), llm.n_vocab()) and logits.dtype == np.float32
    assert np.abs(logits - ref).max() <= 1e-3
    text = llm.create_completion(prompt, max_tokens=12, temperature=0.0, top_k=1)["choices"][0]["text"]
    assert got["text"] == text
