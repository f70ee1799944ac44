"""compressed-tensors checkpoints (llmcompressor, vLLM's format): pack-, int-, naive-, float- and
nvfp4-pack-quantized.

Facts (shared/research/compressed-tensors-gptq-gguf-mapping.md §1-2, checked against
compressed-tensors 0.17-0.20 on this machine):

config.json quantization_config: quant_method "compressed-tensors", format (model-wide, or
"mixed-precision" when groups differ: then each group's own "format"), config_groups
{name: {targets, weights: QuantizationArgs, input_activations, format}}, ignore [names or "re:"],
transform_config / sparsity_config (must be empty here), version, kv_cache_scheme.
QuantizationArgs: num_bits, type int|float, symmetric, strategy tensor|channel|group|block
(inferred from group_size when absent: None -> tensor, -1 -> channel, > 0 -> group), group_size,
block_structure, actorder ("group"/"dynamic" store weight_g_idx; ct >= 0.19 refuses those
configs, so ggquant reads them itself). ct 0.20 omits null fields: a missing field is its default.

Tensors per quantized module P (weight W [out, in]):
  pack-quantized   P.weight_packed I32 [out, words]: unsigned codes u = q + 2^(nb-1), packed along
                   `in` either as one dense little-endian bit stream per row (ct >= 0.18,
                   words = ceil(in*nb/32)) or 32//nb codes per word (ct <= 0.17, words =
                   ceil(in/(32//nb))); identical for nb in {1,2,4,8}; the width tells them apart.
                   P.weight_shape I64 [2] = [out, in]. P.weight_scale [out, G] | [out, 1] | [1].
                   P.weight_zero_point I32 packed the same way along `out` ([words(out), G]),
                   asym group/channel only (tensor-strategy zero points stay unpacked int8).
                   P.weight_g_idx I32 [in] (act-order, ct <= 0.18): group of each input column.
  int-/naive-quantized  P.weight I8 [out, in] signed q; P.weight_zero_point I8 like the scale.
  float-quantized  P.weight F8_E4M3 [out, in]; P.weight_scale [out, 1] | [1] | block
                   [ceil(out/b0), ceil(in/b1)] for block_structure [b0, b1].
  nvfp4-pack-quantized  P.weight_packed U8 [out, in/2] fp4 e2m1 codes, P.weight_scale F8_E4M3
                   [out, in/16], P.weight_global_scale F32 [1] (+ P.input_global_scale with static
                   activations): w = e2m1 * (fp8 / global), see records.NVFP4Tensor.
Dequantization: w = (q - zp) * s (s, zp of column c's group, or of group g_idx[c]); the library
computes it in the scale dtype (one more rounding); ggquant computes it in float32, where the
product is exact.
"""

from __future__ import annotations

import re

import numpy as np

from ggquant.errors import FormatError, GGQuantError
from ggquant.formats.quantized import reader
from ggquant.formats.quantized.records import (
    FP8_E4M3_TO_F32, NVFP4_GROUP, FloatQuantTensor, IntCodes, IntQuantTensor, NVFP4Tensor, QuantizedModel,
    QuantizedTensor, Source, nvfp4_shape,
    unpack_per_word, unpack_stream,
)

__all__ = ["read", "FP8_E4M3_TO_F32", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized", "nvfp4-pack-quantized")
NVFP4 = "nvfp4-pack-quantized"
# Formats compressed-tensors writes that ggquant recognises but does not read (yet).
_REFUSED_FORMATS = {
    "mxfp4-pack-quantized": "MXFP4",
    "mxfp6-pack-quantized": "MXFP6",
    "mxfp8-quantized": "MXFP8",
    "marlin-24": "2:4 sparse Marlin",
    "sparse-24-bitmask": "2:4 sparse bitmask",
    "sparse-bitmask": "sparse bitmask",
}
# Per-module tensors that describe activations or the KV cache: GGUF has no place for them.
_ACTIVATION_SUFFIXES = ("input_scale", "input_zero_point", "input_global_scale", "output_scale",
                        "output_zero_point", "weight_global_scale")




def _version(s) -> tuple[int, ...] | None:
    if not s:
        return None
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(s))
    return tuple(int(x or 0) for x in m.groups()) if m else None


