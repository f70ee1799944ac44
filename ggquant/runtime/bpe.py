"""GPT-2 byte-level BPE as llama.cpp tokenizes it (``tokenizer.ggml.model = gpt2``): the pre-tokenizer
chosen by ``tokenizer.ggml.pre`` splits the text into words (src/llama-vocab.cpp llm_tokenizer_bpe
regex_exprs, run by src/unicode.cpp unicode_regex_split), each word's UTF-8 bytes are mapped to
GPT-2's printable byte characters, and the ranked merges are applied lowest rank first
(llm_tokenizer_bpe_session::tokenize).

The splitters are ports of llama.cpp's own hand-written matchers (unicode_regex_split_custom_gpt2,
_llama3, _qwen2) and of its std::regex fallback for ``\\p{N}`` (the first regex of the starcoder /
smollm group), over llama.cpp's Unicode flags (runtime/unicode_data.py), so words split where
llama.cpp splits them whatever Unicode version Python has.

Supported ``tokenizer.ggml.pre`` values (the families ggquant runs, with their llama.cpp groups):
llama3 (llama-bpe, llama3, llama-v3, falcon3, pixtral, ...; ignore_merges and add_bos), dbrx /
smaug-bpe, qwen2 (deepseek-r1-qwen, megrez, stablelm2, ...), starcoder / smollm (refact,
command-r, codeshell, exaone, minerva-7b) and gpt-2 (phi-2, mpt, olmo, jais, ...).
"""

from __future__ import annotations

import heapq
from bisect import bisect_right

from ggquant.runtime import unicode_data as U

from ggquant.arch.bpe_pre import DIGITS, GPT2, LLAMA3, PreTokenizer


# =============================================================================================
# Unicode flags (llama.cpp unicode_cpt_flags_from_cpt)
# =============================================================================================

_NUMBER, _LETTER, _WS = U.NUMBER, U.LETTER, U.WHITESPACE_FLAG


def _flags(cpt: int) -> int:
    if cpt >= U.MAX_CODEPOINTS:
        return U.UNDEFINED
    f = U.RANGE_FLAGS[bisect_right(U.RANGE_STARTS, cpt) - 1]
    return f | _WS if cpt in U.WHITESPACE else f


_ASCII_FLAGS = tuple(_flags(c) for c in range(128))
_CR, _LF, _SPACE, _QUOTE = 13, 10, 32, 39


def text_flags(cpts: list[int]) -> list[int]:
    a = _ASCII_FLAGS
    return [a[c] if c < 128 else _flags(c) for c in cpts]


def _lower(c: int) -> int:
    """unicode_tolower for the letters the contractions test (only ASCII maps to them)."""
    return c + 32 if 65 <= c <= 90 else c


# =============================================================================================
# Splitters: each takes the codepoints, their flags and the current word lengths, returns new lengths
# =============================================================================================


