"""The runtime's GPT-2 byte-level BPE tokenizer (runtime/bpe.py) against llama.cpp: the vocabulary GGUFs of
real models that llama.cpp ships (Llama 3, Qwen2, StarCoder, Refact, GPT-2; and Llama 2's SentencePiece, whose
GGUF leaves add_space_prefix to llama.cpp's default), their test-tokenizer-0 cases
(the ids the models' own tokenizers give), and llama-cpp-python's llama_tokenize on varied text (unicode
scripts, emoji sequences, digits, code, whitespace runs, contractions, special tokens)."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest

from ggquant.fixtures.llama_vocab import vocab_gguf, vocab_tests
from ggquant.formats.gguf import GGUFReader
from ggquant.runtime.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

VOCABS = ["llama-bpe", "qwen2", "starcoder", "refact", "gpt-2", "llama-spm"]  # + Llama 2 SentencePiece (Mistral)

VARIED = [
    "Hello world", " Hello World!", "3333333 3.14 ½ Ⅻ ١٢٣ 𝟙𝟚 ⁵₇", "I've been 'told he's there, 'RE you sure? 'M not 'LL 'vE",
    "\n\n \n\t\t  x  \r\n y\r\r\n\n", "нещо на Български 我想在apple工作1314151天～ 🦙🦙 😶‍🌫️ 👩🏽‍💻",
    "def f(x):\n    return x**2  # comment\n\n\n\tif a!=b: pass", "ﬁ Å Å ｆｕｌｌ ٣ ﷺ ℌ ᾏ", "  leading and trailing   ",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>", "<|begin_of_text|><|start_header_id|>x", "a\u00a0b\u2003c\u3000d\u200be",
    "x" * 300 + " " + "9" * 40, "".join(chr(c) for c in range(0x20, 0x250)),
]


def _llama(path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _random_texts(n=40, seed=0):
    rng = np.random.default_rng(seed)
    pools = [range(0x20, 0x7F), range(0xA0, 0x250), range(0x370, 0x530), range(0x600, 0x700), range(0x900, 0x980),
             range(0x3040, 0x3100), range(0x4E00, 0x4F00), range(0xAC00, 0xAD00), range(0x1F300, 0x1F650),
             [9, 10, 13, 32, 32, 32, 0x85, 0xA0, 0x2028, 0x3000, 0x200D, 0xFE0F]]
    out = []
    for _ in range(n):
        cps = []
        for _ in range(int(rng.integers(1, 80))):
            pool = pools[int(rng.integers(len(pools)))]
            cps.append(pool[int(rng.integers(len(pool)))])
        out.append("".join(map(chr, cps)))
    return out


@pytest.fixture(scope="module", params=VOCABS)
def vocab(request):
    path = vocab_gguf(request.param)
    with GGUFReader(path) as r:
        tok = Tokenizer.from_gguf(r)
    llm = _llama(path)
    yield request.param, tok, llm
    llm.close()


def test_llama_cpp_test_cases(vocab):
    """test-tokenizer-0's cases: the ids of the model's own tokenizer, and llama.cpp's."""
    name, tok, llm = vocab
    for text, want in vocab_tests(name):
        got = tok.encode(text, add_special=False, parse_special=False)
        assert got == llm.tokenize(text.encode(), add_bos=False, special=False), repr(text)
        assert got == want, repr(text)


@pytest.mark.parametrize("special", [False, True])
def test_varied_text_equals_llama_cpp(vocab, special):
    name, tok, llm = vocab
    for text in VARIED + _random_texts():
        assert tok.encode(text, True, special) == llm.tokenize(text.encode(), add_bos=True, special=special), repr(text)


def test_real_text_equals_llama_cpp(vocab):
    from tests.oracles.real_text import heldout_text

    name, tok, llm = vocab
    text = heldout_text()[:60000]
    assert tok.encode(text, True, False) == llm.tokenize(text.encode(), add_bos=True, special=False)


def test_decode_round_trip(vocab):
    """Byte-level BPE is lossless: decoding the ids gives the text back (llama_token_to_piece)."""
    name, tok, llm = vocab
    if name == "llama-spm":
        pytest.skip("SentencePiece with add_space_prefix: the first piece carries the prefixed space")
    for text in VARIED[:9]:
        ids = tok.encode(text, add_special=False)
        assert tok.decode(ids) == text
        assert b"".join(llm.detokenize([i]) for i in ids).decode("utf-8", "replace") == text


def test_unicode_flags_equal_llama_cpp_source():
    """runtime/unicode_data.py is llama.cpp's src/unicode-data.cpp (ranges and whitespace set)."""
    from ggquant.fixtures.llama_vocab import _sdist
    from ggquant.runtime import unicode_data as U

    with tarfile.open(_sdist(), "r:gz") as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith("vendor/llama.cpp/src/unicode-data.cpp"))
        src = io.TextIOWrapper(tar.extractfile(m), encoding="utf-8").read()
    a = src.index("unicode_ranges_flags = {")
    pairs = re.findall(r"\{0x([0-9A-F]+), 0x([0-9A-F]+)\}", src[a:src.index("};", a)])
    assert U.RANGE_STARTS == tuple(int(x, 16) for x, _ in pairs)
    assert U.RANGE_FLAGS == tuple(int(y, 16) for _, y in pairs)
    a = src.index("unicode_set_whitespace = {")
    assert U.WHITESPACE == frozenset(int(x, 16) for x in re.findall(r"0x([0-9A-F]+)", src[a:src.index("};", a)]))
