"""GGUF tokenizer keys -> Hugging Face tokenizer files (`ggquant convert MODEL.gguf --to hf`).

The inverse of vocab.py. What is written:

- tokenizer.json, a `tokenizers` BPE with byte fallback in Gemma's layout (normalizer
  [Prepend("▁"),] Replace(" ", "▁"), decoder Replace/ByteFallback/Fuse, a TemplateProcessing
  post-processor adding <bos>), loaded by the architecture's tokenizer_class (GemmaTokenizer for
  Gemma, PreTrainedTokenizerFast, which runs the file as written, for Llama 2 / Mistral):
  * `tokenizer.ggml.model = gemma4`: the GGUF's own merges, in their order;
  * `tokenizer.ggml.model = llama` (SentencePiece BPE, Gemma 3): merges derived from the scores.
    llama.cpp's SPM tokenizer (llama-vocab.cpp llm_tokenizer_spm_session) repeatedly merges the
    adjacent pair whose concatenation is a token with the highest score (leftmost on ties);
    a BPE whose merge list holds every split (a, b) of every token t = a + b, ranked by t's
    score, makes the same choices (the scores of distinct Gemma pieces are distinct).
- `tokenizer.ggml.model = gpt2` (Llama 3, Qwen, SmolLM2): a byte-level BPE tokenizer.json with the
  GGUF's merges and the Hugging Face pre-tokenizer of its llama.cpp pre-tokenizer name (bpe.py).
- tokenizer.model (llama/SPM only): a SentencePiece ModelProto with the pieces, scores and
  types, so that converting the folder back to GGUF (which reads tokenizer.model, vocab.py
  sentencepiece_tokens) gives the same tokenizer keys.
- tokenizer_config.json: the special tokens, add_bos/add_eos, added_tokens_decoder (CONTROL
  tokens special, USER_DEFINED ones not: both are split off before BPE, as llama.cpp's
  tokenizer_st_partition does), and the chat template(s), whose text is copied unchanged.

Token types are gguf TokenType values: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
UNUSED 5, BYTE 6.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from gguf import Keys, TokenType

from ggquant.arch.base import GGUFFacts
from ggquant.errors import GGQuantError

K = Keys.Tokenizer
SPACE = "\u2581"
_NAMED_IDS = (("bos_token", K.BOS_ID), ("eos_token", K.EOS_ID), ("unk_token", K.UNK_ID),
              ("sep_token", K.SEP_ID), ("pad_token", K.PAD_ID), ("mask_token", K.MASK_ID))


def _dump(obj: Any, indent: int | None = 2) -> bytes:
    """JSON as UTF-8; indent=None for the big tokenizer.json (json's C encoder is used only
    without indentation, ~20x faster on a 262k vocabulary)."""
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def _added_entry(tid: int, text: str, special: bool) -> dict:
    return {"id": tid, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


class GGUFVocab:
    """The tokenizer keys of a GGUF, checked."""

    def __init__(self, g: GGUFFacts):
        self.g = g
        self.model = g.get(K.MODEL)
        self.tokens: list[str] = g.get(K.LIST) or []
        if not self.tokens:
            raise GGQuantError(f"{g.path}: metadata key '{K.LIST}' is missing; the GGUF has no vocabulary")
        n = len(self.tokens)
        types = g.get(K.TOKEN_TYPE)
        self.types: list[int] = list(types) if types is not None else [int(TokenType.NORMAL)] * n
        scores = g.get(K.SCORES)
        self.scores: list[float] = [float(s) for s in scores] if scores is not None else [0.0] * n
        if len(self.types) != n or len(self.scores) != n:
            raise GGQuantError(f"{g.path}: {n} tokens but {len(self.types)} token types and {len(self.scores)} scores")
        self.ids = {name: g.get(key) for name, key in _NAMED_IDS if isinstance(g.get(key), int)}
        for name, tid in self.ids.items():
            if not 0 <= tid < n:
                raise GGQuantError(f"{g.path}: {name} id {tid} is outside the vocabulary (0..{n - 1})")
        self.add_bos = bool(g.get(K.ADD_BOS, False))
        self.add_eos = bool(g.get(K.ADD_EOS, False))
        # absent: llama.cpp SPM prepends the space (llama-vocab.cpp; Gemma 3 GGUFs say false)
        self.add_space_prefix = bool(g.get(K.ADD_PREFIX, True))

    def named(self) -> dict[str, str]:
        return {name: self.tokens[tid] for name, tid in self.ids.items()}

    def config_named(self) -> dict[str, str]:
        """The named tokens that tokenizer_config.json names. gguf-py's SpecialVocab takes them from
        tokenizer_config.json first (bos, eos, unk, sep, pad, mask order), then config.json's
        bos/eos/pad_token_id fill the gaps, so the GGUF's key order tells where each came from: the
        run in canonical order from the start came from tokenizer_config.json; a bos, eos or pad id
        after it (Qwen2's bos: tokenizer_config.json says null) from config.json only."""
        canon = [name for name, _ in _NAMED_IDS]
        by_key = {key: name for name, key in _NAMED_IDS}
        order = [by_key[k] for k in self.g.fields if by_key.get(k) in self.ids]
        run = len(order)
        for i in range(1, len(order)):
            if canon.index(order[i]) < canon.index(order[i - 1]):
                run = i
                break
        if not set(order[run:]) <= {"bos_token", "eos_token", "pad_token"}:
            run = len(order)  # not what SpecialVocab writes: name them all
        return {name: self.tokens[self.ids[name]] for name in canon if name in order[:run]}

    def chat_template(self) -> str | list[dict] | None:
        """vocab.write_chat_template read backwards: the default template, plus the named ones."""
        default = self.g.get(K.CHAT_TEMPLATE)
        names = self.g.get(K.CHAT_TEMPLATES) or []
        if not names:
            return default
        out = [{"name": "default", "template": default}] if default is not None else []
        for name in names:
            t = self.g.get(K.CHAT_TEMPLATE_N.format(name=name))
            if t is not None:
                out.append({"name": name, "template": t})
        return out


# =============================================================================================
# tokenizer.json
# =============================================================================================


def spm_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """Every split (a, b) of every token a + b whose halves are tokens, best score first.

    llama.cpp's SPM session looks the concatenation up among all tokens, whatever their type,
    so every token takes part; ties in score (only among special tokens) keep id order, and
    the splits of one token keep left-to-right order."""
    index = {t: i for i, t in enumerate(tokens)}
    cands: list[tuple[float, int, int]] = []
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            if t[:k] in index and t[k:] in index:
                cands.append((-scores[i], i, k))
    cands.sort()
    return [[tokens[i][:k], tokens[i][k:]] for _, i, k in cands]


def _gguf_merges(v: GGUFVocab) -> list[list[str]]:
    """tokenizer.ggml.merges ("a b") as pairs. gguf-py writes a space inside a part as U+0120
    (vocab.py SpecialVocab); it is turned back only where that gives a token."""
    merges = v.g.get(K.MERGES) or []
    if not merges:
        raise GGQuantError(f"{v.g.path}: metadata key '{K.MERGES}' is missing; a BPE tokenizer needs its merges")
    index = set(v.tokens)
    out = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGQuantError(f"{v.g.path}: merge {m!r} is not two parts separated by one space")
        fixed = []
        for p in parts:
            if p not in index and "\u0120" in p and p.replace("\u0120", " ") in index:
                p = p.replace("\u0120", " ")
            fixed.append(p)
        out.append(fixed)
    return out


def _post_processor(v: GGUFVocab) -> dict | None:
    """TemplateProcessing: <bos> before each sequence (and <eos> after, if added). gguf-py's SpecialVocab
    writes tokenizer.ggml.add_sep_token from what separates A and B in the pair template (false for
    Gemma's and Llama 3's "<bos> A <bos> B"), so the pair keeps <bos> between them only where the GGUF
    has that key; without it the pair is "<bos> A B", with it true "<bos> A <sep> B" (<eos> after each
    sequence where the GGUF adds it)."""
    bos, eos = v.named().get("bos_token"), v.named().get("eos_token")
    seq = [("bos", bos)] if v.add_bos and bos is not None else []
    tail = [("eos", eos)] if v.add_eos and eos is not None else []
    if not seq and not tail:
        return None

    def special(text):
        return {"SpecialToken": {"id": text, "type_id": 0}}

    def sequence(name):
        return {"Sequence": {"id": name, "type_id": 0}}

    single = [special(t) for _, t in seq] + [sequence("A")] + [special(t) for _, t in tail]
    add_sep = v.g.get(K.ADD_SEP)
    sep = v.named().get("sep_token", eos)
    if add_sep is None:
        pair = [special(t) for _, t in seq] + [sequence("A"), sequence("B")] + [special(t) for _, t in tail]
    elif add_sep and sep is not None:  # "<bos> A [<eos>] <sep> B [<eos>]"
        pair = single + [special(sep), sequence("B")] + [special(t) for _, t in tail]
    else:
        pair = single + [special(t) for _, t in seq] + [sequence("B")] + [special(t) for _, t in tail]
    used = {t for _, t in seq + tail} | ({sep} if add_sep and sep is not None else set())
    return {"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": {t: {"id": t, "ids": [v.tokens.index(t)], "tokens": [t]} for t in sorted(used)}}


def tokenizer_json(v: GGUFVocab, special: list[bool], added: list[int], n_model_vocab: int) -> bytes:
    """The tokenizers file. `added`: ids split off before BPE; `special[i]` for those."""
    if v.model == "llama":
        merges = spm_merges(v.tokens, v.scores)
    else:
        merges = _gguf_merges(v)
    unk = v.named().get("unk_token")
    normalizer: dict = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if v.add_space_prefix:  # llama.cpp SPM: a space before the text (Gemma 3 has none)
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, normalizer]}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_entry(i, v.tokens[i], special[i]) for i in added],
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": _post_processor(v),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(v.tokens[:n_model_vocab])}, "merges": merges},
    }
    return _dump(doc, indent=None)