class _Args:
    """QuantizationArgs for weights, with compressed-tensors' defaults and strategy inference."""

    def __init__(self, d: dict, where: str):
        self.num_bits = int(d.get("num_bits", 8))
        self.type = str(d.get("type", "int"))
        self.symmetric = bool(d.get("symmetric", True))
        self.group_size = d.get("group_size")
        self.block_structure = d.get("block_structure")
        self.dynamic = d.get("dynamic", False)
        actorder = d.get("actorder")
        self.actorder = "group" if actorder is True else actorder
        strategy = d.get("strategy")
        if strategy is None:
            if self.block_structure is not None:
                strategy = "block"
            elif self.group_size is None:
                strategy = "tensor"
            elif int(self.group_size) == -1:
                strategy = "channel"
            elif int(self.group_size) > 0:
                strategy = "group"
            else:
                raise GGQuantError(f"{where}: group_size {self.group_size} is not valid")
        self.strategy = str(strategy)
        if self.type not in ("int", "float"):
            raise GGQuantError(f"{where}: weight type {self.type!r} is not supported (int or float)")
        if self.type == "int" and not 1 <= self.num_bits <= 8:
            raise GGQuantError(f"{where}: int{self.num_bits} weights are not supported (1..8 bits)")
        if self.type == "float" and self.num_bits not in (4, 8):
            raise GGQuantError(f"{where}: float{self.num_bits} weights are not supported (FP8 e4m3, or FP4 e2m1 "
                               f"in the nvfp4-pack-quantized format)")
        if self.dynamic not in (False, None, "false"):
            raise GGQuantError(f"{where}: dynamic weight quantization ({self.dynamic!r}) has no stored scales")
        if self.strategy not in ("tensor", "channel", "group", "block", "tensor_group"):
            raise GGQuantError(f"{where}: weight strategy {self.strategy!r} is not supported "
                               f"(tensor, channel, group, block, tensor_group)")
        if self.strategy == "group" and (self.group_size is None or int(self.group_size) <= 0):
            raise GGQuantError(f"{where}: group strategy without a positive group_size")
        if self.strategy == "block" and (not self.block_structure or len(self.block_structure) != 2):
            raise GGQuantError(f"{where}: block strategy needs block_structure [rows, cols]")
        if self.type == "float" and not self.symmetric:
            raise GGQuantError(f"{where}: asymmetric float weights are not supported")

    def describe(self) -> str:
        kind = f"int{self.num_bits}" if self.type == "int" else ("fp8-e4m3" if self.num_bits == 8 else "fp4-e2m1")
        sym = "sym" if self.symmetric else "asym"
        if self.strategy in ("group", "tensor_group"):
            strat = f"{self.strategy.replace('_', '-')}{int(self.group_size)}"
        elif self.strategy == "block":
            strat = f"block{self.block_structure[0]}x{self.block_structure[1]}"
        else:
            strat = self.strategy
        return f"{kind} {sym} {strat}"


class _Group:
    def __init__(self, name: str, d: dict, top_format: str | None):
        self.name = name
        self.targets = list(d.get("targets") or [])
        fmt = d.get("format") or top_format
        if fmt in (None, "mixed-precision"):
            raise GGQuantError(f"compressed-tensors config group {name!r} has no format "
                               f"(top-level format is {top_format!r})")
        self.format = str(fmt)
        self.weights = _Args(d["weights"], f"compressed-tensors config group {name!r}") if d.get("weights") else None
        self.input_activations = d.get("input_activations")


