"""Tokenizer files -> GGUF tokenizer keys, the way llama.cpp's converter writes them.

Three readers, each a re-implementation of what the reference converter reads (gguf-py vocab.py
and conversion/base.py in the llama.cpp tree of llama-cpp-python 0.3.36), without importing
transformers or sentencepiece:

- `hf_bpe_tokens`: tokenizer.json of a byte-fallback BPE (gguf-py LlamaHfVocab, used by Gemma 4):
  the base vocabulary in id order, then added tokens past it; types BYTE for <0xNN>, CONTROL for
  the tokenizer's special tokens (transformers' `all_special_ids`), NORMAL otherwise; score -1000.
- `sentencepiece_tokens`: tokenizer.model (a SentencePiece ModelProto, parsed here), plus
  added_tokens.json and tokenizer_config.json's added_tokens_decoder (base.py
  _create_vocab_sentencepiece, used by Gemma 3).
- `special_vocab`: merges, special token ids, add_bos/add_eos/add_sep, the chat template(s) and
  normalizer flags (gguf-py SpecialVocab), written in SpecialVocab.add_to_gguf's order.

Every file is decoded as UTF-8 explicitly so that a bad byte is reported with its file and offset.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from string import ascii_letters, digits
from typing import Any

from gguf import Keys, TokenType

from ggquant.formats.gguf import KV
from ggquant.formats.hf_folder import read_json, read_text
from ggquant.errors import GGQuantError

K = Keys.Tokenizer
SPACE = "\u2581"  # SentencePiece's visible space
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# transformers PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# GemmaTokenizer's constructor defaults (transformers models/gemma/tokenization_gemma.py)
GEMMA_DEFAULT_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                          "pad_token": "<pad>", "mask_token": "<mask>"}
# gguf-py GGUFWriter has add_<typ>_token_id for these special types only
_ID_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID, "pad": K.PAD_ID,
            "mask": K.MASK_ID, "eot": K.EOT_ID, "eom": K.EOM_ID}
_ADD_KEYS = {"bos": K.ADD_BOS, "eos": K.ADD_EOS, "sep": K.ADD_SEP}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def looks_special(text: str) -> bool:
    """conversion/base.py TextModel.does_token_look_special."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _content(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


# =============================================================================================
# tokenizer.json BPE (LlamaHfVocab)
# =============================================================================================


def _tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    tok = read_json(path, "the Gemma 4 tokenizer is read from tokenizer.json")
    if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict):
        raise GGQuantError(f"{path}: expected a tokenizers JSON object with a 'model' section")
    return tok


def _special_tokens(model_dir: Path, tok_config: dict | None, vocab: dict[str, int]) -> tuple[set[str], set[int]]:
    """transformers' `all_special_ids` for a tokenizers-backed tokenizer: the named specials
    (bos/eos/unk/sep/pad/cls/mask), other `*_token` keys of tokenizer_config.json and its
    extra_special_tokens (alias additional_special_tokens); special_tokens_map.json is read only
    when tokenizer_config.json has no added_tokens_decoder (tokenization_utils_base
    _from_pretrained legacy path). A name missing from the vocabulary maps to <unk>'s id."""
    cfg: dict = dict(tok_config or {})
    if "added_tokens_decoder" not in cfg:
        stm = read_json(model_dir / "special_tokens_map.json", "", required=False)
        if isinstance(stm, dict):
            for k, v in stm.items():
                if not cfg.get(k):
                    cfg[k] = v
    if cfg.get("tokenizer_class", "GemmaTokenizer") in ("GemmaTokenizer", "GemmaTokenizerFast"):
        for k, v in GEMMA_DEFAULT_SPECIALS.items():
            cfg.setdefault(k, v)
    names: list[str] = []
    for k in NAMED_SPECIALS:
        c = _content(cfg.get(k))
        if c is not None:
            names.append(c)
    for k, v in cfg.items():
        if k.endswith("_token") and k not in NAMED_SPECIALS and (
                isinstance(v, str) or isinstance(v, dict) and v.get("__type") == "AddedToken"):
            c = _content(v)
            if c is not None:
                names.append(c)
    extra = cfg.get("extra_special_tokens")
    if not extra:
        extra = cfg.get("additional_special_tokens")
    if isinstance(extra, dict):
        names.extend(c for c in map(_content, extra.values()) if c is not None)
    elif isinstance(extra, list):
        names.extend(c for c in map(_content, extra) if c is not None)
    unk = vocab.get(_content(cfg.get("unk_token")) or "")
    ids = set()
    for n in names:
        i = vocab.get(n, unk)
        if i is not None:
            ids.add(i)
    return set(names), ids