# =============================================================================================
# tokenizer.json of a GPT-2 byte-level BPE (tokenizer.ggml.model = gpt2)
# =============================================================================================

# The Hugging Face pre-tokenizer of each llama.cpp pre-tokenizer group (what the published tokenizer.json
# files hold; llama.cpp's regexes in llama-vocab.cpp are adaptations of these)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe_pipeline(pre: str, path) -> tuple[dict | None, dict, bool]:
    """(normalizer, pre_tokenizer, ignore_merges) of the tokenizer.json for llama.cpp pre-tokenizer `pre`."""
    from ggquant.arch.bpe_pre import DIGITS, GPT2, LLAMA3, QWEN2, pre_tokenizer

    pt = pre_tokenizer(pre, str(path))

    def split(regex):
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}

    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if pt.splitters == (LLAMA3,):
        return None, {"type": "Sequence", "pretokenizers": [split(_LLAMA3_SPLIT), level]}, pt.ignore_merges
    if pt.splitters == (QWEN2,):
        return {"type": "NFC"}, {"type": "Sequence", "pretokenizers": [split(_QWEN2_SPLIT), level]}, False
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pt.splitters == (DIGITS, GPT2):  # StarCoder / SmolLM: every digit apart, then GPT-2's regex
        return None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, gpt2]}, False
    return None, gpt2, False