def _matches(target: str, module: str) -> int:
    """Match strength of a target/ignore entry: 3 exact name, 2 regex, 1 class name, 0 none."""
    if target.startswith("re:"):
        return 2 if re.match(target[3:], module) else 0
    if target == module:
        return 3
    # A bare identifier without dots that is not a module path is a class name ("Linear"):
    # from safetensors alone every quantized module may be one.
    if "." not in target and target[:1].isupper():
        return 1
    return 0


def _unpack(words: np.ndarray, bits: int, n: int, legacy: bool) -> np.ndarray:
    return unpack_per_word(words, bits, n) if legacy else unpack_stream(words, bits, n)


@reader("compressed-tensors")
def read(config: dict, src: Source, method: str) -> QuantizedModel:
    qc = config["quantization_config"]
    version = _version(qc.get("version"))
    for key in ("transform_config", "sparsity_config"):
        if qc.get(key):
            raise GGQuantError(f"compressed-tensors {key} is not empty ({sorted(qc[key])}): transforms and "
                               f"sparsity change the weights' meaning and are not supported")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise GGQuantError(f"compressed-tensors quantization_status is {status!r}; only 'compressed' "
                           f"checkpoints store quantized weights")
    top_format = qc.get("format")
    if top_format in _REFUSED_FORMATS:
        raise GGQuantError(f"compressed-tensors format {top_format!r} ({_REFUSED_FORMATS[top_format]}) is not "
                           f"supported; supported: {', '.join(SUPPORTED_FORMATS)}")
    if top_format not in (None, "mixed-precision", "dense") and top_format not in SUPPORTED_FORMATS:
        raise GGQuantError(f"compressed-tensors format {top_format!r} is not known to ggquant; "
                           f"supported: {', '.join(SUPPORTED_FORMATS)}")
    groups = []
    for gname, gd in (qc.get("config_groups") or {}).items():
        g = _Group(gname, gd, top_format)
        if g.weights is None:
            continue
        if g.format in _REFUSED_FORMATS:
            raise GGQuantError(f"compressed-tensors config group {gname!r}: format {g.format!r} "
                               f"({_REFUSED_FORMATS[g.format]}) is not supported")
        if g.format == "dense":
            continue
        if g.format not in SUPPORTED_FORMATS:
            raise GGQuantError(f"compressed-tensors config group {gname!r}: format {g.format!r} is not known "
                               f"to ggquant; supported: {', '.join(SUPPORTED_FORMATS)}")
        if g.format == "pack-quantized" and g.weights.type != "int":
            raise GGQuantError(f"compressed-tensors config group {gname!r}: pack-quantized {g.weights.type} weights")
        w = g.weights
        is_nvfp4 = (w.type, w.num_bits, w.strategy, w.symmetric) == ("float", 4, "tensor_group", True) and \
            int(w.group_size or 0) == NVFP4_GROUP
        if (g.format == NVFP4) != is_nvfp4:
            raise GGQuantError(f"compressed-tensors config group {gname!r}: format {g.format!r} with {w.describe()} "
                               f"weights; NVFP4 is nvfp4-pack-quantized with fp4 e2m1 sym tensor-group16 weights")
        groups.append(g)
    ignore = list(qc.get("ignore") or [])

    # Quantized modules, from the tensors present (compressed-tensors' own rule).
    modules: list[str] = []
    for name in src.names:
        if name.endswith(".weight_packed"):
            modules.append(name[: -len(".weight_packed")])
        elif name.endswith(".weight_scale") and f"{name[: -len('.weight_scale')]}.weight_packed" not in src:
            modules.append(name[: -len(".weight_scale")])

    tensors: dict[str, QuantizedTensor] = {}
    consumed: set[str] = set()
    notes: list[str] = []
    act_notes: set[str] = set()
    for mod in modules:
        for ig in ignore:
            if _matches(ig, mod) >= 2:
                raise FormatError(f"module '{mod}' has quantized tensors but matches ignore entry {ig!r}")
        g = _group_for(mod, groups)
        rec = _record(mod, g, src, version)
        tensors[rec.name] = rec
        consumed.update(rec.sources)
        for suf in _ACTIVATION_SUFFIXES:
            if f"{mod}.{suf}" in src and f"{mod}.{suf}" not in rec.sources:
                consumed.add(f"{mod}.{suf}")
                act_notes.add(suf)
    if act_notes:
        notes.append(f"activation quantization parameters ({', '.join(sorted(act_notes))}) are dropped: "
                     f"GGUF runs with float activations")
    if qc.get("kv_cache_scheme"):
        kv = [n for n in src.names if n.endswith((".k_scale", ".v_scale", ".k_zero_point", ".v_zero_point"))]
        consumed.update(kv)
        notes.append(f"kv_cache_scheme is ignored ({len(kv)} KV-cache scale tensors dropped); "
                     f"llama.cpp chooses its own KV-cache type")
    descs = sorted({f"{g.format} {g.weights.describe()}" for g in groups})
    desc = "compressed-tensors " + "; ".join(descs) + (f" (v{qc['version']})" if qc.get("version") else "")
    return QuantizedModel("compressed-tensors", desc, tensors, frozenset(consumed), notes, dict(qc))