def hf_bpe_tokens(model_dir: Path) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) of a byte-fallback BPE tokenizer.json (gguf-py LlamaHfVocab)."""
    path = model_dir / "tokenizer.json"
    tok = _tokenizer_json(model_dir)
    model = tok["model"]
    if model.get("type") == "BPE" and model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        raise GGQuantError(f"{path}: a Llama-3 style byte-level BPE (ignore_merges, no byte_fallback); "
                           f"Gemma tokenizers are SentencePiece-style BPE with byte_fallback")
    decoder = tok.get("decoder") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback", False) or decoder.get("type") != "Sequence":
        raise GGQuantError(
            f"{path}: expected a BPE model with byte_fallback=true and a Sequence decoder (what llama.cpp's "
            f"Gemma 4 tokenizer reads); got model.type={model.get('type')!r}, "
            f"byte_fallback={model.get('byte_fallback')!r}, decoder.type={decoder.get('type')!r}"
        )
    base = model.get("vocab")
    if not isinstance(base, dict) or not all(isinstance(v, int) for v in base.values()):
        raise GGQuantError(f"{path}: model.vocab must map token strings to integer ids")
    n_base = len(base)
    by_id: dict[int, str] = {}
    for t, i in base.items():
        by_id[i] = t
    added: dict[str, int] = {}
    for a in tok.get("added_tokens") or []:
        if isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int):
            added.setdefault(a["content"], a["id"])
    tok_config = read_json(model_dir / "tokenizer_config.json", "", required=False)
    if tok_config is not None and not isinstance(tok_config, dict):
        raise GGQuantError(f"{model_dir / 'tokenizer_config.json'}: must hold a JSON object")
    for i, entry in ((tok_config or {}).get("added_tokens_decoder") or {}).items():
        c = _content(entry)
        if c is not None and c not in added and str(i).isdigit():
            added[c] = int(i)
    full = dict(base)
    for c, i in added.items():
        full.setdefault(c, i)
        by_id.setdefault(i, c)
    missing = [i for i in range(n_base) if i not in by_id]
    if missing:
        raise GGQuantError(f"{path}: token ids are not contiguous: id {missing[0]} has no token "
                           f"({len(missing)} ids missing below {n_base})")
    special_text, special = _special_tokens(model_dir, tok_config, full)

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_base):
        t = by_id[i]
        tokens.append(t)
        if _BYTE_TOKEN.fullmatch(t):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.CONTROL if i in special else TokenType.NORMAL)
    extra = sorted(((i, c) for c, i in added.items() if i >= n_base))
    for n, (i, c) in enumerate(extra):
        if i != n_base + n:
            raise GGQuantError(f"{path}: added token {c!r} has id {i}, but ids must continue at {n_base + n}")
        tokens.append(c)
        # LlamaHfVocab.added_tokens: CONTROL when it is one of the special tokens
        types.append(TokenType.CONTROL if c in special_text else TokenType.USER_DEFINED)
    return tokens, [-1000.0] * len(tokens), [int(t) for t in types]


# =============================================================================================
# tokenizer.json GPT-2 byte-level BPE (TextModel.get_vocab_base + get_vocab_base_pre)
# =============================================================================================

# transformers' clean_up_tokenization (tokenization_utils_base), applied by decode() when the
# tokenizer config asks for it
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def gpt2_tokens(model_dir: Path, vocab_size: int | None) -> tuple[list[str], list[int], str]:
    """(tokens, types, pre) as llama.cpp's converter writes a GPT-2 byte-level BPE vocabulary
    (conversion/base.py TextModel.get_vocab_base): every id below vocab_size in order, [PAD<i>]
    (UNUSED) for ids the tokenizer lacks, added tokens CONTROL when special or special-looking and
    USER_DEFINED otherwise, the rest NORMAL; `pre` is the pre-tokenizer llama.cpp identifies by
    hashing the tokenizer's ids on its check text (get_vocab_base_pre, ggquant.arch.bpe_pre).

    The tokenizer is tokenizer.json run by the `tokenizers` library, which is what transformers'
    AutoTokenizer runs for these models; tokenizer_config.json adds its added_tokens_decoder and
    named special tokens (transformers registers both as added tokens)."""
    from hashlib import sha256

    from ggquant.arch.bpe_pre import CHECK_TEXT, PRE_BY_HASH

    path = model_dir / "tokenizer.json"
    tj = read_json(path, "llama.cpp's converter reads a GPT-2 BPE tokenizer from tokenizer.json")
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise GGQuantError(f"{path}: expected a BPE tokenizer (model.type = 'BPE'), got "
                           f"{(model or {}).get('type')!r}")
    if not model.get("merges"):
        raise GGQuantError(f"{path}: key 'model.merges' is missing or empty; a GPT-2 BPE tokenizer needs its merges "
                           f"(llama.cpp cannot tokenize without tokenizer.ggml.merges)")
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # a file the tokenizers library cannot read
        raise GGQuantError(f"{path}: the tokenizers library cannot load it ({e})") from None
    tc = read_json(model_dir / "tokenizer_config.json", "", required=False)
    tc = tc if isinstance(tc, dict) else {}

    vocab = tok.get_vocab(with_added_tokens=True)
    added: dict[int, tuple[str, bool, bool]] = {}  # id -> (content, special, normalized)
    for i, a in tok.get_added_tokens_decoder().items():
        added[i] = (a.content, bool(a.special), bool(a.normalized))
    for sid, e in (tc.get("added_tokens_decoder") or {}).items():
        if isinstance(e, dict) and isinstance(e.get("content"), str) and str(sid).isdigit():
            added.setdefault(int(sid), (e["content"], bool(e.get("special")), bool(e.get("normalized", False))))
            vocab.setdefault(e["content"], int(sid))
    named = [_content(tc.get(k)) for k in NAMED_SPECIALS]
    extra = tc.get("additional_special_tokens") or tc.get("extra_special_tokens") or []
    named += [_content(x) for x in (extra.values() if isinstance(extra, dict) else extra)]
    in_added = {c for c, _, _ in added.values()}
    for c in named:
        if c is not None and c in vocab and c not in in_added:  # a named special becomes an added special
            added[vocab[c]] = (c, True, False)
    if vocab_size is None:
        vocab_size = len(vocab)
    top = max(vocab.values()) if vocab else -1
    if top >= vocab_size:
        raise GGQuantError(f"{path}: token id {top} is not below config.json vocab_size {vocab_size}; llama.cpp's "
                           f"converter refuses this tokenizer")

    ids = tok.encode(CHECK_TEXT).ids
    digest = sha256(str(ids).encode()).hexdigest()
    pre = PRE_BY_HASH.get(digest)
    if pre is None:
        raise GGQuantError(
            f"{path}: the BPE pre-tokenizer is not one llama.cpp knows (sha256 of its ids on the converter's "
            f"check text: {digest}); llama.cpp's converter refuses it too ('BPE pre-tokenizer was not recognized'), "
            f"and its runtime would not know which regexes to split with")

    cleanup = bool(tc.get("clean_up_tokenization_spaces", False))
    by_id = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        if i in added and added[i][0] == t:
            content, special, normalized = added[i]
            if not normalized:
                t = tok.decode(tok.encode(t, add_special_tokens=False).ids, skip_special_tokens=False)
                if cleanup:
                    for a, b in _CLEANUPS:
                        t = t.replace(a, b)
            if special or looks_special(t):
                types.append(int(TokenType.CONTROL))
            else:
                t = t.replace(SPACE, " ")  # pre-normalize user-defined spaces
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(t)
    return tokens, types, pre


def is_llama_hf_bpe(model_dir: Path) -> bool:
    """gguf-py LlamaHfVocab's test: tokenizer.json holds a SentencePiece-style BPE (byte_fallback,
    a Sequence decoder) and not a Llama 3 style byte-level one."""
    tj = read_json(model_dir / "tokenizer.json", "", required=False)
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        return False
    m = tj["model"]
    if m.get("type") == "BPE" and m.get("ignore_merges", False) and not m.get("byte_fallback", True):
        return False
    return (m.get("type") == "BPE" and bool(m.get("byte_fallback", False))
            and (tj.get("decoder") or {}).get("type") == "Sequence")


# =============================================================================================
# tokenizer.model (SentencePiece ModelProto)
# =============================================================================================

# sentencepiece_model.proto: ModelProto.pieces = 1 (repeated SentencePiece);
# SentencePiece.piece = 1 (string), .score = 2 (float), .type = 3 (enum, default NORMAL = 1)
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, pos: int, path: Path) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise GGQuantError(f"{path}: truncated protobuf varint at byte {pos}; the file is corrupted")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GGQuantError(f"{path}: malformed protobuf varint at byte {pos}")


def _fields(buf: bytes, path: Path):
    """Yield (field number, wire type, value) of one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, path)
        fno, wire = key >> 3, key & 7
        if wire == 0:
            v, pos = _varint(buf, pos, path)
        elif wire == 1:
            v, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos, path)
            v, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            v, pos = buf[pos:pos + 4], pos + 4
        else:
            raise GGQuantError(f"{path}: unsupported protobuf wire type {wire} at byte {pos}; not a "
                               f"SentencePiece model")
        if pos > len(buf):
            raise GGQuantError(f"{path}: truncated protobuf field {fno}; the file is corrupted")
        yield fno, wire, v


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """The (piece, score, type) list of a SentencePiece ModelProto, in id order."""
    buf = path.read_bytes()
    pieces = []
    for fno, wire, v in _fields(buf, path):
        if fno != 1 or wire != 2:
            continue
        piece, score, ptype = "", 0.0, SP_NORMAL
        for f2, w2, v2 in _fields(v, path):
            if f2 == 1 and w2 == 2:
                try:
                    piece = v2.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise GGQuantError(f"{path}: piece {len(pieces)} is not UTF-8 (byte {e.start}); the "
                                       f"tokenizer model is corrupted") from None
            elif f2 == 2 and w2 == 5:
                score = struct.unpack("<f", v2)[0]
            elif f2 == 3 and w2 == 0:
                ptype = v2
        pieces.append((piece, score, ptype))
    if not pieces:
        raise GGQuantError(f"{path}: no pieces found; not a SentencePiece model")
    return pieces


