"""Tokenizers built from a GGUF's own vocabulary, ported from llama.cpp's src/llama-vocab.cpp.

Three models: the two of the Gemma family below, and ``tokenizer.ggml.model = gpt2`` (Llama 3,
SmolLM2, Qwen2/2.5/3...): GPT-2 byte-level BPE with the pre-tokenizer named by tokenizer.ggml.pre
(runtime/bpe.py).

- ``tokenizer.ggml.model = llama`` (Gemma 3): SentencePiece-style merging by score
  (llm_tokenizer_spm_session): the text is split into UTF-8 characters and the adjacent pair whose
  concatenation is a vocabulary entry with the highest score is merged first (ties: leftmost),
  until no pair is in the vocabulary; pieces that are not entries become <0xNN> byte tokens.
- ``tokenizer.ggml.model = gemma4`` (Gemma 4): BPE with ranked merges over raw UTF-8
  (llm_tokenizer_bpe_session with the gemma4 pre-tokenizer): words are runs of non-newlines and
  runs of newlines, merges are applied lowest rank first (ties: leftmost), unknown pieces become
  <0xNN> byte tokens.

Both first split the text around special tokens (tokenizer_st_partition): every CONTROL /
USER_DEFINED / UNKNOWN token, longest first; CONTROL and UNKNOWN only with parse_special. Spaces
become U+2581 before merging (llama_escape_whitespace). Token ids equal llama.cpp's
``llama_tokenize`` (checked by tests against llama-cpp-python's ``Llama.tokenize``).
"""

from __future__ import annotations

import codecs
import heapq
import re

import numpy as np

from ggquant.errors import GGQuantError

# llama.h llama_token_attr bits, and llama_token_type -> attr (llama-vocab.cpp token_to_attr)
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
_TYPE_TO_ATTR = {1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED,
                 5: ATTR_UNUSED, 6: ATTR_BYTE}

# llama-vocab.cpp: texts that mark end-of-generation tokens (and are forced to CONTROL)
_EOG_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>"}
_EOT_TEXTS = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<end_of_utterance>"}

# llama-vocab.cpp: FIM prefix/suffix/middle/pad/repo/separator tokens found by their text
_FIM_TEXTS = {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>", "\u2581<PRE>",
              "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
              "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>",
              "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>", "<|code_middle|>",
              "<|middle|>", "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
              "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"}

SPACE = "\u2581"  # ▁
_SPACE_B = SPACE.encode()
_GEMMA4_SPLIT = re.compile(rb"[^\n]+|[\n]+")


