"""`ggquant convert MODEL.gguf --to compressed-tensors`: the linear weights of the HF export as
compressed-tensors `pack-quantized` modules (the rest of the export is export_hf's, unchanged).

Format facts (research note compressed-tensors-gptq-gguf-mapping.md §1-2, ct 0.20):
- per quantized Linear M: `M.weight_packed` I32 [out, in*nb/32] (unsigned codes u = q + 2^(nb-1),
  code i of a row at bits 4*(i%8) (int4) or 8*(i%4) (int8) of word i//(32/nb), LSB first: the
  dense (ct >= 0.18) and legacy packings coincide for 4 and 8 bits), `M.weight_scale` [out, in/g],
  `M.weight_shape` I64 [2] = [out, in]. Dequant: W = q * scale.
- Q4_0 is int4 symmetric group 32 exactly: d (fp16) is the scale, the stored nibble is already
  u = q + 8. Element j of a block is the low nibble of qs[j] (j < 16) or the high nibble of
  qs[j-16] (ggml-common.h block_q4_0). Q8_0 is int8 symmetric group 32 (qs = q, u = q + 128).
- float (F32/F16/BF16) Linears stay float and go into `ignore`; any other quantized source
  type is requantized, lossy, from ggml's dequantization to Q4_0 (ggquant's
  ggml-exact quantizer) and then mapped exactly: int4 sym group 32.
- group_size 128 (--group-size 128): every Linear is requantized (lossy) from ggml's
  dequantization by compressed-tensors' own int4 symmetric rule (quantize_int4_sym), with
  float32 scales.
- scales are written in float32 for an F32 export (the fp16 d widens exactly, so the library's
  dequantization, computed in the scale dtype, is ggml's value bit for bit) and fp16 otherwise
  (still exact storage of d).
- config.json gets `quantization_config` with the keys and values ModelCompressor.update_config
  of compressed-tensors 0.20 writes (targets ["Linear"], format pack-quantized, ignore = the
  Linear modules left in float, lm_head included).
- mixed precision (group 32): a GGUF whose Linears are partly Q8_0 (e.g. `ggquant quantize
  --tensor-type`) gets two config groups, both exact: group_0 int4 (Q4_0, and the requantized
  other types) and group_1 int8 (Q8_0), each with `targets` = its exact module names (a target
  without "re:" matches a module by its full name, compressed_tensors.utils.match); the top-level
  format stays pack-quantized, the one format of both groups. llama.cpp's converter refuses such
  multi-group checkpoints; compressed-tensors and vLLM load them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
from gguf import GGMLQuantizationType

from ggquant.convert.encode import row_chunks
from ggquant.convert.gguf_to_hf import tensor_chunks
from ggquant.errors import GGQuantError

T = GGMLQuantizationType
GROUP = 32
CT_VERSION = "0.20.0"
_EXACT = {4: T.Q4_0, 8: T.Q8_0}
_FLOAT = {T.F32, T.F16, T.BF16}
_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")


def _is_linear(t) -> bool:
    """A 2-D `.weight` of a Linear module (embeddings are nn.Embedding, not Linear)."""
    return t.name.endswith(".weight") and len(t.shape) == 2 and "embed" not in t.name


def pack_q4_0(raw: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 rows (uint8 [rows, n_in/32*18]) -> (weight_packed int32 [rows, n_in/8], d float16 [rows, n_in/32])."""
    rows = raw.shape[0]
    b = raw.reshape(rows, n_in // 32, 18)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16).reshape(rows, n_in // 32)
    qs = b[:, :, 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, n_in // 8, 8).astype(np.uint32)
    words = np.bitwise_or.reduce(codes << (np.arange(8, dtype=np.uint32) * 4), axis=2)
    return np.ascontiguousarray(words).view(np.int32), d


def _int8_words(q: np.ndarray, rows: int, n_in: int) -> np.ndarray:
    """int8 codes [rows, ...] (n_in per row) -> weight_packed int32 [rows, n_in/4] (u = q + 128)."""
    codes = (q.astype(np.int32) + 128).astype(np.uint32).reshape(rows, n_in // 4, 4)
    return np.ascontiguousarray(np.bitwise_or.reduce(codes << (np.arange(4, dtype=np.uint32) * 8), axis=2)).view(np.int32)


def pack_q8_0(raw: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows (uint8 [rows, n_in/32*34]) -> (weight_packed int32 [rows, n_in/4], d float16 [rows, n_in/32])."""
    rows = raw.shape[0]
    b = raw.reshape(rows, n_in // 32, 34)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16).reshape(rows, n_in // 32)
    return _int8_words(np.ascontiguousarray(b[:, :, 2:]).view(np.int8), rows, n_in), d


def pack_q4_0_as_int8(raw: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 rows as int8 group 32 (the same codes q in [-8, 7] and the same d: exact): for a
    fused module whose other shards are int8 (see _widen_fused)."""
    rows = raw.shape[0]
    b = raw.reshape(rows, n_in // 32, 18)
    d = np.ascontiguousarray(b[:, :, :2]).view(np.float16).reshape(rows, n_in // 32)
    qs = b[:, :, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.int8) - np.int8(8)
    return _int8_words(q, rows, n_in), d


# Linears that vLLM fuses into one module (qkv_proj, gate_up_proj; its packed_modules_mapping for
# Gemma) and then requires to share one quantization scheme and one ignore status
# (compressed_tensors/utils.py should_ignore_layer / find_matched_target: "Found a different
# quantization schemes ... vLLM requires all to use the same scheme")
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fused_sets(modules) -> list[list[str]]:
    sets: dict[tuple[str, int], list[str]] = {}
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        for i, names in enumerate(FUSED):
            if leaf in names:
                sets.setdefault((parent, i), []).append(m)
    return [sorted(v) for v in sets.values() if len(v) > 1]


def quantize_int4_sym(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [rows, n] -> (weight_packed int32 [rows, n/8], scale float32 [rows, n/group]) by
    compressed-tensors' own int4 symmetric rule (calculate_qparams + quantize, float32):
    scale = absmax / 7.5 (bit range 15 / 2; 0 -> float32 eps), q = clamp(round_half_even(x / scale), -8, 7)."""
    rows, n = x.shape
    g = np.ascontiguousarray(x, dtype=np.float32).reshape(rows, n // group, group)
    scale = np.max(np.abs(g), axis=2) / np.float32(7.5)
    scale[scale == 0] = np.finfo(np.float32).eps
    q = np.clip(np.rint(g / scale[:, :, None]), -8, 7).astype(np.int32)
    codes = (q + 8).astype(np.uint32).reshape(rows, n // 8, 8)
    words = np.bitwise_or.reduce(codes << (np.arange(8, dtype=np.uint32) * 4), axis=2)
    return np.ascontiguousarray(words).view(np.int32), scale


class CompressedTensorsLinears:
    """export_hf's `linears` hook: which tensors are written and how, plus the config patch."""

    def __init__(self, exact: bool = False, group_size: int = GROUP):
        if group_size not in (32, 128):
            raise GGQuantError(f"--group-size {group_size}: compressed-tensors export writes groups of 32 "
                               f"(exact from Q4_0/Q8_0) or 128 (int4, requantized)")
        self.exact = exact  # refuse the lossy requantization (--exact)
        self.group = group_size
        self.bits: int | None = None  # the bits of a single-group export; None when mixed
        self.bits_of: dict[str, int] = {}  # module name -> 4 or 8
        self.quantized: dict[str, object] = {}  # module name -> HFTensor of its weight
        self.lossy: list[str] = []  # modules requantized through float
        self.ignore: list[str] = []
        self.scale_dtype = "F32"

    # -- planning ---------------------------------------------------------------------------
    def entries(self, export) -> list[tuple[str, str, tuple[int, ...]]]:
        cands = [t for t in export.tensors if _is_linear(t)]
        # float matrices stay float (llama.cpp keeps e.g. per_layer_model_proj in F32 on purpose) and
        # are listed in `ignore`, like the Linears whose rows do not split into groups of 32
        ok = [t for t in cands if t.identity and t.shape[1] % self.group == 0
              and not t.name.startswith("lm_head") and t.gguf_type not in _FLOAT]
        # group 32: Q8_0 stays int8 (exact), everything else is int4 (exact from Q4_0); both kinds
        # present -> two config groups
        self.quantized = {t.name[:-len(".weight")]: t for t in ok}
        self.bits_of = {m: 8 if t.gguf_type == T.Q8_0 and self.group == GROUP else 4
                        for m, t in self.quantized.items()}
        self._widen_fused(cands)
        kinds = set(self.bits_of.values())
        self.bits = kinds.pop() if len(kinds) == 1 else (None if kinds else 4)
        # fp16 holds every Q4_0/Q8_0 d exactly; the requantized g128 scales are float32 values
        self.scale_dtype = "F32" if export.dtype == "F32" or self.group != GROUP else "F16"
        self.lossy = sorted(m for m, t in self.quantized.items() if self.group != GROUP or not (
            t.gguf_type == _EXACT[self.bits_of[m]] or (t.gguf_type == T.Q4_0 and self.bits_of[m] == 8)))
        if self.exact and self.lossy:
            kinds = sorted({self.quantized[m].gguf_type.name for m in self.lossy})
            raise GGQuantError(f"--exact: {len(self.lossy)} Linear weights are {', '.join(kinds)}, which int4/int8 "
                               f"pack-quantized cannot hold exactly (only Q4_0 -> W4A16 and Q8_0 -> W8A16 are "
                               f"exact), e.g. {self.lossy[0]}; drop --exact to requantize them to int4 group 32")
        linear_modules = {t.name[:-len(".weight")] for t in cands}
        self.ignore = sorted({"lm_head"} | (linear_modules - set(self.quantized)))
        out = []
        for t in export.tensors:
            m = t.name[:-len(".weight")]
            if m in self.quantized and t.name.endswith(".weight"):
                n_out, n_in = t.shape
                out += [(m + ".weight_packed", "I32", (n_out, n_in * self.bits_of[m] // 32)),
                        (m + ".weight_scale", self.scale_dtype, (n_out, n_in // self.group)),
                        (m + ".weight_shape", "I64", (2,))]
            else:
                out.append((t.name, export.dtype, t.shape))
        # widest dtype first (as safetensors' own serializer orders them): with mixed dtypes in one
        # file, every tensor then starts at a multiple of its element size
        from ggquant.formats.hf_writer import DTYPE_BYTES

        return sorted(out, key=lambda e: -DTYPE_BYTES[e[1]])

    def _widen_fused(self, cands) -> None:
        """One scheme per vLLM-fused module: where q/k/v (or gate/up) mix int4 and int8, the int4
        shards are written as int8 (from Q4_0: the same codes and scales, exact). A fused set that
        mixes float and quantized shards cannot be made uniform exactly: it is reported."""
        self.widened, self.notes = [], []
        linear = {t.name[:-len(".weight")] for t in cands}
        for members in _fused_sets(linear):
            quant = [m for m in members if m in self.bits_of]
            if quant and len(quant) < len(members):
                self.notes.append(f"{', '.join(members)}: float and quantized shards of one module vLLM fuses "
                                  f"(vLLM refuses mixed schemes there; other loaders are fine)")
            if len({self.bits_of[m] for m in quant}) > 1:
                for m in quant:
                    if self.bits_of[m] == 4:
                        self.bits_of[m] = 8
                        self.widened.append(m)
        if self.widened:
            self.notes.append(f"{len(self.widened)} int4 shards of vLLM-fused modules written as int8 (the same "
                              f"values) so each fused module has one scheme, e.g. {self.widened[0]}")

    # -- writing ----------------------------------------------------------------------------
    def chunks(self, p, export) -> Iterator[np.ndarray]:

        for suffix in _SUFFIXES:
            if p.name.endswith(suffix) and p.name[:-len(suffix)] in self.quantized:
                m = p.name[:-len(suffix)]
                yield from self._module_chunks(self.quantized[m], suffix, self.bits_of[m])
                return
        yield from tensor_chunks(next(t for t in export.tensors if t.name == p.name), export.dtype)

    def _module_chunks(self, t, suffix: str, bits: int) -> Iterator[np.ndarray]:
        from ggquant.quant import types as qtypes

        n_out, n_in = t.shape
        if suffix == ".weight_shape":
            yield np.array([n_out, n_in], dtype=np.int64)
            return
        src, target = t.source.tensors[t.gguf_name], _EXACT[bits]
        for a, b in row_chunks(n_out, n_in):
            if self.group != GROUP:
                words, d = quantize_int4_sym(src.float_rows(a, b), self.group)
            elif t.gguf_type == target or (t.gguf_type == T.Q4_0 and bits == 8):
                raw = src.rows(a, b)
            else:  # lossy: ggml's dequantization, requantized to Q4_0 / Q8_0 (int4 / int8 sym group 32)
                raw = qtypes.get(target).quantize(src.float_rows(a, b), what=t.gguf_name)
            if self.group == GROUP:
                pack = pack_q4_0 if bits == 4 else (pack_q4_0_as_int8 if t.gguf_type == T.Q4_0 else pack_q8_0)
                words, d = pack(raw, n_in)
            if suffix == ".weight_packed":
                yield words
            else:
                yield d.astype(np.float32) if self.scale_dtype == "F32" else d
            src.release(a, b)

    # -- config -----------------------------------------------------------------------------
    def quantization_config(self) -> dict:
        """As compressed-tensors 0.20's ModelCompressor.update_config writes it (keys sorted)."""

        def group(bits: int, targets: list[str]) -> dict:
            weights = {"dynamic": False, "group_size": self.group, "num_bits": bits, "strategy": "group",
                       "symmetric": True, "type": "int"}
            return {"format": "pack-quantized", "input_activations": None, "output_activations": None,
                    "targets": targets, "weights": weights}

        if self.bits is not None:  # one scheme for every quantized Linear
            groups = {"group_0": group(self.bits, ["Linear"])}
        else:  # int4 and int8: each group targets its modules by exact name
            groups = {f"group_{i}": group(b, sorted(m for m, x in self.bits_of.items() if x == b))
                      for i, b in enumerate((4, 8))}
        return {"config_groups": groups,
                "format": "pack-quantized", "global_compression_ratio": None, "ignore": list(self.ignore),
                "kv_cache_scheme": None, "moe_sparsity_config": None, "quant_method": "compressed-tensors",
                "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
                "version": CT_VERSION}

    def config_json(self, data: bytes) -> bytes:
        cfg = json.loads(data)
        cfg["quantization_config"] = self.quantization_config()
        return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
