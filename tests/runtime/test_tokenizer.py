"""The GGUF-built tokenizers give llama.cpp's token ids (Llama.tokenize) and its detokenized text."""

from __future__ import annotations

import os
import sysconfig

import pytest

from ggquant.formats.gguf import GGUFReader
from ggquant.runtime.tokenizer import Tokenizer
from tests.oracles.real_models import gemma3_270m_gguf

llama_cpp = pytest.importorskip("llama_cpp")

SAMPLES = [
    "Hello world!", " leading space", "trailing space ", "two  spaces and   three spaces",
    "tabs\tand\nnewlines\n\n\nend", "Ünïcödé café naïve — “quotes” …", "日本語のテキストと中文",
    "emoji 🤖🚀 mixed 👍🏽", "def f(x):\n    return x**2  # comment\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<bos><eos> literal specials",
    "<|turn>user hi <turn|>", "numbers 1234567890 3.14159 1e-9", "\n", "", " ", "a",
    "URL: https://example.com/path?q=1&r=2", "\x00\x01 control chars \x7f",
]


def _license_text() -> str:
    # real prose nobody here wrote, read at test time
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8") as f:
        return f.read()[:6000]


def _check(path):
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.from_gguf(GGUFReader(path))
    for s in SAMPLES + [_license_text()]:
        for special in (False, True):
            for add in (True, False):
                ref = llm.tokenize(s.encode(), add_bos=add, special=special)
                assert tok.encode(s, add_special=add, parse_special=special) == ref, (s[:40], special, add)
        ids = llm.tokenize(s.encode(), add_bos=False, special=False)
        assert tok.decode(ids).encode() == llm.detokenize(ids), s[:40]


def test_gemma3_real_vocab_token_ids_equal_llama_cpp():
    _check(gemma3_270m_gguf())


@pytest.mark.parametrize("name", ["gemma4_e4b", "gemma3_text"])
def test_tiny_vocab_token_ids_equal_llama_cpp(reference_gguf, name):
    _check(reference_gguf(name, "f32"))


def test_stream_decoder_holds_back_partial_utf8():
    tok = Tokenizer.from_gguf(GGUFReader(gemma3_270m_gguf()))
    ids = tok.encode("日本語 🤖", add_special=False)
    dec = tok.stream_decoder()
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    assert text == "日本語 🤖"
    assert "\ufffd" not in text


def test_unsupported_tokenizer_model_is_named():
    from ggquant.errors import GGQuantError

    with pytest.raises(GGQuantError, match="'bert'"):
        Tokenizer(["a"], [1], model="bert")