def sentencepiece_tokens(model_dir: Path, vocab_size: int | None) -> tuple[list[str], list[float], list[int]]:
    """conversion/base.py _create_vocab_sentencepiece: tokens padded to vocab_size with [PADn]."""
    path = model_dir / "tokenizer.model"
    pieces = read_sentencepiece(path)
    n = vocab_size or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TokenType.UNUSED)] * n
    for i, (piece, score, ptype) in enumerate(pieces[:n]):
        t = TokenType.NORMAL
        if ptype == SP_UNKNOWN:
            t = TokenType.UNKNOWN
        elif ptype == SP_CONTROL:
            t = TokenType.CONTROL
        elif ptype == SP_UNUSED:
            t = TokenType.UNUSED
        elif ptype == SP_BYTE:
            t = TokenType.BYTE
        tokens[i], scores[i], types[i] = piece, score, int(t)
    added_path = model_dir / "added_tokens.json"
    added = read_json(added_path, "", required=False)
    if isinstance(added, dict):
        for text, tid in added.items():
            if isinstance(tid, int) and 0 <= tid < n:
                tokens[tid], scores[tid], types[tid] = text, -1000.0, int(TokenType.USER_DEFINED)
    tc = read_json(model_dir / "tokenizer_config.json", "", required=False)
    if isinstance(tc, dict):
        _retype_added(tokens, scores, types, tc.get("added_tokens_decoder") or {})
    return tokens, scores, types


