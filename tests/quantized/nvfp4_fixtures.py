"""NVFP4 checkpoints beyond compressed-tensors' dense ones: NVIDIA ModelOpt's layout, and a
26B-A4B-like mixture of experts with one NVFP4 Linear per expert (both layouts).

ModelOpt (nvidia-modelopt is not a dependency; the layout is the one llama.cpp's converter reads,
conversion/base.py ModelBase.prepare_tensors / _generate_nvfp4_tensors / dequant_model, checked
against nvidia-modelopt 0.47.0's export code, read from its wheel: torch/export/unified_export_hf.py
writes hf_quant_config.json and copies it into config.json through convert_hf_config.py
convert_hf_quant_config_format; layer_utils.py / moe_utils.py unfuse Gemma 4's experts into
experts.<E>.{gate,up,down}_proj modules):
  hf_quant_config.json  {"producer": {"name": "modelopt", "version"}, "quantization": {"quant_algo":
                        "NVFP4" | "W4A16_NVFP4" | "MIXED_PRECISION", "group_size": 16,
                        "exclude_modules": [...], "quantized_layers": {module: {"quant_algo"}}}}
  config.json           quantization_config {"config_groups", "ignore", "quant_algo", "producer",
                        "quant_method": "modelopt" (+ "quantized_layers" for MIXED_PRECISION)}
  <m>.weight            U8 [out, in/2]: two e2m1 codes a byte, element 2i in the low nibble
  <m>.weight_scale      F8_E4M3 [out, in/16]
  <m>.weight_scale_2    F32 []: the per-tensor factor, w = e2m1 * fp8 * weight_scale_2
  <m>.input_scale       F32 []: the activation scale (W4A4)
  FP8 modules (MIXED_PRECISION): <m>.weight F8_E4M3 [out, in], <m>.weight_scale F32 [] (w = fp8 * s),
  <m>.input_scale F32 [].
The NVFP4 modules are compressed-tensors' own quantization (tests/quantized/gemma4_quantized) with
the names ModelOpt uses: weight_packed -> weight, weight_global_scale g -> weight_scale_2 = 1/g
(float32), input_global_scale -> input_scale = 1/g: ModelOpt's weight_scale_2 is amax / (6 * 448),
compressed-tensors' global scale its reciprocal 6 * 448 / amax, the fp8 and e2m1 codes the same.

The MoE source is the tiny 26B-A4B-like Gemma 4 with its MLP widths doubled (intermediate 96 ->
128, expert 32 -> 64) so every expert row is whole 64-value GGML NVFP4 blocks; its router
per_expert_scale stays random, which llama.cpp folds into each expert's down_proj scale.

Entries are keyed on this file's hash (and gemma4_quantized's, whose builders they reuse).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ggquant.fixtures import cached_build, tiny_model
from tests.quantized import gemma4_quantized as G

MODELOPT_VERSION = "0.37.0"  # written as producer.version; nothing reads it
_DIGEST = hashlib.sha256(Path(__file__).read_bytes() + Path(G.__file__).read_bytes()).hexdigest()[:12]
# What ModelOpt's export leaves unquantized in a Gemma 4 (towers, embeddings, lm_head, router).
MODELOPT_EXCLUDE = ["lm_head", "model.vision_tower*", "model.audio_tower*", "model.embed_vision*",
                    "model.embed_audio*", "*router*"]
MOE_WIDTHS = {"intermediate_size": 128, "moe_intermediate_size": 64}


def _load(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _group(algo: str) -> dict:
    """One config group of config.json's quantization_config (convert_hf_config._quant_algo_to_group_config)."""
    if algo == "FP8":
        return {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "float"}}
    w = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    return {"weights": w} if algo == "W4A16_NVFP4" else {"input_activations": dict(w), "weights": w}


def _hf_quant_config(out: Path, quantization: dict) -> None:
    """hf_quant_config.json, and its copy in config.json as ModelOpt's export writes both."""
    producer = {"name": "modelopt", "version": MODELOPT_VERSION}
    quantization = {"kv_cache_quant_algo": None, "exclude_modules": MODELOPT_EXCLUDE, **quantization}
    (out / "hf_quant_config.json").write_text(json.dumps({"producer": producer, "quantization": quantization},
                                                         indent=4) + "\n")
    algo, layers = quantization["quant_algo"], quantization.get("quantized_layers")
    if layers:
        by_algo: dict = {}
        for name, entry in layers.items():
            by_algo.setdefault(entry["quant_algo"], []).append(name)
        groups = {f"group_{i}": {**_group(a), "targets": sorted(names)} for i, (a, names) in enumerate(by_algo.items())}
    else:
        groups = {"group_0": {**_group(algo), "targets": ["Linear"]}}
    qc = {"config_groups": groups, **({"quantized_layers": layers} if layers else {}), "ignore": MODELOPT_EXCLUDE,
          "quant_algo": algo, "producer": producer, "quant_method": "modelopt"}
    G._update_config(out, quantization_config=qc)


def ct_to_modelopt_names(sd: dict) -> dict:
    """A compressed-tensors NVFP4 state dict under ModelOpt's names and scale conventions."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight_packed"):
            out[k.removesuffix("_packed")] = v
        elif k.endswith(".weight_global_scale"):
            out[k.removesuffix(".weight_global_scale") + ".weight_scale_2"] = (1.0 / v.float()).reshape(())
        elif k.endswith(".input_global_scale"):
            out[k.removesuffix(".input_global_scale") + ".input_scale"] = (1.0 / v.float()).reshape(())
        else:
            out[k] = v
    return out


def _fp8_per_tensor(w) -> tuple:
    """ModelOpt's FP8 weight quantization: one float32 scale amax / 448, e4m3 codes of w / scale."""
    import torch

    w = w.float()
    s = (w.abs().amax() / 448.0).to(torch.float32)
    return (w / s).to(torch.float8_e4m3fn), s.reshape(())