def _utf8_len(b: int) -> int:
    """unicode.cpp unicode_len_utf8: length of a UTF-8 sequence from its lead byte."""
    return (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[b >> 4]


def _chars(text: bytes) -> list[bytes]:
    out, i, n = [], 0, len(text)
    while i < n:
        k = min(_utf8_len(text[i]), n - i)
        out.append(text[i:i + k])
        i += k
    return out


SUPPRESS_TOKENS_KEY = "tokenizer.ggml.suppress_tokens"


class Tokenizer:
    suppress_ids: list[int] = []  # tokens the sampler never picks (common/sampling.cpp: logit bias -inf)

    def __init__(self, tokens: list[str], token_types, scores=None, merges: list[str] | None = None,
                 model: str = "llama", bos_id: int | None = None, eos_id: int | None = None,
                 eot_id: int | None = None, add_bos: bool | None = True, add_eos: bool = False,
                 add_space_prefix: bool = False, source: str = "vocabulary", pre: str | None = None):
        if model not in ("llama", "gemma4", "gpt2"):
            raise GGQuantError(f"{source}: tokenizer model {model!r} is not supported by the ggquant runtime "
                               f"(supported: llama (SentencePiece), gemma4 (BPE, Gemma 4), gpt2 (byte-level BPE))")
        self.model = model
        self.source = source
        self.texts = [t.encode("utf-8", "surrogatepass") for t in tokens]
        self.n_vocab = len(tokens)
        types = np.asarray(token_types, dtype=np.int64) if token_types is not None else np.ones(self.n_vocab, np.int64)
        self.attrs = [_TYPE_TO_ATTR.get(int(t), 0) for t in types]
        self.scores = np.asarray(scores, dtype=np.float32) if scores is not None else np.zeros(self.n_vocab, np.float32)
        self.token_to_id: dict[bytes, int] = {}
        for i, t in enumerate(self.texts):  # later duplicates win, as in llama.cpp's load
            self.token_to_id[t] = i
        self.ranks: dict[tuple[bytes, bytes], int] = {}
        if model == "gemma4":
            if not merges:
                raise GGQuantError(f"{source}: the gemma4 tokenizer needs tokenizer.ggml.merges (cannot find "
                                   f"tokenizer merges)")
            for i, m in enumerate(merges):
                b = m.encode("utf-8", "surrogatepass")
                p = b.find(b" ", 1)
                if p >= 0:
                    self.ranks[(b[:p], b[p + 1:])] = i
        self.bpe = None
        if model == "gpt2":
            from ggquant.arch.bpe_pre import pre_tokenizer
            from ggquant.runtime.bpe import BPE

            if not merges:
                raise GGQuantError(f"{source}: a gpt2 tokenizer needs tokenizer.ggml.merges (cannot find tokenizer "
                                   f"merges)")
            pt = pre_tokenizer(pre or "default", source)
            self.bpe = BPE({t: i for i, t in enumerate(tokens)}, list(merges), pt)
            if add_bos is None:  # llama-vocab.cpp: the pre-tokenizer's default when the key is absent
                add_bos = pt.add_bos
            if bos_id is None:
                bos_id = 11 if 11 < len(tokens) else None  # llama-vocab.cpp's BPE default special_bos_id
            if eos_id is None:
                eos_id = 11 if 11 < len(tokens) else None
        if add_bos is None:
            add_bos = True  # SentencePiece: add_bos defaults to true
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        if model == "gemma4":
            self.add_bos = True  # llama-vocab.cpp forces add_bos for the gemma4 pre-tokenizer
        self.add_space_prefix = add_space_prefix
        self.eog_ids: set[int] = set()
        if eos_id is not None:
            self.eog_ids.add(eos_id)
        found_eot = eot_id
        for text, i in self.token_to_id.items():
            s = text.decode("utf-8", "replace")
            if found_eot is None and s in _EOT_TEXTS:
                found_eot = i
                self.attrs[i] |= ATTR_CONTROL
            if s in _EOG_TEXTS:
                self.eog_ids.add(i)
                self.attrs[i] |= ATTR_CONTROL
            if s in _FIM_TEXTS:  # llama-vocab.cpp: FIM tokens found by their text become CONTROL
                self.attrs[i] |= ATTR_CONTROL
        if found_eot is not None:
            self.eog_ids.add(found_eot)
        self.eot_id = found_eot
        special = [i for i, a in enumerate(self.attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        self.special = sorted(special, key=lambda i: -len(self.texts[i]))  # longest first

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        g = reader.get
        tokens = g("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGQuantError(f"{reader.path}: no tokenizer.ggml.tokens in the file; pass token ids instead of text")

        def opt_id(key):
            v = g(key)
            return None if v is None else int(v)

        tok = cls(tokens, g("tokenizer.ggml.token_type"), g("tokenizer.ggml.scores"), g("tokenizer.ggml.merges"),
                  model=g("tokenizer.ggml.model", "llama"), bos_id=opt_id("tokenizer.ggml.bos_token_id"),
                  eos_id=opt_id("tokenizer.ggml.eos_token_id"), eot_id=opt_id("tokenizer.ggml.eot_token_id"),
                  add_bos=None if g("tokenizer.ggml.add_bos_token") is None else bool(g("tokenizer.ggml.add_bos_token")),
                  pre=g("tokenizer.ggml.pre"),
                  add_eos=bool(g("tokenizer.ggml.add_eos_token", False)),
                  # llama-vocab.cpp: SentencePiece vocabularies prepend a space unless the key says otherwise
                  add_space_prefix=bool(g("tokenizer.ggml.add_space_prefix",
                                         g("tokenizer.ggml.model", "llama") == "llama")),
                  source=str(reader.path))
        # llama-vocab.cpp load: tokenizer.ggml.suppress_tokens, ids outside the vocabulary dropped
        # (Gemma 4 Unified writes generation_config.json's suppress_tokens there)
        ids = g(SUPPRESS_TOKENS_KEY)
        tok.suppress_ids = [] if ids is None else [int(i) for i in np.asarray(ids).reshape(-1)
                                                   if 0 <= int(i) < tok.n_vocab]
        return tok

    # --- encoding -----------------------------------------------------------------------------
    def _partition(self, text: bytes, parse_special: bool) -> list:
        """tokenizer_st_partition: a list of bytes fragments (raw text) and ints (special tokens)."""
        frags: list = [text]
        for sid in self.special:
            a = self.attrs[sid]
            if not parse_special and a & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            st = self.texts[sid]
            if not st:
                continue
            out = []
            for f in frags:
                if not isinstance(f, bytes) or st not in f:
                    out.append(f)
                    continue
                parts = f.split(st)
                for j, p in enumerate(parts):
                    if j:
                        out.append(sid)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama_tokenize(text, add_special, parse_special); Llama.tokenize(text, add_bos, special)."""
        raw = text.encode("utf-8", "surrogatepass")
        frags = self._partition(raw, parse_special) if raw else []
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise GGQuantError(f"{self.source}: the vocabulary asks for a BOS token but has no bos_token_id")
            out.append(self.bos_id)
        prev_special = True
        for f in frags:
            if isinstance(f, int):
                out.append(f)
                prev_special = True
                continue
            if self.model == "llama":
                if self.add_space_prefix and prev_special:
                    f = b" " + f
                self._spm(f.replace(b" ", _SPACE_B), out)
            elif self.bpe is not None:
                self.bpe.encode(f.decode("utf-8", "surrogatepass"), out)
            else:
                self._bpe(f.replace(b" ", _SPACE_B), out)
            prev_special = False
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _byte_token(self, b: int) -> int | None:
        t = self.token_to_id.get(b"<0x%02X>" % b)
        if t is None and self.model == "llama":
            t = self.token_to_id.get(bytes([b]))
        return t

    def _spm(self, text: bytes, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize."""
        sym = _chars(text)
        n = len(sym)
        if n == 0:
            return
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        size = [len(s) for s in sym]
        start = [0] * n
        o = 0
        for i in range(n):
            start[i] = o
            o += size[i]
        heap: list = []
        rev: dict[bytes, tuple[int, int]] = {}
        t2i, scores = self.token_to_id, self.scores

        def add(left, right):
            if left < 0 or right < 0:
                return
            piece = text[start[left]:start[left] + size[left] + size[right]]
            tid = t2i.get(piece)
            if tid is None or tid >= self.n_vocab:
                return
            # llm_bigram_spm::comparator: highest score first, then the leftmost
            heapq.heappush(heap, (-float(scores[tid]), left, right, len(piece)))
            rev[piece] = (left, right)

        for i in range(1, n):
            add(i - 1, i)
        while heap:
            _, left, right, sz = heapq.heappop(heap)
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != sz:
                continue
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])

        def resegment(i):
            piece = text[start[i]:start[i] + size[i]]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
                return
            p = rev.get(piece)
            if p is None:
                for b in piece:
                    bt = self._byte_token(b)
                    if bt is None:
                        raise GGQuantError(f"{self.source}: no byte token <0x{b:02X}> for text the vocabulary cannot spell")
                    out.append(bt)
                return
            resegment(p[0])
            resegment(p[1])

        i = 0
        while i != -1:
            resegment(i)
            i = nxt[i]

    def _bpe(self, text: bytes, out: list[int]) -> None:
        """llm_tokenizer_bpe_session::tokenize with the gemma4 pre-tokenizer (no byte encoding)."""
        t2i, ranks = self.token_to_id, self.ranks
        for word in _GEMMA4_SPLIT.findall(text):
            if word.strip(b"\n") == b"" and word in t2i:  # "fix for gemma 4": a newline run is one token
                out.append(t2i[word])
                continue
            sym = _chars(word)
            n = len(sym)
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
                sym[right] = b""
                nxt[left] = nxt[right]
                if nxt[right] >= 0:
                    prev[nxt[right]] = left
                add(prev[left], left)
                add(left, nxt[left])
            i = 0
            while i != -1:
                s = sym[i]
                if s:
                    tid = t2i.get(s)
                    if tid is not None:
                        out.append(tid)
                    else:
                        for b in s:
                            bt = self._byte_token(b)
                            if bt is not None:
                                out.append(bt)
                i = nxt[i]

    # --- decoding -----------------------------------------------------------------------------
    def piece(self, tid: int, special: bool = False) -> bytes:
        """llama_token_to_piece: the bytes a token stands for (CONTROL / UNKNOWN only with special)."""
        a = self.attrs[tid]
        if a & (ATTR_CONTROL | ATTR_UNKNOWN):
            return self.texts[tid] if special else b""
        if a & ATTR_USER_DEFINED:
            return self.texts[tid]
        if a & ATTR_BYTE:
            t = self.texts[tid]
            if len(t) == 6 and t.startswith(b"<0x") and t.endswith(b">"):
                return bytes([int(t[3:5], 16)])
            return t
        if a & ATTR_NORMAL:
            if self.bpe is not None:  # llama_decode_text: GPT-2 byte characters back to bytes
                from ggquant.runtime.bpe import byte_decode

                return byte_decode(self.texts[tid].decode("utf-8", "surrogatepass"))
            return self.texts[tid].replace(_SPACE_B, b" ")
        return b""

    def decode(self, ids, special: bool = False) -> str:
        return b"".join(self.piece(int(i), special) for i in ids).decode("utf-8", "replace")

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special)


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tok: Tokenizer, special: bool = False):
        self.tok = tok
        self.special = special
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, tid: int) -> str:
        return self._dec.decode(self.tok.piece(int(tid), self.special))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
