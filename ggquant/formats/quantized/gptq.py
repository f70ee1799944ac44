"""GPTQ (AutoGPTQ / GPTQModel, v1 and v2), AutoRound (its GPTQ- and AWQ-layout exports) and AWQ (gemm).

Facts (shared/research/compressed-tensors-gptq-gguf-mapping.md §3, checked against auto-round
0.15.1/0.16.1 exports on this machine):

GPTQ layout, per Linear P (W [out, in], stored transposed):
  P.qweight I32 [in*bits/32, out]   codes packed along `in` (dim 0): for each output column, one
                                    dense little-endian bit stream (2/4/8 bit: 32/bits codes per
                                    word; 3/5/6/7 bit: codes straddle words, e.g. 3-bit's 10+1+10+1+10)
  P.qzeros  I32 [G, out*bits/32]    zero points packed along `out` (dim 1), same bit order
  P.scales  F16 [G, out]
  P.g_idx   I32 [in] (optional)     group of each input row; trivial = i // group_size
  W[o, i] = scales[g, o] * (q[i, o] - z[g, o]),  g = g_idx[i]
Zero points: v1 (AutoGPTQ; quant_method gptq with format/checkpoint_format "gptq" or absent;
AutoRound "auto_round:auto_gptq") stores z - 1, v2 ("gptq_v2", AutoRound "auto_round" and
"auto_round:gptqmodel") stores z. v1 words were made arithmetically (sum of (z_j - 1) << bits*j),
so a zero point of 0 borrows from the next field: for 2/4/8 bit the whole word is corrected by
adding sum(1 << bits*j) with wrap-around. Bit-stream widths (3/5/6/7) are corrected per field
modulo 2^bits, which is how auto-round's bit-stream packer masks them.
auto-round 0.15.x model-free asymmetric exports write z - 1 but label them "auto_round" (v2):
detected by model_free + autoround_version 0.15.x + sym false, and read as v1.

AWQ (gemm) layout: P.qweight I32 [in, out*bits/32] and P.qzeros I32 [G, out*bits/32], both packed
along `out` as a bit stream whose 8-value groups are interleaved: stored slot s of a group holds
logical column [0, 2, 4, 6, 1, 3, 5, 7][s]; P.scales F16 [G, out]; zero points stored as-is.
Symmetric AWQ (`zero_point: false`, auto-round's AWQ export with sym=True) keeps the same
tensors, qzeros all 2^(bits-1) (auto-round export_to_awq pack: a scalar zero point tiled).
"""

from __future__ import annotations

import re

import numpy as np

from ggquant.errors import FormatError, GGQuantError
from ggquant.formats.quantized import reader
from ggquant.formats.quantized.records import IntCodes, IntQuantTensor, QuantizedModel, Source, unpack_stream

__all__ = ["read", "AWQ_PACK_ORDER"]

# AWQ: stored slot s of each group of 8 holds logical position AWQ_PACK_ORDER[s].
AWQ_PACK_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
_AWQ_LOGICAL_FROM_SLOT = np.argsort(AWQ_PACK_ORDER)  # logical p lives in slot _AWQ_LOGICAL_FROM_SLOT[p]

_GPTQ_FORMATS = {None: "v1", "gptq": "v1", "gptq_v2": "v2"}
_AUTOROUND_PACKING = {
    "auto_round": ("gptq", "v2"),
    "auto_round:gptqmodel": ("gptq", "v2"),
    "auto_round:auto_gptq": ("gptq", "v1"),
    "auto_round:auto_awq": ("awq", "v2"),
}


class _Scheme:
    def __init__(self, bits: int, group_size: int, sym: bool, where: str):
        self.bits, self.group_size, self.sym = int(bits), int(group_size), bool(sym)
        if not 2 <= self.bits <= 8:
            raise GGQuantError(f"{where}: {self.bits}-bit weights are not supported (2..8)")