def _group_for(mod: str, groups: list[_Group]) -> _Group:
    best, found = 0, []
    for g in groups:
        s = max((_matches(t, mod) for t in g.targets), default=0)
        if s > best:
            best, found = s, [g]
        elif s == best and s > 0:
            found.append(g)
    if not found:
        raise FormatError(f"module '{mod}' has quantized tensors but no compressed-tensors config group targets it "
                          f"(groups: {', '.join(g.name for g in groups) or 'none'})")
    if len(found) > 1:
        descs = {(g.format, g.weights.describe()) for g in found}
        if len(descs) > 1:
            raise FormatError(f"module '{mod}' is targeted by config groups {', '.join(g.name for g in found)} "
                              f"with different schemes; ggquant cannot tell which one wrote it")
    return found[0]


def _record(mod: str, g: _Group, src: Source, version) -> QuantizedTensor:
    a = g.weights
    where = f"module '{mod}' (config group {g.name!r}, {g.format} {a.describe()})"
    if g.format == "pack-quantized":
        return _packed_record(mod, g, src, version, where)
    if g.format == NVFP4:
        return _nvfp4_record(mod, src, where)
    if a.type == "float":
        return _float_record(mod, g, src, where)
    return _int_record(mod, g, src, where)


def _scale_layout(a: _Args, scale_shape, out: int, n: int, where: str) -> int:
    """Number of scale groups along `in` (validated against the strategy)."""
    if a.strategy == "tensor":
        if int(np.prod(scale_shape)) != 1:
            raise FormatError(f"{where}: tensor-strategy weight_scale has shape {list(scale_shape)}, expected [1]")
        return 1
    if len(scale_shape) != 2 or scale_shape[0] != out:
        raise FormatError(f"{where}: weight_scale has shape {list(scale_shape)}, expected [{out}, groups]")
    if a.strategy == "channel":
        if scale_shape[1] != 1:
            raise FormatError(f"{where}: channel-strategy weight_scale has shape {list(scale_shape)}, expected [{out}, 1]")
        return 1
    gs = int(a.group_size)
    want = -(-n // gs)
    if scale_shape[1] != want:
        raise FormatError(f"{where}: weight_scale has {scale_shape[1]} groups; {n} columns in groups of {gs} need {want}")
    return want


def _group_map(a: _Args, n: int, g_idx: np.ndarray | None, groups: int, where: str):
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.intp).reshape(-1)
        if g_idx.shape != (n,) or g_idx.min(initial=0) < 0 or g_idx.max(initial=0) >= groups:
            raise FormatError(f"{where}: weight_g_idx must hold {n} group indices in [0, {groups})")
        trivial = a.strategy == "group" and np.array_equal(g_idx, np.arange(n) // int(a.group_size))
        if trivial:
            return np.arange(n) // int(a.group_size), int(a.group_size), False
        return g_idx, None, True
    if a.strategy == "group":
        gs = int(a.group_size)
        return np.minimum(np.arange(n) // gs, groups - 1), gs, False
    return np.zeros(n, dtype=np.intp), n, False


def _scale_rows(src: Source, name: str, a: _Args, rr, out: int) -> np.ndarray:
    """float32 [rows, G] scales of output rows rr (tensor strategy: the one scale broadcast)."""
    if a.strategy == "tensor":
        s = src.floats(name).reshape(1, 1)
        return np.broadcast_to(s, (rr[1] - rr[0], 1))
    return src.floats(name, rr)


def _packed_record(mod: str, g: _Group, src: Source, version, where: str) -> QuantizedTensor:
    a = g.weights
    nb = a.num_bits
    packed_name, scale_name = f"{mod}.weight_packed", f"{mod}.weight_scale"
    shape_name, zp_name, gidx_name = f"{mod}.weight_shape", f"{mod}.weight_zero_point", f"{mod}.weight_g_idx"
    for need in (scale_name, shape_name):
        if need not in src:
            raise FormatError(f"{where}: tensor '{need}' is missing")
    shp = src.ints(shape_name, allowed=("I64", "I32")).reshape(-1)
    if shp.size != 2:
        raise FormatError(f"{where}: weight_shape {shp.tolist()} is not [out, in]; only 2-D weights are supported")
    out, n = int(shp[0]), int(shp[1])
    pshape = src.shape(packed_name)
    if len(pshape) != 2 or pshape[0] != out:
        raise FormatError(f"{where}: weight_packed has shape {list(pshape)}, expected [{out}, words]")
    legacy = _layout(pshape[1], n, nb, version, where, "weight_packed")
    groups = _scale_layout(a, src.shape(scale_name), out, n, where)
    sources = [packed_name, scale_name, shape_name]
    zp_packed = None
    if not a.symmetric:
        if zp_name not in src:
            raise FormatError(f"{where}: asymmetric scheme but '{zp_name}' is missing")
        sources.append(zp_name)
        zp_packed = src.dtype(zp_name) == "I32" and a.strategy in ("group", "channel")
        if zp_packed:
            zshape = src.shape(zp_name)
            if len(zshape) != 2 or zshape[1] != groups:
                raise FormatError(f"{where}: weight_zero_point has shape {list(zshape)}, expected [words, {groups}]")
            zp_legacy = _layout(zshape[0], out, nb, version, where, "weight_zero_point", legacy)
    g_idx = None
    if gidx_name in src:
        g_idx = src.ints(gidx_name, allowed=("I32", "I64"))
        sources.append(gidx_name)
    elif a.actorder in ("group", "dynamic"):
        raise FormatError(f"{where}: actorder {a.actorder!r} but '{gidx_name}' is missing")
    group, gs, act_order = _group_map(a, n, g_idx, groups, where)
    offset = 1 << (nb - 1)

    def load(rr) -> IntCodes:
        words = src.ints(packed_name, rr)
        q = _unpack(words, nb, n, legacy).astype(np.int16) - offset
        scale = _scale_rows(src, scale_name, a, rr, out)
        zero = None
        if not a.symmetric:
            if zp_packed:
                zw = src.ints(zp_name)
                zero = _unpack(zw.T, nb, out, zp_legacy).T[rr[0]:rr[1]].astype(np.int16) - offset
            else:
                z = np.asarray(src.raw(zp_name)[0]).astype(np.int16)
                zero = np.broadcast_to(z.reshape(1, -1) if z.size == 1 else z[rr[0]:rr[1]],
                                       (rr[1] - rr[0], groups)).copy()
        return IntCodes(q, np.ascontiguousarray(scale, dtype=np.float32), zero, group, gs)

    enc = f"compressed-tensors pack-quantized {a.describe()}"
    if act_order:
        enc += " act-order g_idx"
    if legacy and nb not in (1, 2, 4, 8):
        enc += " (legacy per-word packing, ct <= 0.17)"
    qr = (-offset, offset - 1) if a.symmetric else (-(2 * offset - 1), 2 * offset - 1)
    return IntQuantTensor(f"{mod}.weight", (out, n), enc, "compressed-tensors/pack-quantized", tuple(sources),
                          nb, a.symmetric, load, gs, act_order, qr)


def _layout(words: int, n: int, nb: int, version, where: str, what: str, hint: bool | None = None) -> bool:
    """True for the legacy per-word packing, False for the dense stream (decided by the width)."""
    dense = -(-n * nb // 32)
    legacy = -(-n // (32 // nb))
    if dense == legacy:
        if words != dense:
            raise FormatError(f"{where}: {what} has {words} words per row; {n} codes of {nb} bits need {dense}")
        if nb in (1, 2, 4, 8):
            return False
        # Same width, different bit order (only for very short rows): the file's version decides.
        if hint is not None:
            return hint
        if version is None:
            raise FormatError(f"{where}: {what} width {words} fits both the dense (ct >= 0.18) and the legacy "
                              f"(ct <= 0.17) {nb}-bit packing and config.json has no version to tell them apart")
        return version < (0, 18)
    if words == dense:
        return False
    if words == legacy:
        return True
    raise FormatError(f"{where}: {what} has {words} words per row; {n} codes of {nb} bits need {dense} "
                      f"(dense, ct >= 0.18) or {legacy} (per-word, ct <= 0.17)")


def _int_record(mod: str, g: _Group, src: Source, where: str) -> QuantizedTensor:
    a = g.weights
    w_name, scale_name, zp_name, gidx_name = (f"{mod}.weight", f"{mod}.weight_scale", f"{mod}.weight_zero_point",
                                              f"{mod}.weight_g_idx")
    if w_name not in src:
        raise FormatError(f"{where}: tensor '{w_name}' is missing")
    wshape = src.shape(w_name)
    if len(wshape) != 2:
        raise FormatError(f"{where}: weight has shape {list(wshape)}; only 2-D weights are supported")
    if src.dtype(w_name) not in ("I8",):
        raise FormatError(f"{where}: weight has dtype {src.dtype(w_name)}, expected I8 for {g.format}")
    if a.strategy == "block":
        raise GGQuantError(f"{where}: block-strategy integer weights are not supported")
    out, n = wshape
    groups = _scale_layout(a, src.shape(scale_name), out, n, where)
    sources = [w_name, scale_name]
    if not a.symmetric:
        if zp_name not in src:
            raise FormatError(f"{where}: asymmetric scheme but '{zp_name}' is missing")
        sources.append(zp_name)
    g_idx = None
    if gidx_name in src:
        g_idx = src.ints(gidx_name, allowed=("I32", "I64"))
        sources.append(gidx_name)
    group, gs, act_order = _group_map(a, n, g_idx, groups, where)
    lo, hi = -(1 << (a.num_bits - 1)), (1 << (a.num_bits - 1)) - 1

    def load(rr) -> IntCodes:
        q = src.ints(w_name, rr, allowed=("I8",)).astype(np.int16)
        scale = _scale_rows(src, scale_name, a, rr, out)
        zero = None
        if not a.symmetric:
            if a.strategy == "tensor":
                zero = np.broadcast_to(src.ints(zp_name, allowed=("I8", "I32")).reshape(1, 1),
                                       (rr[1] - rr[0], 1)).astype(np.int16)
            else:
                zero = src.ints(zp_name, rr, allowed=("I8", "I32")).astype(np.int16).reshape(rr[1] - rr[0], groups)
        return IntCodes(q, np.ascontiguousarray(scale, dtype=np.float32), zero, group, gs)

    enc = f"compressed-tensors {g.format} {a.describe()}" + (" act-order g_idx" if act_order else "")
    qr = (lo, hi) if a.symmetric else (lo - hi, hi - lo)
    return IntQuantTensor(f"{mod}.weight", (out, n), enc, f"compressed-tensors/{g.format}", tuple(sources),
                          a.num_bits, a.symmetric, load, gs, act_order, qr)


def _float_record(mod: str, g: _Group, src: Source, where: str) -> QuantizedTensor:
    a = g.weights
    w_name, scale_name = f"{mod}.weight", f"{mod}.weight_scale"
    if w_name not in src:
        raise FormatError(f"{where}: tensor '{w_name}' is missing")
    tag = src.dtype(w_name)
    if tag not in ("F8_E4M3", "U8"):
        raise FormatError(f"{where}: weight has dtype {tag}, expected F8_E4M3")
    wshape = src.shape(w_name)
    if len(wshape) != 2:
        raise FormatError(f"{where}: weight has shape {list(wshape)}; only 2-D weights are supported")
    out, n = wshape
    sshape = src.shape(scale_name)
    if a.strategy == "block":
        b0, b1 = (int(x) for x in a.block_structure)
        want = [-(-out // b0), -(-n // b1)]
        if list(sshape) != want:
            raise FormatError(f"{where}: block weight_scale has shape {list(sshape)}, expected {want}")
        col_map = np.arange(n) // b1
    else:
        groups = _scale_layout(a, sshape, out, n, where)
        col_map, _, _ = _group_map(a, n, None, groups, where)

    def load(rr):
        x = np.asarray(src.raw(w_name, rr)[0]).view(np.uint8)
        if a.strategy == "tensor":
            return x, src.floats(scale_name).reshape(1, 1)
        if a.strategy == "block":
            b0 = int(a.block_structure[0])
            s = src.floats(scale_name)[np.arange(rr[0], rr[1]) // b0]
        else:
            s = src.floats(scale_name, rr)
        return x, s[:, col_map]

    enc = f"compressed-tensors {g.format} {a.describe()}"
    return FloatQuantTensor(f"{mod}.weight", (out, n), enc, f"compressed-tensors/{g.format}",
                            (w_name, scale_name), load)


def _scalar(src: Source, name: str, where: str) -> float:
    v = src.floats(name).reshape(-1)
    if v.size != 1 or not np.isfinite(v[0]) or v[0] == 0:
        raise FormatError(f"{where}: '{name}' must be one finite non-zero float, got {v[:4].tolist()}")
    return float(v[0])


def _nvfp4_record(mod: str, src: Source, where: str) -> QuantizedTensor:
    """nvfp4-pack-quantized (NVFP4PackedCompressor): P.weight_packed U8 [out, in/2] (two e2m1
    codes per byte, even column in the low nibble), P.weight_scale F8_E4M3 [out, in/16],
    P.weight_global_scale F32 [1]; P.input_global_scale F32 [1] with static activations (W4A4)."""
    packed_name, scale_name = f"{mod}.weight_packed", f"{mod}.weight_scale"
    g_name, ig_name = f"{mod}.weight_global_scale", f"{mod}.input_global_scale"
    for need in (scale_name, g_name):
        if need not in src:
            raise FormatError(f"{where}: tensor '{need}' is missing")
    out, n = nvfp4_shape(src, where, packed_name, scale_name)
    sources = [packed_name, scale_name, g_name]
    ig = None
    if ig_name in src:
        ig = _scalar(src, ig_name, where)
        sources.append(ig_name)

    def load(rr):
        packed = np.asarray(src.raw(packed_name, rr)[0]).view(np.uint8)
        scales = np.asarray(src.raw(scale_name, rr)[0]).view(np.uint8)
        return packed, scales

    g = np.float32(_scalar(src, g_name, where))
    # llama.cpp's converter turns the global scales into ModelOpt's factors, 1/g in float32
    # (ModelBase.prepare_tensors inverse_scale)
    return NVFP4Tensor(f"{mod}.weight", (out, n), f"compressed-tensors {NVFP4} fp4-e2m1 group16 fp8 scales",
                       f"compressed-tensors/{NVFP4}", tuple(sources), load, np.float32(1) / g,
                       None if ig is None else np.float32(1) / np.float32(ig), global_scale=g, input_global_scale=ig)
