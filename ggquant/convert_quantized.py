"""Already-quantized checkpoints through `ggquant convert SRC --to gguf` (issue 5).

config.json's `quantization_config` (compressed-tensors, GPTQ / AutoRound / AWQ, GLQ) or MLX's
`quantization` selects a reader of ggquant.formats.quantized. This module sits between that reader
and the converter's data flow (ggquant.convert):

    attach_quantized(arch)   the raw packed tensors (weight_packed, qweight, scales, Qidxs, ...)
                             leave the checkpoint's tensor table; each logical weight takes their
                             place as a `QuantizedSourceTensor`, a SafeTensor stand-in whose
                             float rows are the source's exact dequantization. The arch name map,
                             shape checks and planning then treat it like a bf16 weight.
                             GLQ weights stored padded are cropped to config.json's shapes.
    finish_plan(...)         after the normal plan (converter outtypes, llama-quantize presets,
                             --tensor-type) each quantized weight gets its final type and is
                             marked exact or lossy; --exact refuses every lossy step.
    encode_chunks            (called by convert.tensor_chunks) writes exact tensors by moving
                             the source's integers into GGML blocks, every chunk checked bit for
                             bit (see below), and lossy ones by dequantizing exactly and
                             quantizing (imatrix if given).

Type of a quantized weight (research note compressed-tensors-gptq-gguf-mapping.md §5, §7):
  1. a --tensor-type rule that names it: that type (exact if the values fit it, else lossy);
  2. --outtype auto (the default): the smallest GGML type that holds the values exactly (int4
     sym -> Q4_0, int4 asym / int5 -> Q5_0, int6-8 -> Q8_0, MLX affine <= 4 bit -> Q4_1, 5 bit ->
     Q5_1); act-order `down_proj` is made exact by permuting the MLP's intermediate dimension;
     otherwise F16 when F16 holds every value (int4 with bf16 scales), else Q8_0 requantized
     from the exact dequantization; GLQ gets a type at least one step above the layer's bpw
     (GLQTensor.suggested_type) and its SQNR is reported;
  3. an explicit --outtype: f32 (always exact), f16/bf16 (exact when every value fits), or a
     quantized type P (q8_0, a preset's choice): when P has at least as many bits per weight as
     the source's codes (floor(bpw(P)) >= bits), the exact type of 2. (never requantize an int4
     weight to a 4-bit type through float: Q4_K_M keeps a W4A16 model's Q4_0 blocks); else P,
     requantized from the exact dequantization (lossy; with --imatrix when given).
An exact tensor is written by ggquant.kernels.quants.transcode (pack, read back as ggml does, compare
with the source value) or, for what that kernel reports, the general packer with verify=True.
Lossy quantized weights report their SQNR (10 log10 |w|^2 / |w - ggml(w)|^2, in dB, against the
source's exact dequantization) in --dry-run and --json.

GGUF metadata (every file holding quantized-source tensors):
  ggquant.source.quantization          "compressed-tensors" | "gptq" | "auto-round" | "awq" | "mlx" | "glq"
  ggquant.source.quantization_desc     one line, e.g. "compressed-tensors pack-quantized int4 sym group32 (v0.20.0)"
  ggquant.source.exact_tensors         GGUF names whose values are the source's, bit for bit
  ggquant.source.requantized_tensors   GGUF names that were dequantized and quantized again
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from ggquant.arch.base import MMPROJ, TEXT, Arch, TensorPlan
from ggquant.errors import GGQuantError
from ggquant.formats.quantized import AffineQuantTensor, IntQuantTensor, QuantizedModel, QuantizedTensor, open_quantized
from ggquant.formats.safetensors import FLOAT_DTYPES, SafeTensor, to_float32
from ggquant.quant.transcode import BLOCK_TYPES, DEFAULT_CANDIDATES, FLOAT_TYPES, QK, bf16_exact, fp16_exact

T = GGMLQuantizationType
CHUNK_BYTES = 32 << 20  # float32 working set of one chunk (as ggquant.convert)

KEY_METHOD = "ggquant.source.quantization"
KEY_DESC = "ggquant.source.quantization_desc"
KEY_EXACT = "ggquant.source.exact_tensors"
KEY_REQUANTIZED = "ggquant.source.requantized_tensors"

FALLBACK_TYPE = T.Q8_0  # a non-exact integer source: ~0.5 % rel-RMSE for int4 act-order (note §7)


def bits_per_weight(qtype: T) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return size * 8 / block


# =============================================================================================
# Tensor-table stand-ins
# =============================================================================================


class QuantizedSourceTensor:
    """A SafeTensor stand-in for one logical weight of a quantized checkpoint.

    `dtype` is the checkpoint's float dtype (what --outtype auto reads); the values are the
    source's exact float32 dequantization (`float_rows`). Planning results live here too, since
    every logical weight becomes exactly one GGUF tensor.
    """

    def __init__(self, rec: QuantizedTensor, dtype: str, sources: list[SafeTensor]):
        self.rec = rec
        self.name = rec.name
        self.dtype = dtype
        self.shape = tuple(rec.shape)
        self.file = sources[0].file if sources else Path("?")
        self.nbytes = sum(s.nbytes for s in sources)
        self._sources = sources
        # decided by finish_plan
        self.gguf_name: str | None = None
        self.exact: bool | None = None
        self.why = ""  # how the type was chosen / why it is not exact
        self.sqnr: float | None = None
        self._acc = [0.0, 0.0]  # sum w^2, sum (w - ggml(w))^2 while encoding

    @property
    def ndim(self) -> int:
        return 2

    @property
    def n_outer(self) -> int:
        return self.shape[0]

    def float_rows(self, start: int, stop: int) -> np.ndarray:
        return self.rec.dequantize((start, stop))

    def read(self) -> np.ndarray:
        return self.float_rows(0, self.n_outer)

    def rows(self, start: int, stop: int) -> np.ndarray:
        raise GGQuantError(f"{self.file}: tensor '{self.name}' is {self.rec.encoding}: it has no raw "
                           f"{self.dtype} rows (use float_rows)")

    def release(self, start: int = 0, stop: int | None = None) -> None:
        for s in self._sources:  # packed layouts are not row-aligned with the weight: drop them whole
            s.release(0, s.n_outer)

    # --- encoding (ggquant.convert.tensor_chunks hands planned tensors of this kind here) ----
    def encode_chunks(self, t: TensorPlan, imatrix: np.ndarray | None):
        """(bytes, after) per bounded chunk of output rows, like convert.tensor_chunks."""
        step = max(1, CHUNK_BYTES // (4 * self.shape[1]))
        if self.exact:
            for a in range(0, t.n_outer, step):
                b = min(t.n_outer, a + step)
                res = exact_chunk(self.rec, t.qtype, (a, b))
                if isinstance(res, str):  # planned exact from the metadata and scales; the payload disagrees
                    raise GGQuantError(f"tensor '{t.name}' was planned as an exact {t.qtype.name} copy of "
                                       f"{self.name}, but rows [{a}, {b}) are not: {res}")
                yield res, None
        else:
            self._acc = [0.0, 0.0]
            for out in self._lossy_chunks(t, imatrix, step):
                yield out, None
            self._finish_sqnr()
        self.release()

    def _lossy_chunks(self, t: TensorPlan, imatrix, step: int):
        from ggquant.convert import encode
        from ggquant.quant import types as qtypes

        for a in range(0, t.n_outer, step):
            b = min(t.n_outer, a + step)
            x = self.rec.dequantize((a, b))
            y = np.ascontiguousarray(t.transform(x, self.dtype), dtype=np.float32)
            out = encode(y, t.qtype, imatrix, f"tensor '{t.name}'")
            if t.qtype != T.F32:
                back = qtypes.get(t.qtype).dequantize(out, y.shape).astype(np.float64)
                y64 = y.astype(np.float64)
                self._acc[0] += float(np.sum(y64 * y64))
                self._acc[1] += float(np.sum((y64 - back) ** 2))
            yield out

    def _finish_sqnr(self) -> None:
        sig, noise = self._acc
        self.sqnr = None if noise == 0 else (10 * math.log10(sig / noise) if sig > 0 else float("-inf"))

    def measure(self, t: TensorPlan, imatrix: np.ndarray | None) -> None:
        """SQNR of a lossy plan without writing anything (--dry-run)."""
        if self.exact:
            return
        self._acc = [0.0, 0.0]
        for _ in self._lossy_chunks(t, imatrix, max(1, CHUNK_BYTES // (4 * self.shape[1]))):
            pass
        self._finish_sqnr()
        self.release()


def exact_chunk(rec: QuantizedTensor, qtype: T, rows: tuple[int, int]) -> np.ndarray | str:
    """Rows [start, stop) of `rec` as exact `qtype` bytes, or why they cannot be.

    Block types first take the one-pass kernel (ggquant.kernels.quants.transcode: pack, read back as
    ggml does, compare with float32(u)*d (+ m), the source's own dequantization of its blocks);
    anything it reports goes through the general packer (offset folding, constant blocks) with
    verify=True, as do the float types.
    """
    if qtype in BLOCK_TYPES:
        from ggquant.kernels.quants.transcode import pack_exact

        blocks = rec.blocks(rows)
        if not isinstance(blocks, str) and not (blocks.m is not None and qtype in (T.Q4_0, T.Q5_0, T.Q8_0)):
            out, bad = pack_exact(qtype, blocks.u, blocks.d, blocks.m)
            if (bad < 0).all():
                return out
    res = rec.exact_ggml_or_reason([qtype], rows=rows, verify=True)
    return res if isinstance(res, str) else res[1]


class PermutedFloatTensor:
    """A float SafeTensor with its outer rows reordered (w' = w[perm]); for the act-order trick."""

    def __init__(self, st: SafeTensor, perm: np.ndarray):
        self.st, self.perm = st, perm
        self.name, self.dtype, self.shape, self.file, self.nbytes = st.name, st.dtype, st.shape, st.file, st.nbytes

    ndim = property(lambda self: self.st.ndim)
    n_outer = property(lambda self: self.st.n_outer)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.st.read()[self.perm[start:stop]])

    def float_rows(self, start: int, stop: int) -> np.ndarray:
        return to_float32(self.rows(start, stop), self.dtype, f"{self.file}: tensor '{self.name}'")

    def read(self) -> np.ndarray:
        return self.rows(0, self.n_outer)

    def release(self, start: int = 0, stop: int | None = None) -> None:
        self.st.release(0, self.st.n_outer)


# =============================================================================================
# Attaching a quantized checkpoint to the converter's tensor table
# =============================================================================================


class QuantizedSource:
    """What attach_quantized did: the reader's model and the stand-ins it put in the table."""

    def __init__(self, model: QuantizedModel, tensors: dict[str, QuantizedSourceTensor], notes: list[str]):
        self.model = model
        self.tensors = tensors
        self.notes = notes

    def describe(self) -> dict:
        return {"method": self.model.method, "description": self.model.description, "notes": self.notes}


def _model_dtype(arch: Arch, consumed: frozenset[str]) -> str:
    """The checkpoint's float dtype: that of its unquantized matrices, else config.json's."""
    counts: dict[str, int] = {}
    for name, t in arch.ckpt.tensors.items():
        if name not in consumed and t.dtype in FLOAT_DTYPES and t.ndim >= 2:
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
    if counts:
        return max(counts, key=lambda k: counts[k])
    cfg_dtype = str(arch.hparams.get("torch_dtype") or arch.hparams.get("dtype") or "bfloat16")
    return {"float16": "F16", "float32": "F32"}.get(cfg_dtype, "BF16")


def attach_quantized(arch: Arch) -> QuantizedSource | None:
    """Replace a quantized checkpoint's packed tensors by their logical weights (see module doc).

    Returns None (and changes nothing) for an unquantized checkpoint.
    """
    ckpt = arch.ckpt
    assert ckpt is not None
    model = open_quantized(arch.raw, list(ckpt.tensors), ckpt.tensors.__getitem__)
    if model is None:
        return None
    notes = list(model.notes)
    dtype = _model_dtype(arch, model.consumed)
    records = {name: _crop_glq(arch, rec) for name, rec in model.tensors.items()}
    stand_ins: dict[str, Any] = {}
    for name, rec in records.items():
        srcs = [ckpt.tensors[s] for s in rec.sources if s in ckpt.tensors]
        stand_ins[name] = QuantizedSourceTensor(rec, dtype, srcs)
    # Rebuild the table in the converter's order: shard files in order, names sorted inside a
    # shard; a logical weight lives in the shard of its first packed tensor, so the order is the
    # one a dequantized checkpoint with the same sharding would have.
    file_of = {id(f): i for i, f in enumerate(ckpt.files)}
    groups: dict[int, dict[str, Any]] = {i: {} for i in range(len(ckpt.files))}
    for name, t in ckpt.tensors.items():
        if name not in model.consumed:
            groups[file_of[id(t._owner)]][name] = t
    for name, st in stand_ins.items():
        home = st._sources[0]._owner if st._sources else ckpt.files[0]
        g = groups[file_of[id(home)]]
        if name in g:
            raise GGQuantError(f"{st.file}: tensor '{name}' is stored as a float tensor and also as the "
                               f"quantized weight made of {', '.join(st.rec.sources)}; remove one of them")
        g[name] = st
    table: dict[str, Any] = {}
    for i in range(len(ckpt.files)):
        for name in sorted(groups[i]):
            table[name] = groups[i][name]
    notes += _permute_act_order(table)
    ckpt.tensors = table
    return QuantizedSource(model, {n: t for n, t in table.items() if isinstance(t, QuantizedSourceTensor)}, notes)


def _crop_glq(arch: Arch, rec: QuantizedTensor) -> QuantizedTensor:
    """GLQ weights stored padded (legacy pow2 layouts, quantized embeddings) -> the model's shape."""
    if not getattr(rec, "padded", False):
        return rec
    exp = arch.expected_shapes() if hasattr(arch, "expected_shapes") else {}
    want = exp.get(arch.normalize_name(rec.name))
    if want is None or len(want[0]) != 2:
        raise GGQuantError(f"GLQ tensor '{rec.name}' is stored padded to {list(rec.shape)} and "
                           f"{arch.config_path.name} does not say its true shape; ggquant cannot crop it")
    return rec.cropped(*want[0])


def _permute_act_order(table: dict[str, Any]) -> list[str]:
    """Act-order `down_proj` made exact by permuting the MLP intermediate dimension (note §5.4).

    down_proj columns are sorted by their quantization group (stable argsort of g_idx) and the
    rows of gate_proj and up_proj (and their biases) follow: the MLP computes the same function
    and down_proj's 32-column blocks then share one scale. Applied only where the permuted
    down_proj transcodes exactly and both producers can be permuted.
    """
    notes = []
    for name, t in list(table.items()):
        if not (isinstance(t, QuantizedSourceTensor) and name.endswith("down_proj.weight")):
            continue
        rec = t.rec
        if not isinstance(rec, IntQuantTensor) or rec.act_order_perm() is None:
            continue
        perm = rec.act_order_perm()
        prefix = name[: -len("down_proj.weight")]
        producers = [prefix + p for p in ("gate_proj.weight", "up_proj.weight")]
        extras = [prefix + p for p in ("gate_proj.bias", "up_proj.bias") if prefix + p in table]
        if not all(p in table for p in producers):
            continue
        if not all(_row_permutable(table[p]) for p in producers + extras):
            continue
        down = rec.permuted(cols=perm)
        res = down.exact_ggml_or_reason(verify=False)
        if isinstance(res, str):
            continue
        t.rec = down
        for p in producers + extras:
            table[p] = _permute_rows(table[p], perm)
        notes.append(f"{name}: act-order columns sorted by group (gate_proj/up_proj rows permuted alike), "
                     f"which makes it exact")
    return notes


def _row_permutable(t) -> bool:
    if isinstance(t, QuantizedSourceTensor):
        return isinstance(t.rec, IntQuantTensor)
    return isinstance(t, SafeTensor) and t.dtype in FLOAT_DTYPES and t.ndim >= 1


def _permute_rows(t, perm: np.ndarray):
    if isinstance(t, QuantizedSourceTensor):
        t.rec = t.rec.permuted(rows=perm)
        return t
    return PermutedFloatTensor(t, perm)


# =============================================================================================
# Planning
# =============================================================================================


def _chunks(n_rows: int, n_cols: int):
    step = max(1, CHUNK_BYTES // (4 * max(1, n_cols)))
    for a in range(0, n_rows, step):
        yield a, min(n_rows, a + step)


def _float_exact(rec: QuantizedTensor, qtype: T, n_rows: int) -> str | None:
    """None if `qtype` (F32/F16/BF16) holds every dequantized value, else why not."""
    if qtype == T.F32:
        return None
    test = fp16_exact if qtype == T.F16 else bf16_exact
    bad = 0
    for a, b in _chunks(n_rows, rec.shape[1]):
        bad += int((~test(rec.dequantize((a, b)))).sum())
    if bad:
        return f"{bad} of {n_rows * rec.shape[1]} values are not {qtype.name} values"
    return None


def _scales_fp16(st: QuantizedSourceTensor, arch: Arch) -> bool:
    """Cheap sufficient condition for a predicted block type: every scale (and MLX bias) is an
    fp16 value, so the packer's only data-dependent condition holds (note §5.1)."""
    rec = st.rec
    if isinstance(rec, IntQuantTensor) and rec._perm_cols is None:
        names = [s for s in rec.sources if s.endswith(("weight_scale", ".scales"))]
    elif isinstance(rec, AffineQuantTensor):
        names = [s for s in rec.sources if s.endswith((".scales", ".biases"))]
    else:
        return False
    if not names:
        return False
    for n in names:
        src = next((s for s in st._sources if s.name == n), None)
        if src is None:
            return False
        if src.dtype == "F16":
            continue
        if src.dtype not in FLOAT_DTYPES or not fp16_exact(to_float32(src.read(), src.dtype)).all():
            return False
    return True


def _block_exact(st: QuantizedSourceTensor, qtype: T, n_rows: int, arch: Arch) -> str | None:
    """None if `qtype` (a legacy block type) carries the weight exactly, else why not."""
    rec = st.rec
    predicted, _ = rec.expected_exact_type(DEFAULT_CANDIDATES)
    if predicted == qtype and _scales_fp16(st, arch):
        return None
    for a, b in _chunks(n_rows, rec.shape[1]):
        res = rec.exact_ggml_or_reason([qtype], rows=(a, b), verify=False)
        if isinstance(res, str):
            return res
    return None


def _exact_type(st: QuantizedSourceTensor, n_rows: int, arch: Arch) -> tuple[T | None, str]:
    """The smallest legacy block type holding the weight exactly, or (None, why not)."""
    rec = st.rec
    if rec.shape[1] % QK:
        return None, f"rows of {rec.shape[1]} elements are not whole {QK}-element blocks"
    predicted, why = rec.expected_exact_type(DEFAULT_CANDIDATES)
    if predicted in BLOCK_TYPES:
        bad = _block_exact(st, predicted, n_rows, arch)
        if bad is None:
            return predicted, ""
        why = bad
    if isinstance(rec, IntQuantTensor) and rec._perm_cols is not None:
        # a permuted act-order weight: only the payload can tell
        for qtype in DEFAULT_CANDIDATES:
            if _block_exact(st, qtype, n_rows, arch) is None:
                return qtype, ""
    return None, why


def _check_target(st: QuantizedSourceTensor, qtype: T, n_rows: int, arch: Arch) -> str | None:
    if qtype in FLOAT_TYPES:
        return _float_exact(st.rec, qtype, n_rows)
    if qtype in BLOCK_TYPES:
        if st.shape[1] % QK:
            return f"rows of {st.shape[1]} elements are not whole {QK}-element blocks"
        return _block_exact(st, qtype, n_rows, arch)
    return f"{qtype.name} cannot hold integer codes under a free scale per 32 columns"


def _decide(st: QuantizedSourceTensor, t: TensorPlan, arch: Arch, *, auto: bool, ruled: bool) -> None:
    """Set t.qtype / st.exact / st.why for one quantized weight (rules in the module docstring)."""
    rec = st.rec
    planned = t.qtype
    st.gguf_name = t.name
    if not t.transform.identity:
        st.exact = False
        st.why = f"the architecture transforms this tensor ({t.transform.label or type(t.transform).__name__})"
        if auto:
            t.qtype = FALLBACK_TYPE if t.shape[-1] % QK == 0 else T.F16
        t.reason = f"lossy: {st.why}"
        return
    n_rows = t.n_outer
    is_glq = rec.format.startswith("glq")

    def take(qtype: T, exact: bool, why: str) -> None:
        t.qtype, st.exact, st.why = qtype, exact, why
        t.reason = f"{'exact' if exact else 'lossy'}: {why}"

    if ruled or planned in FLOAT_TYPES and not auto:
        # what the user named (a --tensor-type rule, a float --outtype): exact when the values fit
        bad = _check_target(st, planned, n_rows, arch)
        if bad is None:
            return take(planned, True, f"{rec.encoding} -> {planned.name}")
        return take(planned, False, f"{rec.encoding} -> {planned.name}: {bad}")
    if not auto:
        # a quantized type from --outtype q8_0 or a preset: the exact type whenever the plan
        # allows as many bits per weight as the source has (same values, usually fewer bytes)
        exact, why = (None, "") if is_glq else _exact_type(st, n_rows, arch)
        if exact is not None and rec.bits is not None and math.floor(bits_per_weight(planned)) >= rec.bits:
            note = "" if exact == planned else f" ({planned.name} planned; the {rec.bits}-bit codes are kept exactly)"
            return take(exact, True, f"{rec.encoding} -> {exact.name}{note}")
        bad = why or _check_target(st, planned, n_rows, arch) or ""
        return take(planned, False, f"{rec.encoding} -> {planned.name}: requantized ({bad or 'lossy'})")
    # --outtype auto
    if is_glq:
        from ggquant.quant import types as qtypes

        sugg = getattr(rec, "suggested_type", FALLBACK_TYPE)
        if t.shape[-1] % GGML_QUANT_SIZES[sugg][0]:
            # a K-quant for a row that is not whole super-blocks: llama-quantize's 32-element fallback
            sugg = qtypes.get(sugg).row_fallback or FALLBACK_TYPE
        if t.shape[-1] % GGML_QUANT_SIZES[sugg][0]:
            sugg = T.F16
        return take(sugg, False, f"{rec.encoding} -> {sugg.name} (no GGML type holds GLQ values; one step "
                                 f"above the layer's bpw)")
    exact, why = _exact_type(st, n_rows, arch)
    if exact is not None:
        return take(exact, True, f"{rec.encoding} -> {exact.name}")
    if _float_exact(rec, T.F16, n_rows) is None:
        return take(T.F16, True, f"{rec.encoding} -> F16 (no block type is exact: {why})")
    fb = FALLBACK_TYPE if t.shape[-1] % QK == 0 else T.F32
    return take(fb, fb == T.F32, f"{rec.encoding} -> {fb.name}: no exact block type ({why}) and F16 cannot "
                                 f"hold every value")


def _float_lossless(t: TensorPlan) -> str | None:
    """None if an ordinary (float source or generated) tensor is written without rounding."""
    if t.qtype == T.F32:
        return None
    if t.src is None:
        return None if t.qtype == T.F16 and np.array_equal(
            t.generated.astype(np.float16).astype(np.float32), t.generated) else f"generated -> {t.qtype.name}"
    if isinstance(t.src, QuantizedSourceTensor):
        return None if t.src.exact else t.src.why
    if t.qtype.name == t.src.dtype:
        return None
    if t.qtype in (T.F16, T.BF16) and t.src.dtype in FLOAT_DTYPES:
        # e.g. BF16 -> F16: exact unless a value is below fp16's normal range or beyond 65504
        test = fp16_exact if t.qtype == T.F16 else bf16_exact
        inner = max(1, math.prod(t.src.shape[1:])) if t.src.shape else 1
        bad = 0
        for a, b in _chunks(t.n_outer, inner):
            bad += int((~test(np.asarray(t.transform(t.src.float_rows(a, b), t.src.dtype)))).sum())
        if not bad:
            return None
        return f"{t.src.dtype} -> {t.qtype.name} rounds {bad} of {t.n_elements} values"
    return f"{t.src.dtype} -> {t.qtype.name} rounds"


def finish_plan(files: list, arch: Arch, qsrc: QuantizedSource | None, *, auto: bool, preset, rules=(),
                exact: bool = False, outfile=None) -> None:
    """Final types of the quantized weights, their metadata, and --exact (see module docstring)."""
    for f in files:
        plans = [t for t in f.tensors if isinstance(t.src, QuantizedSourceTensor)]
        f_auto = auto or (preset is not None and f.part == MMPROJ)
        for t in plans:
            ruled = preset is not None and f.part == TEXT and any(r.regex.search(t.name) for r in rules)
            _decide(t.src, t, arch, auto=f_auto, ruled=ruled)
        if plans and qsrc is not None:
            f.kv.string(KEY_METHOD, qsrc.model.method)
            f.kv.string(KEY_DESC, qsrc.model.description)
            f.kv.array(KEY_EXACT, [t.name for t in plans if t.src.exact])
            f.kv.array(KEY_REQUANTIZED, [t.name for t in plans if not t.src.exact])
        if plans and auto:
            _relabel(f, plans, outfile)
    if exact:
        lossy = [(t.name, why) for f in files for t in f.tensors if (why := _float_lossless(t)) is not None]
        quantized = {t.name for f in files for t in f.tensors if isinstance(t.src, QuantizedSourceTensor)}
        lossy.sort(key=lambda item: item[0] not in quantized)  # the quantized weights first
        if lossy:
            more = f" (and {len(lossy) - 3} more)" if len(lossy) > 3 else ""
            raise GGQuantError("--exact: these tensors cannot be written exactly: " +
                               "; ".join(f"{n}: {w}" for n, w in lossy[:3]) + more)


def _relabel(f, plans: list[TensorPlan], outfile) -> None:
    """--outtype auto: general.file_type and the default file name follow the type holding most
    quantized weights (e.g. Q4_0 for a W4A16 checkpoint), not the float type of the rest."""
    from ggquant.convert import _fill_template
    from ggquant.quant import types as qtypes

    by_type: dict[T, int] = {}
    for t in plans:
        by_type[t.qtype] = by_type.get(t.qtype, 0) + t.n_elements
    main = max(by_type, key=lambda q: by_type[q])
    file_type = qtypes.get(main).file_type
    if file_type is None:
        return
    if f.part == TEXT:
        f.kv.u32(Keys.General.FILE_TYPE, int(file_type))
    label = main.name
    old = f.outtype
    if label == old:
        return
    out = Path(outfile) if outfile else None
    if out is None or out.is_dir():
        suffix = f"-{old}.gguf"
        if f.path.name.endswith(suffix):
            f.path = f.path.with_name(f.path.name[: -len(suffix)] + f"-{label}.gguf")
    elif "{" in out.name and f.part == TEXT:
        f.path = out.parent / _fill_template(out.name, label)
    f.outtype = label


def measure_lossy(conv) -> None:
    """--dry-run: the SQNR of every lossy quantized weight (what the real run reports too)."""
    from ggquant.quant import types as qtypes

    for f in conv.files:
        for t in f.tensors:
            if isinstance(t.src, QuantizedSourceTensor) and not t.src.exact:
                vec = f.imatrix.get(t.name) if qtypes.get(t.qtype).uses_imatrix else None
                t.src.measure(t, vec)


# =============================================================================================
# Reporting
# =============================================================================================


def tensor_json(t: TensorPlan) -> dict:
    """Extra --json fields of a tensor that comes from a quantized weight."""
    st = t.src
    if not isinstance(st, QuantizedSourceTensor):
        return {}
    d: dict[str, Any] = {"source_format": st.rec.format, "source_encoding": st.rec.encoding,
                         "source_tensor": st.name, "exact": bool(st.exact)}
    if st.sqnr is not None:
        d["sqnr_db"] = round(st.sqnr, 3)
    return d


def file_json(f) -> dict:
    for t in f.tensors:
        if isinstance(t.src, QuantizedSourceTensor):
            return {"source_quantization": f.kv.get(KEY_METHOD), "source_quantization_desc": f.kv.get(KEY_DESC),
                    "exact_tensors": sum(1 for u in f.tensors if isinstance(u.src, QuantizedSourceTensor)
                                         and u.src.exact),
                    "requantized_tensors": sum(1 for u in f.tensors if isinstance(u.src, QuantizedSourceTensor)
                                               and not u.src.exact)}
    return {}


def plan_lines(f) -> list[str]:
    """--dry-run: per quantized weight, its source encoding, GGUF type, exact or lossy (SQNR)."""
    plans = [t for t in f.tensors if isinstance(t.src, QuantizedSourceTensor)]
    if not plans:
        return []
    n_exact = sum(1 for t in plans if t.src.exact)
    lines = [f"  quantized source: {f.kv.get(KEY_DESC)}: {n_exact} exact, {len(plans) - n_exact} lossy",
             f"  {'tensor':<44} {'source encoding':<52} {'to':>7}  result"]
    for t in plans:
        st = t.src
        if st.exact:
            res = "exact"
        else:
            res = "lossy" + (f" (SQNR {st.sqnr:.2f} dB)" if st.sqnr is not None else "")
            res += f": {st.why}"
        lines.append(f"  {t.name:<44} {st.rec.encoding:<52} {t.qtype.name:>7}  {res}")
    return lines