def _fullmatch_or_match(pattern: str, name: str) -> bool:
    return re.match(pattern, name) is not None


@reader("gptq", "auto-round", "awq")
def read(config: dict, src: Source, method: str) -> QuantizedModel:
    qc = config["quantization_config"]
    notes: list[str] = []
    layout, zeros = "gptq", "v1"
    if method == "gptq":
        fmt = qc.get("format", qc.get("checkpoint_format"))
        if fmt not in _GPTQ_FORMATS:
            raise GGQuantError(f"GPTQ checkpoint format {fmt!r} is not supported; supported: gptq (v1), gptq_v2. "
                               f"Marlin/BitBLAS/other repacked layouts must be converted back first")
        zeros = _GPTQ_FORMATS[fmt]
        desc = f"GPTQ {zeros}"
    elif method == "auto-round":
        data_type = str(qc.get("data_type", "int"))
        if data_type != "int":
            raise GGQuantError(f"AutoRound data_type {data_type!r} is not supported (int only)")
        packing = qc.get("packing_format", "auto_round")
        if packing not in _AUTOROUND_PACKING:
            raise GGQuantError(f"AutoRound packing_format {packing!r} is not supported; supported: "
                               f"{', '.join(_AUTOROUND_PACKING)}")
        layout, zeros = _AUTOROUND_PACKING[packing]
        version = str(qc.get("autoround_version", ""))
        if (packing == "auto_round" and qc.get("model_free") and version.startswith("0.15")
                and not qc.get("sym", True)):
            zeros = "v1"
            notes.append(f"auto-round {version} model-free asymmetric export: its zero points are stored minus one "
                         f"although labelled 'auto_round'; read as GPTQ v1 (fixed in auto-round 0.16)")
        desc = f"AutoRound {packing}"
    elif method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise GGQuantError(f"AWQ version {version!r} is not supported (gemm only)")
        layout, zeros = "awq", "v2"
        desc = "AWQ gemm"
    else:
        raise AssertionError(method)

    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    gs = int(qc.get("group_size", qc.get("q_group_size", 128)))
    sym = bool(qc.get("sym", True))
    if method == "awq":
        # zero_point: false (auto-round's symmetric AWQ export) still stores qzeros: every one
        # 2^(bits-1), which the dequantization subtracts like any other zero point
        sym = not qc.get("zero_point", True)
    base = _Scheme(bits, gs, sym, f"{method} quantization_config")
    dynamic = qc.get("dynamic") or {}
    extra = qc.get("extra_config") or {}
    skip = list(qc.get("modules_to_not_convert") or [])

    tensors = {}
    consumed: set[str] = set()
    for name in src.names:
        if not name.endswith(".qweight"):
            continue
        mod = name[: -len(".qweight")]
        scheme = _scheme_for(mod, base, dynamic, extra, skip, desc)
        rec = (_awq_record if layout == "awq" else _gptq_record)(mod, scheme, src, zeros, desc)
        # auto-round's model-free export pads the input width with zeros to a multiple of the
        # group size (model_free_utils.quantize_weight_rtn) and records no true width: the
        # converter crops to config.json's shape (IntQuantTensor.cropped)
        rec.padded = bool(qc.get("model_free")) and layout == "gptq" and scheme.group_size > 0
        tensors[rec.name] = rec
        consumed.update(rec.sources)
    desc_full = f"{desc} int{bits} {'sym' if sym else 'asym'} group{gs}"
    return QuantizedModel(method, desc_full, tensors, frozenset(consumed), notes, dict(qc))