def _retype_added(tokens: list[str], scores: list[float], types: list[int], decoder: dict) -> None:
    """_create_vocab_sentencepiece's pass over added_tokens_decoder ({id: {content, special}}):
    special or special-looking tokens CONTROL, the others USER_DEFINED (spaces pre-normalized);
    score -1000."""
    n = len(tokens)
    for sid, data in decoder.items():
        tid = int(sid)
        text = _content(data)
        if text is None or tid >= n:
            continue
        if data.get("special") or looks_special(text):
            types[tid] = int(TokenType.CONTROL)
        else:
            text = text.replace(SPACE, " ")  # pre-normalize user-defined spaces
            types[tid] = int(TokenType.USER_DEFINED)
        scores[tid] = -1000.0
        tokens[tid] = text


# SentencePiece vocabularies known by the sha256 of tokenizer.json's model.vocab in id order
# (_vocab_digest), with what their tokenizer.json does not say:
# - "score_gaps": SentencePiece's BPE trainer scores its pieces -(position in its list), so the
#   n-th NORMAL piece scores -n unless the list held other pieces in between: {n: pieces skipped
#   before the n-th NORMAL piece};
# - "not_special": tokens the original tokenizer_config.json marks not special (USER_DEFINED in the
#   GGUF) that transformers 5 marks special when it saves them (the model's named tokens).
# Gemma 3 (one vocabulary for every size): 31 scores are skipped before the piece "▁" (id
# 236743, the 236249-th NORMAL piece); <start_of_image> and <end_of_image> are USER_DEFINED.
KNOWN_SPM_VOCABS: dict[str, dict[str, Any]] = {
    "127134498cd23351bb66343ed90d206c1bba6724970abd5e6300f113b34a1cc2": {"score_gaps": {236249: 31}, "not_special": ("<start_of_image>", "<end_of_image>")},
}


