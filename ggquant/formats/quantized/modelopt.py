"""NVIDIA ModelOpt checkpoints (TensorRT Model Optimizer's Hugging Face export): NVFP4, FP8 and
MIXED_PRECISION of the two.

Facts (the layout llama.cpp's converter reads: conversion/base.py ModelBase.prepare_tensors,
_generate_nvfp4_tensors, _nvfp4_pack and the modelopt branch of dequant_model):

hf_quant_config.json {"producer": {"name": "modelopt", "version"}, "quantization": {"quant_algo",
"group_size": 16, "exclude_modules": [...], "kv_cache_quant_algo", "quantized_layers": {module:
{"quant_algo", ...}} (MIXED_PRECISION)}}; newer exports also copy it into config.json's
quantization_config with quant_method "modelopt" (ggquant.formats.quantized.with_hf_quant_config
merges the two as the converter does).

Tensors per quantized module P (weight W [out, in]):
  NVFP4        P.weight U8 [out, in/2]: two e2m1 codes a byte, element 2i in the low nibble;
               P.weight_scale F8_E4M3 [out, in/16]; P.weight_scale_2 F32 [] (the per-tensor factor:
               w = e2m1 * fp8 * weight_scale_2); P.input_scale F32 [] with static activations.
  FP8          P.weight F8_E4M3 [out, in]; P.weight_scale F32 [] or [out] (w = fp8 * s, the
               converter's dequant_simple); P.input_scale F32 [] (dropped, as the converter does).
The converter tells them apart by the weight_scale's rank (2-D: NVFP4); k_scale / v_scale (FP8 KV
cache) are dropped.
"""

from __future__ import annotations

import numpy as np

from ggquant.errors import FormatError, GGQuantError
from ggquant.formats.quantized import HF_QUANT_CONFIG, reader
from ggquant.formats.quantized.records import (FloatQuantTensor, NVFP4Tensor, QuantizedModel, QuantizedTensor,
                                              Source, nvfp4_shape)

__all__ = ["read", "ALGOS"]

NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")  # W4A16: the same weights, activations left in float
ALGOS = NVFP4_ALGOS + ("FP8", "MIXED_PRECISION")
_WHERE = f"{HF_QUANT_CONFIG} (or config.json quantization_config)"
_DROPPED = (".input_scale", ".k_scale", ".v_scale")


def _layer_algo(mod: str, layers: dict, default) -> tuple[str | None, str | None]:
    """(quant_algo, the quantized_layers key that sets it) for a module: the entry of the module or
    of its nearest parent, else the checkpoint-wide algo (ModelBase._tag_prec_a4's lookup)."""
    name = mod
    while name:
        entry = layers.get(name)
        if isinstance(entry, dict):
            return entry.get("quant_algo"), name
        name = name.rpartition(".")[0]
    return default, None


@reader("modelopt")
def read(config: dict, src: Source, method: str) -> QuantizedModel:
    qc = config["quantization_config"]
    algo = qc.get("quant_algo")
    if algo not in ALGOS:
        raise GGQuantError(f"{_WHERE}: ModelOpt quant_algo {algo!r} is not supported; ggquant reads "
                           f"{', '.join(ALGOS)} (convert the checkpoint to bf16 first)")
    layers = qc.get("quantized_layers") or {}
    if not isinstance(layers, dict):
        raise GGQuantError(f"{_WHERE}: quantized_layers must map module names to {{\"quant_algo\": ...}}")
    for key, entry in layers.items():
        la = entry.get("quant_algo") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and la not in NVFP4_ALGOS + ("FP8",):
            raise GGQuantError(f"{_WHERE}: quantized_layers[{key!r}].quant_algo is {la!r}; ggquant reads "
                               f"{', '.join(NVFP4_ALGOS + ('FP8',))} layers")
    if algo == "MIXED_PRECISION" and not layers:
        raise GGQuantError(f"{_WHERE}: quant_algo MIXED_PRECISION without quantized_layers; ggquant cannot tell "
                           f"which layers are NVFP4 and which FP8")

    modules = [n.removesuffix(".weight_scale") for n in src.names if n.endswith(".weight_scale")]
    have = set(modules)
    for n in src.names:
        # quantized weights (fp4 bytes, fp8) or NVFP4 factors without their block scales
        mod = n.rpartition(".")[0]
        if mod in have:
            continue
        if n.endswith(".weight_scale_2") or n.endswith(".weight") and src.dtype(n) in ("U8", "F8_E4M3"):
            raise FormatError(f"ModelOpt module '{mod}' ({src.dtype(n)} '{n}'): tensor '{mod}.weight_scale' is "
                              f"missing; without it the {'fp4' if src.dtype(n) == 'U8' else 'fp8'} codes have no "
                              f"scale (the checkpoint is incomplete)")
    present = {m for n in src.names for m in _parents(n)}
    for key in layers:
        if key not in present:
            raise FormatError(f"{_WHERE}: quantized_layers entry {key!r} is not a module of the checkpoint")

    tensors: dict[str, QuantizedTensor] = {}
    consumed: set[str] = set()
    kinds: set[str] = set()
    for mod in modules:
        where = f"ModelOpt module '{mod}'"
        if f"{mod}.weight" not in src:
            raise FormatError(f"{where}: tensor '{mod}.weight' is missing (its weight_scale is there)")
        nvfp4 = len(src.shape(f"{mod}.weight_scale")) == 2
        declared, key = _layer_algo(mod, layers, algo)
        kind = "NVFP4" if nvfp4 else "FP8"
        if key is not None and (declared in NVFP4_ALGOS) != nvfp4:
            raise FormatError(f"{where} is stored as {kind} (weight_scale {list(src.shape(mod + '.weight_scale'))}) "
                              f"but {_WHERE} quantized_layers[{key!r}] says {declared}")
        rec = _nvfp4_record(mod, src, where, declared) if nvfp4 else _fp8_record(mod, src, where)
        tensors[rec.name] = rec
        consumed.update(rec.sources)
        kinds.add(declared if nvfp4 and declared in NVFP4_ALGOS else kind)
    dropped = [n for n in src.names if n.endswith(_DROPPED) and n not in consumed]
    consumed.update(dropped)
    notes = []
    if dropped:
        notes.append(f"{len(dropped)} activation / KV-cache scale tensors (input_scale of FP8 layers, k_scale, "
                     f"v_scale) are dropped, as llama.cpp's converter does")
    desc = f"modelopt {algo}" + (f" ({' + '.join(sorted(kinds))})" if algo == "MIXED_PRECISION" else "")
    return QuantizedModel("modelopt", desc, tensors, frozenset(consumed), notes, dict(qc))