def _scheme_for(mod: str, base: _Scheme, dynamic: dict, extra: dict, skip: list, desc: str) -> _Scheme:
    where = f"module '{mod}' ({desc})"
    for s in skip:
        if s and (mod == s or mod.startswith(s + ".") or mod.endswith("." + s) or f".{s}." in f".{mod}."):
            raise FormatError(f"{where}: has a qweight but matches modules_to_not_convert entry {s!r}")
    # GPTQModel `dynamic`: {"+:regex" or "regex": overrides, "-:regex": skip}, first match wins.
    for pattern, over in dynamic.items():
        neg = pattern.startswith("-:")
        pat = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
        if _fullmatch_or_match(pat, mod):
            if neg:
                raise FormatError(f"{where}: has a qweight but matches the skip rule {pattern!r}")
            over = over or {}
            return _Scheme(over.get("bits", base.bits), over.get("group_size", base.group_size),
                           over.get("sym", base.sym), where)
    # AutoRound extra_config: {layer name or regex: {bits, group_size, sym, data_type}}.
    for key, over in extra.items():
        if key == mod or (not key.startswith(("model.", "lm_head")) and _fullmatch_or_match(key, mod)):
            over = over or {}
            if int(over.get("bits", base.bits)) >= 16 or str(over.get("data_type", "int")) not in ("int",):
                raise FormatError(f"{where}: extra_config {key!r} says {over} but the module has a qweight")
            return _Scheme(over.get("bits", base.bits), over.get("group_size", base.group_size),
                           over.get("sym", base.sym), where)
    return base