def gpt2_tokenizer_json(v: GGUFVocab, special: list[bool], added: list[int]) -> bytes:
    """A `tokenizers` byte-level BPE holding the GGUF's vocabulary: its tokens in model.vocab, CONTROL and
    USER_DEFINED ones also as added tokens (special or not), UNUSED ones ([PAD<i>] fillers) left out, the
    merges in their order, the pre-tokenizer of tokenizer.ggml.pre, <bos> added where the GGUF adds it.
    llama.cpp's converter identifies the pre-tokenizer of the result by the same hash (bpe_pre.py)."""
    pre = v.g.get(K.PRE) or "default"
    normalizer, pre_tok, ignore_merges = _bpe_pipeline(pre, v.g.path)
    # every token but the UNUSED fillers sits in model.vocab: `tokenizers` numbers an added token that the
    # model lacks after the model's vocabulary, whatever id added_tokens gives it
    UNUSED = int(TokenType.UNUSED)
    vocab = {t: i for i, t in enumerate(v.tokens) if v.types[i] != UNUSED}
    bos = v.named().get("bos_token")
    post: dict = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if v.add_bos and bos is not None:
        post = {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            _post_processor(v)]}
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added_entry(i, v.tokens[i], special[i]) for i in added],
        "normalizer": normalizer, "pre_tokenizer": pre_tok, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": _gguf_merges(v)},
    }
    return _dump(doc, indent=None)


# =============================================================================================
# tokenizer.model (SentencePiece ModelProto, sentencepiece_model.proto field numbers)
# =============================================================================================

_SP_TYPES = {int(TokenType.NORMAL): 1, int(TokenType.UNKNOWN): 2, int(TokenType.CONTROL): 3,
             int(TokenType.USER_DEFINED): 4, int(TokenType.UNUSED): 5, int(TokenType.BYTE): 6}
_SP_BPE = 2  # TrainerSpec.ModelType.BPE


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL[n]
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


_SMALL = [bytes([i]) for i in range(0x80)]


def _pb_bytes(no: int, b: bytes) -> bytes:
    return _varint(no << 3 | 2) + _varint(len(b)) + b


def _pb_int(no: int, v: int) -> bytes:
    return _varint(no << 3) + _varint(v)