def _vocab_digest(pieces: list[str]) -> str:
    from hashlib import sha256

    return sha256("\0".join(pieces).encode("utf-8", "surrogatepass")).hexdigest()


def _json_added(tok: dict, tc: dict | None) -> dict[str, dict]:
    """{id: {content, special}} of tokenizer.json's added_tokens, then tokenizer_config.json's
    added_tokens_decoder for ids the first lacks (transformers 5 writes only the first)."""
    out: dict[str, dict] = {}
    for a in tok.get("added_tokens") or []:
        if isinstance(a, dict) and isinstance(a.get("content"), str) and isinstance(a.get("id"), int):
            out.setdefault(str(a["id"]), {"content": a["content"], "special": bool(a.get("special"))})
    for sid, data in ((tc or {}).get("added_tokens_decoder") or {}).items():
        if str(sid).isdigit() and _content(data) is not None:
            out.setdefault(str(sid), data)
    return out


def sentencepiece_tokens_from_json(model_dir: Path, vocab_size: int | None) -> tuple[list[str], list[float], list[int]]:
    """What `sentencepiece_tokens` reads from tokenizer.model, rebuilt from the tokenizer.json that
    transformers converted from it (GemmaConverter: a BPE with byte fallback whose merges are every
    split a + b of every piece, ranked by the piece), for folders written by transformers 5 and the
    tools built on it, which keep no tokenizer.model.

    Pieces and ids are tokenizer.json's vocabulary; types BYTE for <0xNN>, UNKNOWN for the BPE's
    unk_token, NORMAL otherwise, then re-typed by the added tokens as `sentencepiece_tokens` does.
    Scores: BYTE and UNKNOWN 0 (SentencePiece's), NORMAL pieces -n for the n-th in id order
    (SentencePiece's BPE trainer; KNOWN_SPM_VOCABS restores the exact values of known
    vocabularies). llama.cpp's SPM tokenizer merges the adjacent pair that makes the best-scored
    piece, the BPE the best-ranked pair: the two agree when the merges are every split of every
    NORMAL piece ranked in id order, which is checked here; a tokenizer.json that is not so is
    refused rather than written as a vocabulary that would tokenize differently."""
    path = model_dir / "tokenizer.json"
    tok = read_json(path, "without tokenizer.model, the Gemma 3 vocabulary is rebuilt from tokenizer.json")
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise GGQuantError(f"{path}: expected a BPE model with byte_fallback = true (transformers' conversion of a "
                           f"SentencePiece model); got model.type = {(model or {}).get('type')!r}, byte_fallback = "
                           f"{(model or {}).get('byte_fallback')!r}. Put the model's tokenizer.model in the folder")
    norm = tok.get("normalizer")
    if norm != {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}:
        raise GGQuantError(f"{path}: normalizer {json.dumps(norm, ensure_ascii=False)[:200]} is not Gemma's "
                           f"Replace(' ', '▁') (no dummy prefix); the vocabulary cannot be rebuilt as the "
                           f"SentencePiece model's. Put the model's tokenizer.model in the folder")
    pre = tok.get("pre_tokenizer")
    if pre not in (None, {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False}):  # splitting at " " after the normalizer is a no-op
        raise GGQuantError(f"{path}: pre_tokenizer {json.dumps(pre, ensure_ascii=False)[:200]} splits the text "
                           f"before BPE, which SentencePiece does not; put the model's tokenizer.model in the folder")
    vocab = model.get("vocab")
    merges = model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise GGQuantError(f"{path}: model.vocab (token -> id) and model.merges are required")
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    n_base = len(vocab)
    if len(by_id) != n_base or set(by_id) != set(range(n_base)):
        raise GGQuantError(f"{path}: model.vocab ids are not 0..{n_base - 1}, each once")
    tc = read_json(model_dir / "tokenizer_config.json", "", required=False)
    added = _json_added(tok, tc if isinstance(tc, dict) else None)
    added_ids = {int(i) for i in added}
    known = KNOWN_SPM_VOCABS.get(_vocab_digest([by_id[i] for i in range(n_base)]), {})
    for data in added.values():
        if _content(data) in known.get("not_special", ()):
            data["special"] = False
    n = vocab_size or n_base
    if n < n_base:
        raise GGQuantError(f"{path}: {n_base} tokens but config.json vocab_size is {n}")

    # the merges must be those of a SentencePiece model: every split of every NORMAL piece,
    # ranked in the pieces' id order
    pairs: set[tuple[str, str]] = set()
    last = -1
    for r, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        pairs.add((a, b))
        t = vocab.get(a + b)
        if t is None:
            raise GGQuantError(f"{path}: merge {r} ({a!r}, {b!r}) makes {a + b!r}, which is not in model.vocab")
        if t in added_ids:
            continue  # split off before BPE, in transformers and in llama.cpp alike
        if t < last:
            raise GGQuantError(
                f"{path}: merge {r} ({a!r}, {b!r}) makes token {t} after merges that make token {last}; the merges "
                f"are not ranked like the pieces of a SentencePiece model, so no SentencePiece vocabulary tokenizes "
                f"like this BPE. Put the model's tokenizer.model in the folder")
        last = t
    unk = model.get("unk_token")
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TokenType.UNUSED)] * n
    for i in range(n_base):
        t = tokens[i] = by_id[i]
        scores[i] = 0.0
        if _BYTE_TOKEN.fullmatch(t):
            types[i] = int(TokenType.BYTE)
        elif t == unk:
            types[i] = int(TokenType.UNKNOWN)
        else:
            types[i] = int(TokenType.NORMAL)
            if i not in added_ids:
                for k in range(1, len(t)):
                    a, b = t[:k], t[k:]  # a character outside the vocabulary is a symbol of llama.cpp's too
                    if (a in vocab or len(a) == 1) and (b in vocab or len(b) == 1) and (a, b) not in pairs:
                        raise GGQuantError(
                            f"{path}: token {i} {t!r} splits into {a!r} + {b!r}, but model.merges "
                            f"lacks that pair; SentencePiece would merge it, this BPE does not. Put the model's "
                            f"tokenizer.model in the folder")
    _retype_added(tokens, scores, types, added)
    normal = [i for i in range(n_base) if types[i] == int(TokenType.NORMAL)]
    gaps = known.get("score_gaps", {})
    skipped = 0
    for rank, i in enumerate(normal):
        skipped += gaps.get(rank, 0)
        scores[i] = -float(rank + skipped)
    return tokens, scores, types