def _fix_v1_words(words: np.ndarray, bits: int) -> np.ndarray:
    """Add one to every packed zero point of whole-field words (2/4/8 bit), with wrap-around."""
    c = sum(1 << (bits * j) for j in range(32 // bits))
    w = np.ascontiguousarray(words).view(np.uint32).astype(np.uint64)
    return ((w + c) & 0xFFFFFFFF).astype(np.uint32)


def _zeros(qzeros: np.ndarray, bits: int, out: int, zeros: str) -> np.ndarray:
    """Packed zero points [G, words] -> int16 [G, out] (v1 corrected)."""
    mask = (1 << bits) - 1
    if zeros == "v1" and 32 % bits == 0:
        qzeros = _fix_v1_words(qzeros, bits)
    z = unpack_stream(qzeros, bits, out).astype(np.int16)
    if zeros == "v1" and 32 % bits:
        z = (z + 1) & mask
    return z


def _group_map(g_idx, n: int, groups: int, gs: int, where: str):
    """(column -> group, contiguous group size or None, act-order flag)."""
    trivial_gs = n if gs <= 0 else gs
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.intp).reshape(-1)
        if g_idx.shape != (n,) or g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= groups:
            raise FormatError(f"{where}: g_idx must hold {n} group indices in [0, {groups})")
        if np.array_equal(g_idx, np.arange(n) // trivial_gs):
            return g_idx, trivial_gs, False
        return g_idx, None, True
    want = -(-n // trivial_gs)
    if want != groups:
        raise FormatError(f"{where}: {groups} scale groups, but {n} columns in groups of {trivial_gs} need {want}")
    return np.arange(n) // trivial_gs, trivial_gs, False


def _encoding(desc: str, s: _Scheme, act_order: bool) -> str:
    g = "channel" if s.group_size <= 0 else f"group{s.group_size}"
    return f"{desc} int{s.bits} {'sym' if s.sym else 'asym'} {g}" + (" act-order g_idx" if act_order else "")


def _gptq_record(mod: str, s: _Scheme, src: Source, zeros: str, desc: str) -> IntQuantTensor:
    where = f"module '{mod}' ({desc} int{s.bits})"
    names = {k: f"{mod}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")}
    for k in ("qzeros", "scales"):
        if names[k] not in src:
            raise FormatError(f"{where}: tensor '{names[k]}' is missing")
    qshape, zshape, sshape = src.shape(names["qweight"]), src.shape(names["qzeros"]), src.shape(names["scales"])
    if len(qshape) != 2 or len(sshape) != 2 or len(zshape) != 2:
        raise FormatError(f"{where}: qweight/qzeros/scales must be 2-D")
    out = sshape[1]
    if qshape[1] != out or (qshape[0] * 32) % s.bits:
        raise FormatError(f"{where}: qweight has shape {list(qshape)}; with scales {list(sshape)} expected "
                          f"[in*{s.bits}/32, {out}] (is bits={s.bits} right?)")
    n = qshape[0] * 32 // s.bits
    groups = sshape[0]
    if zshape != (groups, -(-out * s.bits // 32)):
        raise FormatError(f"{where}: qzeros has shape {list(zshape)}, expected [{groups}, {-(-out * s.bits // 32)}]")
    g_idx = src.ints(names["g_idx"], allowed=("I32", "I64")) if names["g_idx"] in src else None
    group, gs, act_order = _group_map(g_idx, n, groups, s.group_size, where)
    sources = [names["qweight"], names["qzeros"], names["scales"]] + ([names["g_idx"]] if g_idx is not None else [])

    def load(rr) -> IntCodes:
        a, b = rr
        words = src.ints(names["qweight"])[:, a:b]
        q = unpack_stream(np.ascontiguousarray(words.T), s.bits, n).astype(np.int16)
        z = _zeros(src.ints(names["qzeros"]), s.bits, out, zeros)[:, a:b].T
        scale = src.floats(names["scales"])[:, a:b].T
        return IntCodes(q, np.ascontiguousarray(scale), np.ascontiguousarray(z), group, gs)

    half = 1 << (s.bits - 1)
    qr = (-half, half - 1) if s.sym else (-(2 * half - 1), 2 * half - 1)
    return IntQuantTensor(f"{mod}.weight", (out, n), _encoding(desc, s, act_order), "gptq", tuple(sources),
                          s.bits, s.sym, load, gs, act_order, qr)


def _awq_record(mod: str, s: _Scheme, src: Source, zeros: str, desc: str) -> IntQuantTensor:
    where = f"module '{mod}' ({desc} int{s.bits})"
    names = {k: f"{mod}.{k}" for k in ("qweight", "qzeros", "scales")}
    for k in ("qzeros", "scales"):
        if names[k] not in src:
            raise FormatError(f"{where}: tensor '{names[k]}' is missing")
    qshape, zshape, sshape = src.shape(names["qweight"]), src.shape(names["qzeros"]), src.shape(names["scales"])
    n, out = qshape[0], sshape[1]
    groups = sshape[0]
    words = out * s.bits // 32
    if out % 8 or (out * s.bits) % 32 or qshape[1] != words or tuple(zshape) != (groups, words):
        raise FormatError(f"{where}: qweight {list(qshape)} / qzeros {list(zshape)} / scales {list(sshape)} do not "
                          f"match the AWQ layout [in, out*{s.bits}/32] with out a multiple of 8")
    group, gs, _ = _group_map(None, n, groups, s.group_size, where)
    logical = (np.arange(out) // 8) * 8 + _AWQ_LOGICAL_FROM_SLOT[np.arange(out) % 8]

    def unpack(packed: np.ndarray) -> np.ndarray:
        return unpack_stream(packed, s.bits, out)[:, logical]  # stored slot order -> logical columns

    def load(rr) -> IntCodes:
        a, b = rr
        q = unpack(src.ints(names["qweight"]))[:, a:b].T.astype(np.int16)
        z = unpack(src.ints(names["qzeros"]))[:, a:b].T.astype(np.int16)
        scale = src.floats(names["scales"])[:, a:b].T
        return IntCodes(np.ascontiguousarray(q), np.ascontiguousarray(scale), np.ascontiguousarray(z), group, gs)

    half = 1 << (s.bits - 1)
    return IntQuantTensor(f"{mod}.weight", (out, n), _encoding(desc, s, False), "awq",
                          (names["qweight"], names["qzeros"], names["scales"]), s.bits, s.sym, load, gs, False,
                          (-half, half - 1) if s.sym else (-(2 * half - 1), 2 * half - 1))