def sentencepiece_model(v: GGUFVocab) -> bytes:
    """ModelProto: pieces (1), trainer_spec (2), normalizer_spec (3), Gemma's settings (no
    dummy prefix, whitespace escaped to ▁, byte fallback). The unknown token is typed UNKNOWN
    (SentencePiece requires one); tokenizer_config.json re-types the special ones."""
    unk = v.ids.get("unk_token")
    out = bytearray()
    score_key = b"\x15"  # field 2, wire type 5 (fixed32)
    packed = struct.pack(f"<{len(v.scores)}f", *v.scores)
    for i, (t, ty) in enumerate(zip(v.tokens, v.types)):
        sp_type = 2 if i == unk else _SP_TYPES.get(int(ty), 1)
        text = t.encode("utf-8")
        piece = b"\x0a" + _varint(len(text)) + text + score_key + packed[4 * i:4 * i + 4] + b"\x18" + _varint(sp_type)
        out += b"\x0a" + _varint(len(piece)) + piece
    trainer = _pb_int(3, _SP_BPE) + _pb_int(4, len(v.tokens)) + _pb_int(35, 1)  # byte_fallback
    for no, name in ((40, "unk_token"), (41, "bos_token"), (42, "eos_token"), (43, "pad_token")):
        trainer += _pb_int(no, v.ids.get(name, -1))
    normalizer = _pb_bytes(1, b"identity") + _pb_int(3, 0) + _pb_int(4, 0) + _pb_int(5, 1)
    return bytes(out) + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


# =============================================================================================
# The files
# =============================================================================================


def tokenizer_files(g: GGUFFacts, *, visible_specials: tuple[str, ...] = (), named_extra: dict[str, str] | None = None,
                    model_max_length: int | None = None,
                    tokenizer_class: str = "PreTrainedTokenizerFast") -> dict[str, bytes]:
    """{file name: bytes} of the HF tokenizer for the GGUF's vocabulary.

    visible_specials: USER_DEFINED token texts that are special tokens in HF (Gemma 4's chat
    syntax tokens, which the converter re-types). named_extra: other named tokens of
    tokenizer_config.json (e.g. boi_token), written when the vocabulary has them."""
    v = GGUFVocab(g)
    if v.model == "gpt2":
        return gpt2_tokenizer_files(v, model_max_length, tokenizer_class)
    if v.model not in ("llama", "gemma4"):
        raise GGQuantError(f"{g.path}: tokenizer.ggml.model = {v.model!r}; ggquant writes Hugging Face tokenizers for "
                           f"'llama' (SentencePiece), 'gemma4' (BPE) and 'gpt2' (byte-level BPE) vocabularies")
    CONTROL, USER, UNKNOWN = int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN)
    n = len(v.tokens)
    special = [ty in (CONTROL, UNKNOWN) or (ty == USER and t in visible_specials) for t, ty in zip(v.tokens, v.types)]
    added = [i for i in range(n) if v.types[i] in (CONTROL, UNKNOWN, USER)]
    n_model = n
    if v.model == "gemma4":
        # vocab.hf_bpe_tokens: non-special added tokens live past the BPE vocabulary
        while n_model and v.types[n_model - 1] == USER and not special[n_model - 1]:
            n_model -= 1
    named = v.named()
    extra_named = {k: t for k, t in (named_extra or {}).items() if t in set(v.tokens)}
    listed = set(named.values()) | set(extra_named.values())
    cfg: dict[str, Any] = {
        "add_bos_token": v.add_bos,
        "add_eos_token": v.add_eos,
        "added_tokens_decoder": {str(i): {k: x for k, x in _added_entry(i, v.tokens[i], special[i]).items()
                                          if k != "id"} for i in added},
        **v.config_named(),
        **extra_named,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "spaces_between_special_tokens": False,
        "tokenizer_class": tokenizer_class,
        "use_default_system_prompt": False,
    }
    if v.model == "gemma4":
        # transformers' all_special_ids (what the Gemma 4 converter types CONTROL) come from here
        cfg["extra_special_tokens"] = [v.tokens[i] for i in added if special[i] and v.tokens[i] not in listed]
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    tmpl = v.chat_template()
    if tmpl is not None:
        cfg["chat_template"] = tmpl
    files = {"tokenizer.json": tokenizer_json(v, special, added, n_model), "tokenizer_config.json": _dump(cfg)}
    if v.model == "llama":
        files["tokenizer.model"] = sentencepiece_model(v)
    return files


def gpt2_tokenizer_files(v: GGUFVocab, model_max_length: int | None, tokenizer_class: str) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json of a GPT-2 byte-level BPE GGUF vocabulary."""
    CONTROL, USER = int(TokenType.CONTROL), int(TokenType.USER_DEFINED)
    special = [ty == CONTROL for ty in v.types]
    added = [i for i, ty in enumerate(v.types) if ty in (CONTROL, USER)]
    cfg: dict[str, Any] = {
        "added_tokens_decoder": {str(i): {k: x for k, x in _added_entry(i, v.tokens[i], special[i]).items()
                                          if k != "id"} for i in added},
        **v.config_named(),
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": tokenizer_class,
    }
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    tmpl = v.chat_template()
    if tmpl is not None:
        cfg["chat_template"] = tmpl
    return {"tokenizer.json": gpt2_tokenizer_json(v, special, added), "tokenizer_config.json": _dump(cfg)}