# =============================================================================================
# SpecialVocab
# =============================================================================================


class SpecialVocab:
    """gguf-py SpecialVocab: what tokenizer.json, tokenizer_config.json, the chat template files
    and config.json say about merges, special token ids and BOS/EOS handling."""

    def __init__(self, model_dir: Path, *, load_merges: bool, n_vocab: int | None = None):
        self.dir = model_dir
        self.load_merges = load_merges
        self.n_vocab = n_vocab
        self.types: tuple[str, ...] = SPECIAL_TYPES
        self.merges: list[str] = []
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.chat_template: Any = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self._from_tokenizer_json()
        self._from_config_json()
        if load_merges and not self.merges:
            self._from_merges_txt()

    def _set_id(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise GGQuantError(f"{self.dir}: special token {typ} has invalid id {tid}")
        if self.n_vocab is None or tid < self.n_vocab:
            self.ids.setdefault(typ, tid)

    def _normalizer(self, n: dict) -> None:
        t = n.get("type")
        if t == "Lowercase":
            self.lowercase = True
        elif t == "StripAccents":
            self.strip_accents = True
        elif t == "BertNormalizer":
            if "lowercase" in n:
                self.lowercase = n["lowercase"]
            if "strip_accents" in n:
                self.strip_accents = n["strip_accents"]
        elif t == "Sequence":
            for sub in n.get("normalizers", []):
                self._normalizer(sub)

    def _from_tokenizer_json(self) -> None:
        tpath = self.dir / "tokenizer.json"
        tok = read_json(tpath, "", required=False)
        added_tokens: list = []
        if tok is not None:
            if not isinstance(tok, dict):
                raise GGQuantError(f"{tpath}: must hold a JSON object")
            if self.load_merges:
                merges = (tok.get("model") or {}).get("merges")
                if isinstance(merges, list) and merges:
                    if isinstance(merges[0], str):
                        self.merges = list(merges)
                    elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
                        # transformers >= 4.45 pairs; a space inside a part is stored as U+0120
                        self.merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part)
                                                for part in pair) for pair in merges]
                    else:
                        raise GGQuantError(f"{tpath}: model.merges has an unknown format")
            if norm := tok.get("normalizer"):
                if isinstance(norm, dict):
                    self._normalizer(norm)
            added_tokens = tok.get("added_tokens") or []
        tc = read_json(self.dir / "tokenizer_config.json", "", required=False)
        if tc is not None and not isinstance(tc, dict):
            raise GGQuantError(f"{self.dir / 'tokenizer_config.json'}: must hold a JSON object")
        if tok:
            self._post_processor(tok, tc)
        if not tc:
            return
        self.chat_template = self._chat_template(tc)
        for typ in self.types:
            entry = tc.get(f"add_{typ}_token")
            if isinstance(entry, bool) and typ not in self.add:
                self.add[typ] = entry
            content = _content(tc.get(f"{typ}_token"))
            if content is None:
                continue
            tid = next((a.get("id") for a in added_tokens if isinstance(a, dict) and a.get("content") == content), None)
            self._set_id(typ, tid)

    def _post_processor(self, tok: dict, tc: dict | None) -> None:
        """gguf-py SpecialVocab._try_load_from_tokenizer_json's crude reading of the
        post-processor, including its side effects on the tokenizer_config values."""
        bos = (tc or {}).get("bos_token")
        cls_ = (tc or {}).get("cls_token")
        eos = (tc or {}).get("eos_token")
        sep = (tc or {}).get("sep_token")
        if not bos and cls_ and tc:
            tc["bos_token"] = bos = cls_
        if not eos and sep and tc:
            tc["eos_token"] = eos = sep
        pp = tok.get("post_processor")
        if not pp:
            return
        for proc in pp.get("processors", [pp]):
            ptype = proc.get("type")
            if ptype == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif ptype == "RobertaProcessing":
                self.add["bos"] = self.add["eos"] = self.add["sep"] = True
                if not cls_ and tc:
                    cls_ = proc.get("cls", [bos])[0]
                    tc["cls_token"] = cls_
                if not sep and tc:
                    sep = proc.get("sep", [eos])[0]
                    tc["sep_token"] = sep
            elif ptype == "TemplateProcessing":
                single = proc.get("single", [])
                pair = proc.get("pair", [])
                first = last = None
                if len(single) > 1:
                    if first := single[0].get("SpecialToken", {}).get("id"):
                        if not tc:
                            bos = first
                        elif first not in (bos, cls_):
                            if not bos:
                                tc["bos_token"] = bos = first
                            if not cls_:
                                tc["cls_token"] = cls_ = first
                        self.add["bos"] = first in (bos, cls_)
                    if last := single[-1].get("SpecialToken", {}).get("id"):
                        if not tc:
                            eos = last
                        elif last != eos:
                            if "eot" not in self.types:
                                self.types = self.types + ("eot",)
                                tc["eot_token"] = eos
                            elif "eom" not in self.types:
                                self.types = self.types + ("eom",)
                                tc["eom_token"] = eos
                            tc["eos_token"] = eos = last
                        self.add["eos"] = last == eos
                if pair:
                    start = 1 if first and pair[0].get("SpecialToken", {}).get("id") == first else 0
                    stop = -1 if last and pair[-1].get("SpecialToken", {}).get("id") == last else None
                    pair = pair[start:stop]
                    if pair:
                        a = pair[0].get("Sequence", {}).get("id")
                        b = pair[-1].get("Sequence", {}).get("id")
                        if a == "A" and b == "B" and (pair := pair[1:-1]):
                            add_sep = False
                            if entry := pair[0].get("SpecialToken", {}).get("id"):
                                if entry in (sep, eos) and not last:
                                    add_sep = True
                            if len(pair) == 2:
                                if entry := pair[1].get("SpecialToken", {}).get("id"):
                                    if entry in (sep, eos):
                                        add_sep = True
                            self.add["sep"] = add_sep
                            if add_sep and not sep and tc:
                                tc["sep_token"] = eos

    def _chat_template(self, tc: dict) -> Any:
        """tokenizer_config.json's chat_template wins; else chat_template.jinja (+ the
        additional_chat_templates/*.jinja, as a named list); else chat_template.json."""
        alt: Any = None
        jinja = self.dir / "chat_template.jinja"
        cjson = self.dir / "chat_template.json"
        if jinja.is_file():
            alt = read_text(jinja)
            extra = sorted((self.dir / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}] + [{"name": p.stem, "template": read_text(p)} for p in extra]
        elif cjson.is_file():
            doc = read_json(cjson, "")
            alt = doc.get("chat_template") if isinstance(doc, dict) else None
        tmpl = tc.get("chat_template", alt)
        if tmpl is None or isinstance(tmpl, (str, list)):
            return tmpl
        return None  # gguf-py: "Bad type for chat_template field" - ignored

    def _from_config_json(self) -> None:
        cfg = read_json(self.dir / "config.json", "", required=False)
        if not isinstance(cfg, dict):
            return
        for typ in self.types:
            tid = cfg.get(f"{typ}_token_id")
            if tid is None and isinstance(cfg.get("text_config"), dict):
                tid = cfg["text_config"].get(f"{typ}_token_id")
            self._set_id(typ, tid)

    def _from_merges_txt(self) -> None:
        path = self.dir / "merges.txt"
        if not path.is_file():
            return
        lines = read_text(path).splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        merges = []
        for line in lines:
            parts = line.strip().split(None, 3)
            if len(parts) == 2:
                merges.append(f"{parts[0]} {parts[1]}")
        self.merges = merges

    def write(self, kv: KV) -> None:
        """SpecialVocab.add_to_gguf: merges, ids, add_* flags, chat template, normalizer."""
        if self.merges:
            kv.array(K.MERGES, self.merges)
        for typ, tid in self.ids.items():
            if typ in _ID_KEYS:
                kv.u32(_ID_KEYS[typ], tid)
        for typ, value in self.add.items():
            if typ in _ADD_KEYS:
                kv.bool(_ADD_KEYS[typ], value)
        if self.chat_template is not None:
            write_chat_template(kv, self.chat_template)
        if self.lowercase is not None:
            kv.bool(K.NORMALIZER_LOWERCASE, self.lowercase)
        if self.strip_accents is not None:
            kv.bool(K.NORMALIZER_STRIP_ACCENTS, self.strip_accents)


def write_chat_template(kv: KV, value: Any) -> None:
    """gguf-py GGUFWriter.add_chat_template: a list gives tokenizer.chat_template.<name> keys, the
    tokenizer.chat_templates name list, then the default template. (gguf-py collects the names in
    a set, whose order changes from run to run; ggquant keeps the file's order.)"""
    if isinstance(value, str):
        kv.string(K.CHAT_TEMPLATE, value)
        return
    default = None
    names: list[str] = []
    for choice in value:
        if not isinstance(choice, dict):
            continue
        name = "".join(c if c in ascii_letters + digits else "_" for c in str(choice.get("name", "")))
        template = choice.get("template")
        if name and template is not None:
            if name == "default":
                default = template
            else:
                if name not in names:
                    names.append(name)
                kv.string(K.CHAT_TEMPLATE_N.format(name=name), template)
    if names:
        kv.array(K.CHAT_TEMPLATES, names)
    if default is not None:
        kv.string(K.CHAT_TEMPLATE, default)
