"""Already-quantized checkpoints through `ggquant convert SRC --to gguf` (issue 5).

config.json's `quantization_config` (compressed-tensors, GPTQ / AutoRound / AWQ, GLQ) or MLX's
`quantization` selects a reader of ggquant.formats.quantized. This module sits between that reader
and the converter's data flow (ggquant.convert):

    attach_quantized(arch)   the raw packed tensors (weight_packed, qweight, scales, Qidxs, ...)
                             leave the checkpoint's tensor table; each logical weight takes their
                             place as one Tensor whose encoding is SourceQuant (ggquant.tensor):
                             its float rows are the source's exact dequantization, so the arch
                             name map, shape checks and planning treat it like a bf16 weight.
                             Weights stored padded (GLQ; auto-round model-free input widths)
                             are cropped to config.json's shapes.
    finish_plan(...)         after the normal plan (converter outtypes, llama-quantize presets,
                             --tensor-type) each quantized weight's TensorPlan gets its final type
                             and is marked exact or lossy; --exact refuses every lossy step.
    encode                   (ggquant.convert.encode.tensor_chunks) writes exact tensors by moving
                             the source's integers into GGML blocks, every chunk checked bit for
                             bit (see below), and lossy ones by dequantizing exactly and
                             quantizing (imatrix if given).

Type of a quantized weight (research note compressed-tensors-gptq-gguf-mapping.md §5, §7):
  1. a --tensor-type rule that names it: that type (exact if the values fit it, else lossy);
  2. --outtype auto (the default): the smallest GGML type that holds the values exactly (int4
     sym -> Q4_0, int4 asym / int5 -> Q5_0, int6-8 -> Q8_0, MLX affine <= 4 bit -> Q4_1, 5 bit ->
     Q5_1); act-order `down_proj` is made exact by permuting the MLP's intermediate dimension;
     otherwise F16 when F16 holds every value (int4 with bf16 scales), else requantized from the
     exact dequantization: MLX 6-bit -> Q6_K and 8-bit -> Q8_0 (chosen by measured error,
     AFFINE_LOSSY_TYPE), anything else -> Q8_0; GLQ gets a type at least one step above the layer's bpw
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

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, Keys, LlamaFileType

from ggquant.arch.base import MMPROJ, TEXT, Arch
from ggquant.arch.provenance import parameter_counts
from ggquant.arch.transforms import IDENTITY
from ggquant.convert.plan import TensorPlan
from ggquant.convert.encode import measure_sqnr, row_chunks
from ggquant.convert.plan import ALWAYS_F32, KEY_DESC, KEY_EXACT, KEY_METHOD, KEY_REQUANTIZED, fill_template
from ggquant.errors import GGQuantError
from ggquant.formats.quantized import open_quantized
from ggquant.formats.quantized.glq import GLQTensor, joint_rows
from ggquant.formats.quantized.records import (AffineQuantTensor, IntQuantTensor, NVFP4Tensor, QuantizedModel,
                                              QuantizedTensor, StackedAffineQuantTensor, StackedDequantTensor,
                                              StackedIntQuantTensor)
from ggquant.formats.safetensors import FLOAT_DTYPES
from ggquant.quant import types as qtypes
from ggquant.quant.transcode import BLOCK_TYPES, DEFAULT_CANDIDATES, FLOAT_TYPES, QK, bf16_exact, fp16_exact
from ggquant.tensor import Dense, SourceQuant, Tensor, permuted, source_quant, to_float32

T = GGMLQuantizationType
# per-tensor options (gguf-py Keys.General.TENSOR_EXTRA_NAME / TENSOR_EXTRA_PREC_A4 in llama.cpp's
# gguf-py, newer than the pinned gguf package)
KEY_EXTRA_NAME = "general.tensor_extra.name"
KEY_EXTRA_PREC_A4 = "general.tensor_extra.prec_a4"


FALLBACK_TYPE = T.Q8_0  # a non-exact integer source: ~0.5 % rel-RMSE for int4 act-order (note §7)

# MLX affine codes no GGML type holds (6 and 8 bits: 64/256 levels under a free scale and bias per
# group): the smallest type whose requantization error of mx.dequantize's values stays below MLX's
# own quantization error (rel-RMSE against the bf16 weights it quantized), measured for group
# sizes 32/64/128 on the tiny fixtures and real Gemma 3 270M weights (README, "MLX 6- and 8-bit";
# tests/quantized/test_mlx.py test_lossy_target_*): 6-bit -> Q6_K (6.56 bpw, 0.68-0.86x MLX's error;
# Q5_K/Q5_1/Q5_0 1.1-2.3x), 8-bit -> Q8_0 (8.5 bpw, 0.69-0.86x; Q6_K 1.6-2.8x).
AFFINE_LOSSY_TYPE = {6: T.Q6_K, 8: T.Q8_0}


def bits_per_weight(qtype: T) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return size * 8 / block


# =============================================================================================
# Attaching a quantized checkpoint to the converter's tensor table
# =============================================================================================


class QuantizedSource:
    """What attach_quantized did: the reader's model and the notes about what it changed."""

    def __init__(self, model: QuantizedModel, notes: list[str]):
        self.model = model
        self.notes = notes


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
    model = open_quantized(arch.raw, list(ckpt.tensors), ckpt.tensors.__getitem__, arch.dir)
    if model is None:
        return None
    notes = list(model.notes)
    dtype = _model_dtype(arch, model.consumed)
    records = {name: _crop_padded(arch, rec) for name, rec in model.tensors.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    consumed = set(model.consumed)
    # NVFP4 experts: each projection stacked on its own, as llama.cpp's converter writes them
    nvfp4 = any(isinstance(r, NVFP4Tensor) for r in records.values())
    nv_stacks = []
    for name, per_expert in arch.quantized_expert_stacks(list(records), fuse_gate_up=not nvfp4).items():
        # one module per expert -> the stacked weight the architecture names (e.g. [E, 2F, H])
        parts = [[_crop_expert(arch, name, records.pop(n)) for n in expert] for expert in per_expert]
        if nvfp4:
            records[name] = NVFP4Tensor.stack(name, [p for expert in parts for p in expert])
            shapes[name] = (len(parts), *parts[0][0].shape)
            nv_stacks.append(name)
            notes.append(f"{name}: {len(parts)} per-expert NVFP4 modules stacked")
            continue
        if all(isinstance(p, GLQTensor) for expert in parts for p in expert):
            # glq stores Gemma 4's gate_up_proj of each expert as row blocks of one matrix
            records[name] = StackedDequantTensor(name, _glq_joint_experts(name, parts))
        elif all(isinstance(p, IntQuantTensor) for expert in parts for p in expert):
            records[name] = StackedIntQuantTensor(name, parts)
        else:
            kinds = sorted({p.encoding for expert in parts for p in expert})
            raise GGQuantError(f"'{name}': stacking per-expert weights of {', '.join(kinds)} is not supported "
                               f"(integer codes and GLQ only)")
        shapes[name] = (len(parts), records[name].rows_per_expert, records[name].row_width)
        notes.append(f"{name}: {len(parts)} per-expert modules stacked")
    for name, scale_name in arch.expert_output_scales(nv_stacks).items():
        # the model's per-expert output factors, folded into the stacked experts' NVFP4 factors
        t = ckpt.tensors.get(scale_name)
        if t is None:
            continue
        if tuple(t.shape) != (records[name].shape[0],):
            raise GGQuantError(f"{t.file}: tensor '{scale_name}' has shape {list(t.shape)}; it scales the "
                               f"{records[name].shape[0]} experts of '{name}'")
        records[name] = records[name].folded(to_float32(np.asarray(t.read()), t.dtype))
        consumed.add(scale_name)
        notes.append(f"{scale_name} folded into the NVFP4 scales of {name} (as llama.cpp's converter does)")
    for name, stacks in arch.quantized_expert_concats(list(records)).items():
        # stacked experts split differently from the architecture's tensor (mlx-lm's switch_glu)
        parts = [records.pop(n) for n in stacks]
        if not all(isinstance(p, AffineQuantTensor) for p in parts):
            kinds = sorted({p.encoding for p in parts})
            raise GGQuantError(f"'{name}': concatenating stacked experts of {', '.join(kinds)} is not supported "
                               f"(MLX affine only)")
        records[name] = StackedAffineQuantTensor(name, parts)
        shapes[name] = (records[name].shape[0], records[name].rows_per_expert, records[name].row_width)
        notes.append(f"{name}: {' + '.join(stacks)}")
    weights: dict[str, Tensor] = {}
    for name, rec in records.items():
        weights[name] = source_quant(rec, dtype, [ckpt.tensors[s] for s in rec.sources if s in ckpt.tensors],
                                     shapes.get(name))
    # Rebuild the table in the converter's order: shard files in order, names sorted inside a
    # shard; a logical weight lives in the shard of its first packed tensor, so the order is the
    # one a dequantized checkpoint with the same sharding would have.
    file_of = {id(f): i for i, f in enumerate(ckpt.files)}
    groups: dict[int, dict[str, Tensor]] = {i: {} for i in range(len(ckpt.files))}
    for name, t in ckpt.tensors.items():
        if name not in consumed:
            groups[file_of[id(t.source.owner)]][name] = t
    for name, w in weights.items():
        parts = w.source.parts
        g = groups[file_of[id(parts[0].source.owner)] if parts else 0]
        if name in g:
            raise GGQuantError(f"{w.file}: tensor '{name}' is stored as a float tensor and also as the "
                               f"quantized weight made of {', '.join(_record(w).sources)}; remove one of them")
        g[name] = w
    table: dict[str, Tensor] = {}
    for i in range(len(ckpt.files)):
        for name in sorted(groups[i]):
            table[name] = groups[i][name]
    notes += _permute_act_order(table)
    ckpt.tensors = table
    return QuantizedSource(model, notes)


def _record(t: Tensor) -> QuantizedTensor | None:
    """The quantized checkpoint's record behind a tensor (None for a float tensor)."""
    return t.encoding.record if isinstance(t.encoding, SourceQuant) else None


def _crop_padded(arch: Arch, rec: QuantizedTensor) -> QuantizedTensor:
    """Weights stored padded (GLQ's legacy pow2 layouts and quantized embeddings; auto-round's
    model-free input widths) -> the model's shape."""
    if not getattr(rec, "padded", False):
        return rec
    exp = arch.expected_shapes() if hasattr(arch, "expected_shapes") else {}
    want = exp.get(arch.normalize_name(rec.name))
    if want is None or len(want[0]) != 2:
        if isinstance(rec, IntQuantTensor):  # padded only when the width was not a multiple of the group
            return rec
        raise GGQuantError(f"GLQ tensor '{rec.name}' is stored padded to {list(rec.shape)} and "
                           f"{arch.config_path.name} does not say its true shape; ggquant cannot crop it")
    if tuple(want[0]) == tuple(rec.shape):
        return rec
    return rec.cropped(*want[0])


def _glq_joint_experts(stacked: str, parts: list[list[QuantizedTensor]]) -> list[list[QuantizedTensor]]:
    """Per expert, its GLQ records, with those glq quantized jointly and stored row-split (Gemma 4's
    gate_proj + up_proj) made one record `<layer>.experts.<e>.<stacked proj>.weight`."""
    head, _, proj = stacked.rpartition(".")
    out = []
    for e, expert in enumerate(parts):
        joint = joint_rows(f"{head}.{e}.{proj}.weight", expert)
        out.append([joint] if joint is not None else expert)
    return out


def _crop_expert(arch: Arch, stacked: str, rec: QuantizedTensor) -> QuantizedTensor:
    """A per-expert module stored with its input width padded (auto-round's model-free export pads
    each expert's Linear to a multiple of the group size, e.g. 64 -> 128 at group 128) -> the width
    of the stacked weight the architecture names ([E, R, n]: n)."""
    if not getattr(rec, "padded", False):
        return rec
    want = arch.expected_shapes().get(arch.normalize_name(stacked)) if hasattr(arch, "expected_shapes") else None
    if want is None or tuple(want[0][-1:]) == tuple(rec.shape[1:]):
        return rec
    return rec.cropped(rec.shape[0], want[0][-1])


def _permute_act_order(table: dict[str, Any]) -> list[str]:
    """Act-order `down_proj` made exact by permuting the MLP intermediate dimension (note §5.4).

    down_proj columns are sorted by their quantization group (stable argsort of g_idx) and the
    rows of gate_proj and up_proj (and their biases) follow: the MLP computes the same function
    and down_proj's 32-column blocks then share one scale. Applied only where the permuted
    down_proj transcodes exactly and both producers can be permuted.
    """
    notes = []
    for name, t in list(table.items()):
        rec = _record(t)
        if rec is None or not name.endswith("down_proj.weight"):
            continue
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
        table[name] = _with_record(t, down)
        for p in producers + extras:
            table[p] = _permute_rows(table[p], perm)
        notes.append(f"{name}: act-order columns sorted by group (gate_proj/up_proj rows permuted alike), "
                     f"which makes it exact")
    return notes


def _row_permutable(t: Tensor) -> bool:
    rec = _record(t)
    if rec is not None:
        return isinstance(rec, (IntQuantTensor, AffineQuantTensor, NVFP4Tensor))
    return isinstance(t.encoding, Dense) and t.dtype in FLOAT_DTYPES and t.ndim >= 1


def _with_record(t: Tensor, rec: QuantizedTensor) -> Tensor:
    return source_quant(rec, t.dtype, t.source.parts)


def _permute_rows(t: Tensor, perm: np.ndarray) -> Tensor:
    rec = _record(t)
    return _with_record(t, rec.permuted(rows=perm)) if rec is not None else permuted(t, perm)


# =============================================================================================
# Planning
# =============================================================================================


def _float_exact(rec: QuantizedTensor, qtype: T, n_rows: int) -> str | None:
    """None if `qtype` (F32/F16/BF16) holds every dequantized value, else why not."""
    if qtype == T.F32:
        return None
    test = fp16_exact if qtype == T.F16 else bf16_exact
    bad = 0
    for a, b in row_chunks(n_rows, rec.shape[1]):
        bad += int((~test(rec.dequantize((a, b)))).sum())
    if bad:
        return f"{bad} of {n_rows * rec.shape[1]} values are not {qtype.name} values"
    return None


def _scales_fp16(w: Tensor) -> bool:
    """Cheap sufficient condition for a predicted block type: every scale (and MLX bias) is an
    fp16 value, so the packer's only data-dependent condition holds (note §5.1)."""
    rec = _record(w)
    if isinstance(rec, IntQuantTensor) and rec._perm_cols is None:
        names = [s for s in rec.sources if s.endswith(("weight_scale", ".scales"))]
    elif isinstance(rec, AffineQuantTensor):
        names = [s for s in rec.sources if s.endswith((".scales", ".biases"))]
    else:
        return False
    if not names:
        return False
    for n in names:
        src = next((s for s in w.source.parts if s.name == n), None)
        if src is None:
            return False
        if src.dtype == "F16":
            continue
        if src.dtype not in FLOAT_DTYPES or not fp16_exact(to_float32(src.read(), src.dtype)).all():
            return False
    return True


def _block_exact(w: Tensor, qtype: T, n_rows: int) -> str | None:
    """None if `qtype` (a legacy block type) carries the weight exactly, else why not."""
    rec = _record(w)
    predicted, _ = rec.expected_exact_type(DEFAULT_CANDIDATES)
    if predicted == qtype and _scales_fp16(w):
        return None
    for a, b in row_chunks(n_rows, rec.shape[1]):
        res = rec.exact_ggml_or_reason([qtype], rows=(a, b), verify=False)
        if isinstance(res, str):
            return res
    return None


def _exact_type(w: Tensor, n_rows: int) -> tuple[T | None, str]:
    """The smallest legacy block type holding the weight exactly, or (None, why not)."""
    rec = _record(w)
    if rec.shape[1] % QK:
        return None, f"rows of {rec.shape[1]} elements are not whole {QK}-element blocks"
    predicted, why = rec.expected_exact_type(DEFAULT_CANDIDATES)
    if predicted in BLOCK_TYPES:
        bad = _block_exact(w, predicted, n_rows)
        if bad is None:
            return predicted, ""
        why = bad
    if isinstance(rec, IntQuantTensor) and rec._perm_cols is not None:
        # a permuted act-order weight: only the payload can tell
        for qtype in DEFAULT_CANDIDATES:
            if _block_exact(w, qtype, n_rows) is None:
                return qtype, ""
    return None, why


def _nvfp4_exact(w: Tensor, n_rows: int) -> str | None:
    """None if an NVFP4 source repacks into GGML NVFP4 blocks (whole 64-value blocks, every fp8
    scale a UE4M3 value), else why not. Reads only the scales' rows, chunk by chunk."""
    rec = _record(w)
    predicted, why = rec.expected_exact_type([T.NVFP4])
    if predicted is None:
        return why
    for a, b in row_chunks(n_rows, rec.shape[1]):
        res = rec.exact_ggml_or_reason([T.NVFP4], rows=(a, b), verify=False)
        if isinstance(res, str):
            return res
    return None


def _check_target(w: Tensor, qtype: T, n_rows: int) -> str | None:
    if qtype == T.NVFP4 and isinstance(_record(w), NVFP4Tensor):
        return _nvfp4_exact(w, n_rows)
    if qtype in FLOAT_TYPES:
        return _float_exact(_record(w), qtype, n_rows)
    if qtype in BLOCK_TYPES:
        if w.shape[-1] % QK:
            return f"rows of {w.shape[-1]} elements are not whole {QK}-element blocks"
        return _block_exact(w, qtype, n_rows)
    return f"{qtype.name} cannot hold integer codes under a free scale per 32 columns"


def _decide(t: TensorPlan, *, auto: bool, ruled: bool) -> None:
    """Set t.qtype / t.exact / t.why for one quantized weight (rules in the module docstring)."""
    w = t.src
    perm = None if t.transform.identity else t.transform.row_permutation(t.n_outer)
    if perm is not None and _row_permutable(w):
        # a permutation of whole output rows (Llama's q/k RoPE layout): every row keeps its integer
        # codes and its column groups, so the permuted record transcodes as exactly as the original
        w = t.src = _permute_rows(w, perm)
        t.transform = IDENTITY
    rec = _record(w)
    planned = t.qtype
    if not t.transform.identity:
        t.exact = False
        t.why = f"the architecture transforms this tensor ({t.transform.label or type(t.transform).__name__})"
        if auto:
            t.qtype = FALLBACK_TYPE if t.shape[-1] % QK == 0 else T.F16
        t.reason = f"lossy: {t.why}"
        return
    n_rows = t.n_outer
    is_glq = rec.format.startswith("glq")

    def take(qtype: T, exact: bool, why: str) -> None:
        t.qtype, t.exact, t.why = qtype, exact, why
        t.reason = f"{'exact' if exact else 'lossy'}: {why}"

    if isinstance(rec, NVFP4Tensor) and not ruled:
        # llama.cpp's converter repacks every NVFP4 weight, whatever --outtype says
        # (ModelBase.prepare_tensors -> _generate_nvfp4_tensors): the same here where it can
        bad = _nvfp4_exact(w, n_rows)
        if bad is None:
            return take(T.NVFP4, True, f"{rec.encoding} -> NVFP4 (codes and fp8 scales as stored; the global "
                                       f"scale as the F32 tensor {t.name.removesuffix('.weight')}.scale)")
        if not auto:
            return take(planned, False, f"{rec.encoding} -> {planned.name}: requantized ({bad})")
        fb = FALLBACK_TYPE if t.shape[-1] % QK == 0 else T.F16
        return take(fb, False, f"{rec.encoding} -> {fb.name}: requantized from e2m1 * fp8 / global ({bad})")
    if ruled or planned in FLOAT_TYPES and not auto:
        # what the user named (a --tensor-type rule, a float --outtype): exact when the values fit
        bad = _check_target(w, planned, n_rows)
        if bad is None:
            return take(planned, True, f"{rec.encoding} -> {planned.name}")
        return take(planned, False, f"{rec.encoding} -> {planned.name}: {bad}")
    if not auto:
        # a quantized type from --outtype q8_0 or a preset: the exact type whenever the plan
        # allows as many bits per weight as the source has (same values, usually fewer bytes)
        exact, why = (None, "") if is_glq else _exact_type(w, n_rows)
        if exact is not None and rec.bits is not None and math.floor(bits_per_weight(planned)) >= rec.bits:
            note = "" if exact == planned else f" ({planned.name} planned; the {rec.bits}-bit codes are kept exactly)"
            return take(exact, True, f"{rec.encoding} -> {exact.name}{note}")
        bad = why or _check_target(w, planned, n_rows) or ""
        return take(planned, False, f"{rec.encoding} -> {planned.name}: requantized ({bad or 'lossy'})")
    # --outtype auto
    if is_glq:
        sugg = getattr(rec, "suggested_type", FALLBACK_TYPE)
        if t.shape[-1] % GGML_QUANT_SIZES[sugg][0]:
            # a K-quant for a row that is not whole super-blocks: llama-quantize's 32-element fallback
            sugg = qtypes.get(sugg).row_fallback or FALLBACK_TYPE
        if t.shape[-1] % GGML_QUANT_SIZES[sugg][0]:
            sugg = T.F16
        return take(sugg, False, f"{rec.encoding} -> {sugg.name} (no GGML type holds GLQ values; one step "
                                 f"above the layer's bpw)")
    exact, why = _exact_type(w, n_rows)
    if exact is not None:
        return take(exact, True, f"{rec.encoding} -> {exact.name}")
    if _float_exact(rec, T.F16, n_rows) is None:
        return take(T.F16, True, f"{rec.encoding} -> F16 (no block type is exact: {why})")
    lossy = lossy_type(rec, t.shape[-1])
    if lossy is not None:
        best = AFFINE_LOSSY_TYPE[rec.bits]
        note = ("the smallest type measured to stay within MLX's own quantization error" if lossy == best else
                f"{best.name}'s fallback for rows that are not whole {GGML_QUANT_SIZES[best][0]}-element blocks")
        return take(lossy, False, f"{rec.encoding} -> {lossy.name}: no exact block type ({why}); {note}")
    fb = FALLBACK_TYPE if t.shape[-1] % QK == 0 else T.F32
    return take(fb, fb == T.F32, f"{rec.encoding} -> {fb.name}: no exact block type ({why}) and F16 cannot "
                                 f"hold every value")


def lossy_type(rec: QuantizedTensor, width: int) -> T | None:
    """--outtype auto's lossy target for MLX affine codes no GGML type holds (AFFINE_LOSSY_TYPE),
    or None (the general fallback). Rows that are not whole blocks of it take llama-quantize's
    fallback type (Q6_K -> Q8_0)."""
    if not isinstance(rec, AffineQuantTensor) or rec.bits not in AFFINE_LOSSY_TYPE:
        return None
    qtype = AFFINE_LOSSY_TYPE[rec.bits]
    if width % GGML_QUANT_SIZES[qtype][0]:
        qtype = qtypes.get(qtype).row_fallback or FALLBACK_TYPE
    return qtype if width % GGML_QUANT_SIZES[qtype][0] == 0 else None


def _float_lossless(t: TensorPlan) -> str | None:
    """None if an ordinary (float source or generated) tensor is written without rounding."""
    if t.qtype == T.F32:
        return None
    if t.src is None:
        return None if t.qtype == T.F16 and np.array_equal(
            t.generated.astype(np.float16).astype(np.float32), t.generated) else f"generated -> {t.qtype.name}"
    if t.source_quant:
        return None if t.exact else t.why
    if t.qtype.name == t.src.dtype:
        return None
    if t.qtype in (T.F16, T.BF16) and t.src.dtype in FLOAT_DTYPES:
        # e.g. BF16 -> F16: exact unless a value is below fp16's normal range or beyond 65504
        test = fp16_exact if t.qtype == T.F16 else bf16_exact
        inner = max(1, math.prod(t.src.shape[1:])) if t.src.shape else 1
        bad = 0
        for a, b in row_chunks(t.n_outer, inner, t.transform.row_block):
            bad += int((~test(np.asarray(t.transform(t.src.float_rows(a, b), t.src.dtype)))).sum())
        if not bad:
            return None
        return f"{t.src.dtype} -> {t.qtype.name} rounds {bad} of {t.n_elements} values"
    return f"{t.src.dtype} -> {t.qtype.name} rounds"


def finish_plan(files: list, qsrc: QuantizedSource | None, *, auto: bool, preset, rules=(),
                exact: bool = False, outfile=None) -> None:
    """Final types of the quantized weights, their metadata, and --exact (see module docstring)."""
    for f in files:
        plans = [t for t in f.tensors if t.source_quant]
        f_auto = auto or (preset is not None and f.part == MMPROJ)
        for t in plans:
            ruled = preset is not None and f.part == TEXT and any(r.regex.search(t.name) for r in rules)
            if f.part == TEXT and any(p.match(t.name) for p in ALWAYS_F32):
                # a quantized router (mlx-lm quantizes Gemma 4's router.proj at 8 bits): F32 as
                # llama.cpp's converter and llama-quantize keep ffn_gate_inp, exact
                t.qtype, ruled = T.F32, True
            _decide(t, auto=f_auto, ruled=ruled)
        if plans and qsrc is not None:
            f.kv.string(KEY_METHOD, qsrc.model.method)
            f.kv.string(KEY_DESC, qsrc.model.description)
            f.kv.array(KEY_EXACT, [t.name for t in plans if t.exact])
            f.kv.array(KEY_REQUANTIZED, [t.name for t in plans if not t.exact])
        if plans and auto:
            _relabel(f, plans, outfile)
        _nvfp4_layout(f, outfile)
    if exact:
        lossy = [(t.name, why) for f in files for t in f.tensors if (why := _float_lossless(t)) is not None]
        quantized = {t.name for f in files for t in f.tensors if t.source_quant}
        lossy.sort(key=lambda item: item[0] not in quantized)  # the quantized weights first
        if lossy:
            more = f" (and {len(lossy) - 3} more)" if len(lossy) > 3 else ""
            raise GGQuantError("--exact: these tensors cannot be written exactly: " +
                               "; ".join(f"{n}: {w}" for n, w in lossy[:3]) + more)


def _nvfp4_layout(f, outfile=None) -> None:
    """The NVFP4 weights as llama.cpp's converter writes them: first in the file, in checkpoint
    order (stacked experts where their last module is), each followed by its companions (`.scale`:
    ModelOpt's weight_scale_2 or compressed-tensors' float32(1/global scale), per expert for
    stacked experts; `.input_scale`)
    (ModelBase.prepare_tensors runs _generate_nvfp4_tensors before any other tensor, and turns a
    float outtype's general.file_type into MOSTLY_NVFP4)."""
    nv = [t for t in f.tensors if t.source_quant and t.exact and t.qtype == T.NVFP4]
    if not nv:
        return
    before = parameter_counts((t.name, t.shape) for t in f.tensors)
    front: list[TensorPlan] = []
    for t in nv:
        front.append(t)
        for suffix, value in _record(t.src).companions():
            name = t.name.removesuffix(".weight") + suffix
            front.append(TensorPlan(name, value.shape, T.F32, f"NVFP4 {suffix[1:]} of {t.name}: the source's float32 "
                                    f"factor{'s per expert' if value.size > 1 else ''} (llama.cpp's converter)",
                                    generated=value))
    taken = {id(t) for t in nv}
    f.tensors = front + [t for t in f.tensors if id(t) not in taken]
    a16 = sorted(t.name for t in nv if _record(t.src).a16)
    if a16:
        # weight-only NVFP4 (ModelOpt W4A16_NVFP4): llama.cpp must keep float activations
        # (ModelBase._tag_prec_a4; written after general.quantization_version by ModelBase.write)
        f.kv.array(KEY_EXTRA_NAME, a16)
        f.kv.array(KEY_EXTRA_PREC_A4, [False] * len(a16))
        f.kv.move_after(Keys.General.QUANTIZATION_VERSION, [KEY_EXTRA_NAME, KEY_EXTRA_PREC_A4])
    _recount_size_label(f, before, outfile)
    if f.part == TEXT and f.kv.get(Keys.General.FILE_TYPE) in (
            int(LlamaFileType.ALL_F32), int(LlamaFileType.MOSTLY_F16), int(LlamaFileType.MOSTLY_BF16)):
        f.kv.u32(Keys.General.FILE_TYPE, int(LlamaFileType.MOSTLY_NVFP4))


def _recount_size_label(f, before: tuple[int, int, int, int], outfile) -> None:
    """general.size_label (and the default file name) counted over the tensors written, the NVFP4
    `.scale` / `.input_scale` companions included, as gguf-py's GGUFWriter.get_total_parameter_count
    counts them; a label the model card set stays."""
    old = gguf.size_label(*before)
    new = gguf.size_label(*parameter_counts((t.name, t.shape) for t in f.tensors))
    if old == new or f.kv.get(Keys.General.SIZE_LABEL) != old:
        return
    f.kv.string(Keys.General.SIZE_LABEL, new)
    out = Path(outfile) if outfile else None
    if (out is None or out.is_dir()) and f"-{old}-" in f.path.name:
        f.path = f.path.with_name(f.path.name.replace(f"-{old}-", f"-{new}-", 1))


def _relabel(f, plans: list[TensorPlan], outfile) -> None:
    """--outtype auto: general.file_type and the default file name follow the type holding most
    quantized weights (e.g. Q4_0 for a W4A16 checkpoint), not the float type of the rest."""
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
        f.path = out.parent / fill_template(out.name, label)
    f.outtype = label


def measure_lossy(conv) -> None:
    """--dry-run: the SQNR of every lossy quantized weight (what the real run reports too)."""
    for f in conv.files:
        for t in f.tensors:
            if t.source_quant and not t.exact:
                measure_sqnr(t, f.imatrix.get(t.name) if qtypes.get(t.qtype).uses_imatrix else None)