def _split_gpt2(cpts, flags, offsets):
    """unicode_regex_split_custom_gpt2: 's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    out = []
    start = 0
    for offset in offsets:
        ini, end = start, start + offset
        start = end

        def cpt(p):
            return cpts[p] if ini <= p < end else -1

        def fl(p):
            return flags[p] if ini <= p < end else 0

        prev = ini

        def add(e):
            nonlocal prev
            n = e - prev
            if n > 0:
                out.append(n)
            prev = e
            return n

        pos = ini
        while pos < end:
            c = cpts[pos]
            f = flags[pos]
            if c == _QUOTE and pos + 1 < end:
                n1 = cpt(pos + 1)
                if n1 in (115, 116, 109, 100):  # s t m d
                    pos += add(pos + 2)
                    continue
                if pos + 2 < end:
                    n2 = cpt(pos + 2)
                    if (n1, n2) in ((114, 101), (118, 101), (108, 108)):  # re ve ll
                        pos += add(pos + 3)
                        continue
            f2 = fl(pos + 1) if c == _SPACE else f
            if f2 & _LETTER:
                pos += c == _SPACE
                while f2 & _LETTER:
                    pos += 1
                    f2 = fl(pos)
                add(pos)
                continue
            if f2 & _NUMBER:
                pos += c == _SPACE
                while f2 & _NUMBER:
                    pos += 1
                    f2 = fl(pos)
                add(pos)
                continue
            if not (f2 & (_WS | _LETTER | _NUMBER)) and (f2 & 0xFFFF):
                pos += c == _SPACE
                while not (f2 & (_WS | _LETTER | _NUMBER)) and (f2 & 0xFFFF):
                    pos += 1
                    f2 = fl(pos)
                add(pos)
                continue
            nws = 0
            while fl(pos + nws) & _WS:
                nws += 1
            if nws > 1 and cpt(pos + nws) != -1:
                pos += nws - 1
                add(pos)
                continue
            if nws > 0:
                pos += nws
                add(pos)
                continue
            pos += 1
            add(pos)
    return out


def _split_llama3_qwen2(cpts, flags, offsets, max_digits):
    """unicode_regex_split_custom_llama3 (max_digits 3: \\p{N}{1,3}) and _qwen2 (max_digits 1: \\p{N}):
    (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"""
    out = []
    start = 0
    for offset in offsets:
        ini, end = start, start + offset
        start = end

        def cpt(p):
            return cpts[p] if ini <= p < end else -1

        def fl(p):
            return flags[p] if ini <= p < end else 0

        prev = ini

        def add(e):
            nonlocal prev
            n = e - prev
            if n > 0:
                out.append(n)
            prev = e
            return n

        pos = ini
        while pos < end:
            c = cpts[pos]
            f = flags[pos]
            if c == _QUOTE and pos + 1 < end:
                n1 = _lower(cpt(pos + 1))
                if n1 in (115, 116, 109, 100):
                    pos += add(pos + 2)
                    continue
                if pos + 2 < end:
                    n2 = _lower(cpt(pos + 2))
                    if (n1, n2) in ((114, 101), (118, 101), (108, 108)):
                        pos += add(pos + 3)
                        continue
            if not (c == _CR or c == _LF or f & _NUMBER):
                if f & _LETTER or fl(pos + 1) & _LETTER:
                    pos += 1
                    while fl(pos) & _LETTER:
                        pos += 1
                    add(pos)
                    continue
            if f & _NUMBER:
                if max_digits == 1:
                    pos += 1
                    add(pos)
                    continue
                i0 = pos
                while fl(pos) & _NUMBER:
                    pos += 1
                    if pos - i0 >= max_digits:
                        add(pos)
                        i0 = pos
                add(pos)
                continue
            f2 = fl(pos + 1) if c == _SPACE else f
            if not (f2 & (_WS | _LETTER | _NUMBER)) and (f & 0xFFFF):
                pos += c == _SPACE
                while not (f2 & (_WS | _LETTER | _NUMBER)) and (f2 & 0xFFFF):
                    pos += 1
                    f2 = fl(pos)
                c2 = cpt(pos)
                while c2 == _CR or c2 == _LF:
                    pos += 1
                    c2 = cpt(pos)
                add(pos)
                continue
            nws = 0
            last_rn = 0
            while fl(pos + nws) & _WS:
                c2 = cpt(pos + nws)
                if c2 == _CR or c2 == _LF:
                    last_rn = pos + nws + 1
                nws += 1
            if last_rn > 0:
                pos = last_rn
                add(pos)
                continue
            if nws > 1 and cpt(pos + nws) != -1:
                pos += nws - 1
                add(pos)
                continue
            if nws > 0:
                pos += nws
                add(pos)
                continue
            pos += 1
            add(pos)
    return out


def _split_digits(cpts, flags, offsets):
    """unicode_regex_split_stl with "\\p{N}" on llama.cpp's collapsed text: every number codepoint
    (ASCII 0-9; above 127, NUMBER and not whitespace) is a word of its own, the runs between too."""
    out = []
    start = 0
    for offset in offsets:
        seg_start = start
        run = 0
        for p in range(start, start + offset):
            c = cpts[p]
            is_num = (48 <= c <= 57) if c < 128 else (not flags[p] & _WS and (flags[p] & 0xFF) == _NUMBER)
            if is_num:
                if run:
                    out.append(run)
                out.append(1)
                run = 0
            else:
                run += 1
        if run:
            out.append(run)
        start = seg_start + offset
    return out


def split_words(text: str, pre: PreTokenizer) -> list[str]:
    """unicode_regex_split(text, regex_exprs) without the byte encoding: the words, as text."""
    cpts = [ord(ch) for ch in text]
    if not cpts:
        return []
    flags = text_flags(cpts)
    offsets = [len(cpts)]
    for s in pre.splitters:
        if s == GPT2:
            offsets = _split_gpt2(cpts, flags, offsets)
        elif s == DIGITS:
            offsets = _split_digits(cpts, flags, offsets)
        else:
            offsets = _split_llama3_qwen2(cpts, flags, offsets, 3 if s == LLAMA3 else 1)
    words, p = [], 0
    for n in offsets:
        words.append(text[p:p + n])
        p += n
    return words


# =============================================================================================
# Byte encoding (unicode_byte_to_utf8_map: GPT-2's bytes_to_unicode) and the merges
# =============================================================================================


def _byte_table() -> tuple[str, ...]:
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return tuple(table[b] for b in range(256))


BYTE_TO_CHAR = _byte_table()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def byte_encode(word: str) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8", "surrogatepass"))


def byte_decode(text: str) -> bytes:
    """llama_decode_text: each character back to its byte (characters outside the table as UTF-8)."""
    out = bytearray()
    for ch in text:
        b = CHAR_TO_BYTE.get(ch)
        if b is None:
            out += ch.encode("utf-8", "surrogatepass")
        else:
            out.append(b)
    return bytes(out)


class BPE:
    """llm_tokenizer_bpe_session over one vocabulary: token text -> id, merge ranks, the pre-tokenizer."""

    def __init__(self, token_to_id: dict[str, int], merges: list[str], pre: PreTokenizer):
        self.t2i = token_to_id
        self.pre = pre
        self.ranks: dict[tuple[str, str], int] = {}
        for i, m in enumerate(merges):
            p = m.find(" ", 1)
            if p >= 0:
                self.ranks.setdefault((m[:p], m[p + 1:]), i)
            else:
                self.ranks.setdefault(("", ""), i)  # llama.cpp inserts ("", "") for a merge without a space
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str, out: list[int]) -> None:
        for word in split_words(text, self.pre):
            ids = self._cache.get(word)
            if ids is None:
                ids = self._word(byte_encode(word))
                if len(self._cache) < 200_000:
                    self._cache[word] = ids
            out.extend(ids)

    def _word(self, word: str) -> tuple[int, ...]:
        t2i, ranks = self.t2i, self.ranks
        if self.pre.ignore_merges and word in t2i:
            return (t2i[word],)
        sym = list(word)
        n = len(sym)
        if n == 0:
            return ()
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list = []

        def add(left, right):
            if left < 0 or right < 0:
                return
            r = ranks.get((sym[left], sym[right]))
            if r is None:
                return
            # llm_bigram_bpe::comparator: lowest rank first, then the leftmost
            heapq.heappush(heap, (r, left, right, sym[left] + sym[right]))

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, joined = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != joined:
                continue
            sym[left] = joined
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        ids: list[int] = []
        i = 0
        while i != -1:
            s = sym[i]
            if s:
                tid = t2i.get(s)
                if tid is not None:
                    ids.append(tid)
                else:  # each byte of the symbol's UTF-8 form as a one-byte token, where one exists
                    for b in s.encode("utf-8", "surrogatepass"):
                        if b < 0x80:
                            t = t2i.get(chr(b))
                            if t is not None:
                                ids.append(t)
            i = nxt[i]
        return tuple(ids)


__all__ = ["BPE", "BYTE_TO_CHAR", "byte_decode", "byte_encode", "split_words"]
