"""ggquant.arch.bpe_pre is llama.cpp's get_vocab_base_pre as data: the same check text and the same
digest -> pre-tokenizer table (the later of two equal digests winning, as the converter's chain of
`if`s does), read from the converter source of the reference llama.cpp tree."""

from __future__ import annotations

import re

from ggquant.arch.bpe_pre import CHECK_TEXT, PRE_BY_HASH


def test_table_and_check_text_equal_the_reference_converter():
    from tests.oracles.llama_converter import llama_cpp_source

    src = (llama_cpp_source() / "conversion" / "base.py").read_text(encoding="utf-8")
    body = src[src.index("# Marker: Start get_vocab_base_pre"):src.index("# Marker: End get_vocab_base_pre")]
    pairs = re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', body)
    assert len(pairs) == body.count("if chkhsh ==")
    want: dict[str, str] = {}
    for h, res in pairs:
        want[h] = res
    assert PRE_BY_HASH == want
    chk = re.search(r"chktxt = (.*)\n", body).group(1)
    assert CHECK_TEXT == eval(chk)  # a Python string literal in the converter source