def _build_modelopt(out: Path, algo: str, source: str, fp8: str, digest: str) -> Path:
    """ModelOpt NVFP4 from the compressed-tensors NVFP4 fixture (scheme NVFP4 = W4A4 with input
    scales for algo NVFP4, NVFP4A16 for W4A16_NVFP4); MIXED_PRECISION: modules matching the regex
    `fp8` are FP8 (per-tensor scale) instead, and hf_quant_config lists every quantized layer."""
    import re

    import torch

    ct = G.build_ct_nvfp4("NVFP4A16" if algo == "W4A16_NVFP4" else "NVFP4", source)
    sd = ct_to_modelopt_names(_load(ct))
    quantization: dict = {"quant_algo": algo, "group_size": 16}
    if algo == "MIXED_PRECISION":
        orig = _load(tiny_model(source))
        layers = {}
        for k in sorted(sd):
            if not k.endswith(".weight_scale"):
                continue
            mod = k.removesuffix(".weight_scale")
            if re.search(fp8, mod):
                w8, s = _fp8_per_tensor(orig[mod + ".weight"])
                sd[mod + ".weight"], sd[mod + ".weight_scale"] = w8, s
                sd.pop(mod + ".weight_scale_2")
                sd[mod + ".input_scale"] = torch.tensor(G.NVFP4_INPUT_AMAX / 448.0, dtype=torch.float32)
                layers[mod] = {"quant_algo": "FP8"}
            else:
                layers[mod] = {"quant_algo": "NVFP4", "group_size": 16}
        quantization["quantized_layers"] = layers
    G._copy_side_files(ct, out)
    _hf_quant_config(out, quantization)
    G._save(out, sd)
    return out


def build_modelopt_nvfp4(algo: str = "NVFP4", source: str = G.NVFP4_MODEL, fp8: str = "") -> Path:
    """A tiny model (31B-like Gemma 4 or Llama 3) in ModelOpt's NVFP4 layout; see _build_modelopt."""
    return cached_build(f"modelopt_nvfp4_{source}", _build_modelopt, algo=algo, source=source, fp8=fp8,
                        digest=_DIGEST)


# --- the mixture of experts ----------------------------------------------------------------------


def _build_moe_source(out: Path, digest: str) -> Path:
    """gemma4_a4b with MOE_WIDTHS: the MLP and expert weights drawn again at the new widths (normal,
    each with its old standard deviation, fixed seed), everything else as it was."""
    import torch

    src = tiny_model(G.MOE_MODEL)
    cfg = json.loads((src / "config.json").read_text())
    old = {k: cfg["text_config"][k] for k in MOE_WIDTHS}
    cfg["text_config"].update(MOE_WIDTHS)
    G._copy_side_files(src, out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    rng = np.random.default_rng(12)
    sd = {}
    for k, v in _load(src).items():
        shape = list(v.shape)
        if k.startswith("model.language_model.") and (".mlp." in k or ".experts." in k):
            width = "moe_intermediate_size" if ".experts." in k else "intermediate_size"
            if k.endswith(("gate_proj.weight", "up_proj.weight", "gate_up_proj")):
                shape[-2] = shape[-2] // old[width] * MOE_WIDTHS[width]  # gate_up_proj: 2F rows
            else:
                shape[-1] = MOE_WIDTHS[width]
            std = float(v.float().std())
            v = torch.from_numpy(rng.normal(0, std, shape).astype(np.float32)).to(v.dtype)
        sd[k] = v
    G._save(out, sd)
    return out


def moe_source() -> Path:
    return cached_build("gemma4_moe64", _build_moe_source, digest=_DIGEST)


def _build_ct_nvfp4_moe(out: Path, scheme: str, digest: str) -> Path:
    from compressed_tensors.quantization import preset_name_to_scheme

    src = moe_source()
    sd = G.unfuse_experts(_load(src))
    linears = {k.removesuffix(".weight"): v.float().numpy() for k, v in sd.items()
               if G._TEXT_LINEAR.match(k) or G._EXPERT_LINEAR.match(k)}
    groups = {"group_0": preset_name_to_scheme(scheme, ["Linear"])}
    return G._ct_quantize(src, out, sd, linears, groups, G.CT_IGNORE + ["re:.*router.*"], observe=G._observe_nvfp4)


def build_ct_nvfp4_moe(scheme: str = "NVFP4") -> Path:
    """The 26B-A4B-like MoE, every text Linear and every expert NVFP4 by compressed-tensors."""
    return cached_build("gemma4_ct_nvfp4_moe", _build_ct_nvfp4_moe, scheme=scheme, digest=_DIGEST)


def _build_modelopt_moe(out: Path, digest: str) -> Path:
    ct = build_ct_nvfp4_moe("NVFP4")
    G._copy_side_files(ct, out)
    _hf_quant_config(out, {"quant_algo": "NVFP4", "group_size": 16})
    G._save(out, ct_to_modelopt_names(_load(ct)))
    return out


def build_modelopt_nvfp4_moe() -> Path:
    """The 26B-A4B-like MoE in ModelOpt's NVFP4 layout (per-expert modules, W4A4 input scales)."""
    return cached_build("modelopt_nvfp4_moe", _build_modelopt_moe, digest=_DIGEST)