def _parents(name: str):
    while name := name.rpartition(".")[0]:
        yield name


def _scalar(src: Source, name: str, where: str) -> np.float32:
    v = src.floats(name).reshape(-1)
    if v.size != 1 or not np.isfinite(v[0]):
        raise FormatError(f"{where}: '{name}' must be one finite float, got {v[:4].tolist()}")
    return np.float32(v[0])


def _nvfp4_record(mod: str, src: Source, where: str, algo) -> NVFP4Tensor:
    w_name, s_name, s2_name, in_name = (f"{mod}.{s}" for s in ("weight", "weight_scale", "weight_scale_2",
                                                                "input_scale"))
    out, n = nvfp4_shape(src, where, w_name, s_name)
    if s2_name not in src:
        # (llama.cpp's converter would take 1.0 and write weights off by ModelOpt's amax / 2688)
        raise FormatError(f"{where}: tensor '{s2_name}' (the per-tensor NVFP4 factor) is missing; ModelOpt writes "
                          f"one beside every NVFP4 weight (the checkpoint is incomplete)")
    sources = [w_name, s_name, s2_name]
    ins = None
    if in_name in src:
        ins = _scalar(src, in_name, where)
        sources.append(in_name)

    def load(rr):
        return (np.asarray(src.raw(w_name, rr)[0]).view(np.uint8), np.asarray(src.raw(s_name, rr)[0]).view(np.uint8))

    # W4A16: llama.cpp's converter tags the GGUF tensor prec_a4 = false (ModelBase._tag_prec_a4)
    return NVFP4Tensor(w_name, (out, n), f"modelopt {algo} fp4-e2m1 group16 fp8 scales", "modelopt/nvfp4",
                       tuple(sources), load, _scalar(src, s2_name, where), ins, a16=algo == "W4A16_NVFP4")


def _fp8_record(mod: str, src: Source, where: str) -> FloatQuantTensor:
    w_name, s_name = f"{mod}.weight", f"{mod}.weight_scale"
    if src.dtype(w_name) not in ("F8_E4M3", "U8"):
        raise FormatError(f"{where}: weight has dtype {src.dtype(w_name)}, expected F8_E4M3 beside its FP8 "
                          f"weight_scale of shape {list(src.shape(s_name))}")
    wshape, sshape = src.shape(w_name), src.shape(s_name)
    if len(wshape) != 2:
        raise FormatError(f"{where}: weight has shape {list(wshape)}; only 2-D weights are supported")
    out, n = wshape
    per_channel = int(np.prod(sshape)) != 1
    if per_channel and list(sshape) != [out]:
        raise FormatError(f"{where}: FP8 weight_scale has shape {list(sshape)}, expected [] (per tensor) or "
                          f"[{out}] (per channel)")

    def load(rr):
        x = np.asarray(src.raw(w_name, rr)[0]).view(np.uint8)
        s = src.floats(s_name, rr).reshape(-1, 1) if per_channel else src.floats(s_name).reshape(1, 1)
        return x, s

    return FloatQuantTensor(w_name, (out, n), f"modelopt FP8 e4m3 per-{'channel' if per_channel else 'tensor'} "
                            f"scale", "modelopt/fp8", (w_name, s_name), load)
