"""Tiny Gemma 4 (and Llama / Qwen) checkpoints in already-quantized formats, for `ggquant convert` tests.

Made from the standard tiny Gemma 4 E4B fixture (fixtures.TINY_MODELS["gemma4_e4b"]; build_gptq and
build_mlx also take another tiny text model, e.g. source="llama3"): its text Linears are quantized, every other tensor is copied unchanged, config.json gains the format's
quantization block, and the tokenizer files come along.

- `build_ct`: compressed-tensors 0.20 itself (apply_quantization_config + calculate_qparams +
  ModelCompressor.compress_model, as fixtures.quantized.build_compressed_tensors), W4A16-like:
  int sym group 32 (the tiny widths are 64/96/128, so group 128 cannot divide them), with the
  ignore list of the published Gemma 4 W4A16 checkpoints: PLE, vision, audio and lm_head stay bf16;
  optionally a second config group (MLP int8 per channel: mixed precision).
- `build_ct_moe`: the 26B-A4B-like MoE with its experts unfused into one Linear per expert and
  projection (llmcompressor's layout), every text Linear quantized by compressed-tensors: int8 per
  channel (Google's 26B-A4B QAT scheme) or int4 group 32.
- `build_auto_round_moe`: the MoE quantized by auto-round itself (RTN), model-free or through the
  loaded model, exported as auto_round / auto_gptq / auto_awq packing.
- `build_gptq`: GPTQ v1 layout hand-packed per the research note (fixtures.quantized helpers):
  qweight/qzeros/scales(F16)/g_idx, sym or asym, optionally act-order (random g_idx).
- `build_mlx`: mlx.core.quantize (affine) of the text Linears and both embeddings, mlx-lm's
  config ("quantization" with per-module overrides, e.g. an 8-bit module).
- `dequantized_copy`: the same checkpoint with every quantized weight replaced by its exact
  float32 dequantization (ggquant's reader, proven against the libraries in
  tests/quantized/test_*.py) and no quantization config: the reference for logits.

This lives under tests/ rather than fixtures/ on purpose: fixtures.cache keys every entry on a
hash of fixtures/*.py, so a new module there would rebuild every shared fixture. Entries here are
keyed on this file's own hash instead.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ggquant.fixtures import cached_build, tiny_model

SOURCE_MODEL = "gemma4_e4b"
# The published Gemma 4 W4A16 checkpoints' ignore list (per-layer embeddings, towers, lm_head).
CT_IGNORE = ["lm_head", "re:.*per_layer.*", "re:.*vision_tower.*", "re:.*audio_tower.*", "re:.*embed_vision.*",
             "re:.*embed_audio.*"]
_TEXT_LINEAR = re.compile(r"^model\.(language_model\.)?(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
                          r"|per_layer_model_projection)\.weight$")
_TOWER_LINEAR = re.compile(r"^model\.(vision_tower|audio_tower)\..*\.linear\.weight$")
_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _read_checkpoint(src: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(src / "model.safetensors"))


def _copy_side_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors"):
            shutil.copy2(p, out / p.name)


def _update_config(out: Path, **keys) -> None:
    cfg = json.loads((out / "config.json").read_text())
    for k, v in keys.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save(out: Path, sd: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))


# --- compressed-tensors -----------------------------------------------------------------------


def _build_ct(out: Path, num_bits: int, group_size: int, symmetric: bool, mlp_int8: bool, digest: str,
              source: str = SOURCE_MODEL) -> Path:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    src = tiny_model(source)
    sd = _read_checkpoint(src)
    linears = {k[: -len(".weight")]: v.float().numpy() for k, v in sd.items()
               if _TEXT_LINEAR.match(k) or _TOWER_LINEAR.match(k) or "per_layer_input_gate" in k
               or "per_layer_projection.weight" in k}
    groups = {}
    if mlp_int8:  # mixed precision (llama.cpp refuses several config groups): MLP int8 per channel
        groups["group_1"] = QuantizationScheme(targets=["re:.*mlp.*"], weights=QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="channel"))
    groups["group_0"] = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=num_bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size))
    return _ct_quantize(src, out, sd, linears, groups, CT_IGNORE)


def _ct_quantize(src: Path, out: Path, sd: dict, linears: dict, groups: dict, ignore: list,
                 observe=None) -> Path:
    """Quantize `linears` (name -> float32 [out, in]) with compressed-tensors itself
    (apply_quantization_config + calculate_qparams + ModelCompressor.compress_model), replace
    their weights in the state dict `sd` by the compressed tensors and write the checkpoint.
    `observe(module, weight_args)` sets the quantization parameters (default: min/max)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    from ggquant.fixtures.quantized import _module_tree, _observe

    model = _module_tree(linears, torch.bfloat16)
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=ignore))
    quantized = []
    for name, mod in model.named_modules():
        s = getattr(mod, "quantization_scheme", None)
        if s is not None and s.weights is not None:
            (observe or _observe)(mod, s.weights)
            quantized.append(name)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    state = model.state_dict()
    for mod in quantized:
        del sd[f"{mod}.weight"]
        for k, v in state.items():
            if k.startswith(mod + ".") and not k.endswith(".weight"):
                sd[k] = v
    _copy_side_files(src, out)
    _save(out, sd)
    comp.update_config(str(out))
    return out


def build_ct(num_bits: int = 4, group_size: int = 32, symmetric: bool = True, mlp_int8: bool = False,
             source: str = SOURCE_MODEL) -> Path:
    """source: another tiny Gemma 4 (e.g. gemma4_31b for a 31B-like QAT W4A16 checkpoint)."""
    extra = {} if source == SOURCE_MODEL else {"source": source}
    return cached_build("gemma4_ct", _build_ct, num_bits=num_bits, group_size=group_size, symmetric=symmetric,
                        mlp_int8=mlp_int8, digest=_DIGEST, **extra)


# --- NVFP4 (compressed-tensors nvfp4-pack-quantized) --------------------------------------------

NVFP4_MODEL = "gemma4_31b"  # every text Linear's input width (64, 128, 256) is whole 64-value GGML blocks
NVFP4_INPUT_AMAX = 8.0  # the activation range the W4A4 fixture's input global scales pretend to be calibrated on


def _observe_nvfp4(module, args) -> None:
    """llmcompressor's NVFP4 calibration from min/max: the per-tensor global scale first
    (generate_gparam: 448 * 6 / amax), then the fp8 group scales under it (calculate_qparams
    with global_scale), as its observers do for strategy tensor_group."""
    import torch
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    w = module.weight.data.float()
    g = generate_gparam(w.amin().reshape(1), w.amax().reshape(1))
    grp = w.reshape(w.shape[0], -1, args.group_size)
    dt = module.weight.dtype
    scale, _ = calculate_qparams(grp.amin(-1).to(dt), grp.amax(-1).to(dt), args, global_scale=g)
    with torch.no_grad():
        module.weight_global_scale.data.copy_(g.reshape(module.weight_global_scale.shape))
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "input_global_scale"):  # static activations (NVFP4 W4A4): as if calibrated on |x| <= 8
            gi = generate_gparam(torch.full((1,), -NVFP4_INPUT_AMAX), torch.full((1,), NVFP4_INPUT_AMAX))
            module.input_global_scale.data.copy_(gi.reshape(module.input_global_scale.shape))


def _build_ct_nvfp4(out: Path, scheme: str, digest: str, source: str = NVFP4_MODEL) -> Path:
    from compressed_tensors.quantization import preset_name_to_scheme

    src = tiny_model(source)
    sd = _read_checkpoint(src)
    linears = {k[: -len(".weight")]: v.float().numpy() for k, v in sd.items() if _TEXT_LINEAR.match(k)}
    groups = {"group_0": preset_name_to_scheme(scheme, ["Linear"])}
    return _ct_quantize(src, out, sd, linears, groups, CT_IGNORE, observe=_observe_nvfp4)


def build_ct_nvfp4(scheme: str = "NVFP4A16", source: str = NVFP4_MODEL) -> Path:
    """A 31B-like Gemma 4 whose text Linears compressed-tensors quantized to NVFP4
    (nvfp4-pack-quantized: fp4 e2m1 codes, fp8 e4m3 scale per 16 values, float32 global scale).
    scheme "NVFP4" adds static input global scales (W4A4); source: another tiny Gemma 4 (the
    E4B-like one has 96-wide down_proj rows, not whole 64-value GGML blocks)."""
    extra = {} if source == NVFP4_MODEL else {"source": source}
    return cached_build("gemma4_ct_nvfp4", _build_ct_nvfp4, scheme=scheme, digest=_DIGEST, **extra)


# --- a mixture of experts (26B-A4B-like) with per-expert modules --------------------------------

MOE_MODEL = "gemma4_a4b"
_FUSED_EXPERTS = re.compile(r"^(?P<layer>.*layers\.\d+\.)experts\.(?P<proj>gate_up_proj|down_proj)$")
_EXPERT_LINEAR = re.compile(r"^(?P<layer>.*layers\.\d+\.)experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                            r"\.weight$")


def unfuse_experts(sd: dict) -> dict:
    """Gemma 4's fused experts (gate_up_proj [E, 2F, H], down_proj [E, H, F]) as one Linear per
    expert and projection (experts.<e>.{gate,up,down}_proj.weight), the layout llmcompressor's MoE
    calibration modules save and vLLM loads."""
    out = {}
    for k, v in sd.items():
        m = _FUSED_EXPERTS.match(k)
        if m is None:
            out[k] = v
            continue
        for e in range(v.shape[0]):
            if m["proj"] == "gate_up_proj":
                f = v.shape[1] // 2
                out[f"{m['layer']}experts.{e}.gate_proj.weight"] = v[e, :f].clone()
                out[f"{m['layer']}experts.{e}.up_proj.weight"] = v[e, f:].clone()
            else:
                out[f"{m['layer']}experts.{e}.down_proj.weight"] = v[e].clone()
    return out


def fuse_experts(sd: dict) -> dict:
    """The inverse of unfuse_experts."""
    import torch

    out, per = {}, {}
    for k, v in sd.items():
        m = _EXPERT_LINEAR.match(k)
        if m is None:
            out[k] = v
        else:
            per.setdefault(m["layer"], {}).setdefault(m["proj"], {})[int(m["e"])] = v
    for layer, p in per.items():
        n = len(p["down_proj"])
        out[layer + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([p["gate_proj"][e], p["up_proj"][e]]) for e in range(n)])
        out[layer + "experts.down_proj"] = torch.stack([p["down_proj"][e] for e in range(n)])
    return out


def _build_ct_moe(out: Path, num_bits: int, group_size: int, digest: str) -> Path:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    src = tiny_model(MOE_MODEL)
    sd = unfuse_experts(_read_checkpoint(src))
    linears = {k[: -len(".weight")]: v.float().numpy() for k, v in sd.items()
               if _TEXT_LINEAR.match(k) or _EXPERT_LINEAR.match(k)}
    strategy = dict(strategy="channel") if group_size == -1 else dict(strategy="group", group_size=group_size)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=num_bits, type="int", symmetric=True, **strategy))}
    return _ct_quantize(src, out, sd, linears, groups, CT_IGNORE + ["re:.*router.*"])


def build_ct_moe(num_bits: int = 8, group_size: int = -1) -> Path:
    """26B-A4B-like, every text Linear and every expert quantized by compressed-tensors: int8 per
    channel weight-only (Google's 26B-A4B QAT scheme) by default, or int4 group 32 (W4A16)."""
    return cached_build("gemma4_ct_moe", _build_ct_moe, num_bits=num_bits, group_size=group_size, digest=_DIGEST)


# --- GPTQ (hand-packed) ------------------------------------------------------------------------


def _build_gptq(out: Path, bits: int, group_size: int, sym: bool, act_order: bool, seed: int, fp16_scales: bool,
                digest: str, source: str = SOURCE_MODEL) -> Path:
    import torch

    from ggquant.fixtures.quantized import _asym_codes, _sym_codes, pack_bits_rows

    src = tiny_model(source)
    sd = _read_checkpoint(src)
    if source == MOE_MODEL:  # one Linear per expert, as GPTQModel writes a mixture of experts
        sd = unfuse_experts(sd)
    rng = np.random.default_rng(seed)
    for key in [k for k in sd if (_TEXT_LINEAR.match(k) or _EXPERT_LINEAR.match(k)) and "per_layer" not in k]:
        mod = key[: -len(".weight")]
        w = sd.pop(key).float().numpy()
        R, n = w.shape
        G = n // group_size
        g_idx = (rng.permutation(n) // group_size if act_order else np.arange(n) // group_size).astype(np.int32)
        if sym:
            qs, s = _sym_codes(w, bits, g_idx, G, "float16")
            q, z = qs + (1 << (bits - 1)), np.full((R, G), 1 << (bits - 1), dtype=np.int16)
        else:
            q, z, s = _asym_codes(w, bits, g_idx, G, "float16")
        if fp16_scales:  # scales using all 11 fp16 bits (bf16 weights give 8): products no longer fit F16
            s = (s * (1 + rng.integers(1, 8, s.shape) / 1024)).astype(np.float16).astype(np.float32)
        qweight = pack_bits_rows(q.astype(np.uint32), bits).view(np.uint32).T.copy()  # [in*bits/32, out]
        per = 32 // bits  # GPTQ v1: zero - 1, summed arithmetically into each word
        words = np.zeros((G, R * bits // 32), dtype=np.int64)
        zt = z.T.astype(np.int64)
        for j in range(per):
            words += (zt[:, j::per] - 1) << (bits * j)
        sd[f"{mod}.qweight"] = torch.from_numpy(qweight.view(np.int32))
        sd[f"{mod}.qzeros"] = torch.from_numpy((words & 0xFFFFFFFF).astype(np.uint32).view(np.int32))
        sd[f"{mod}.scales"] = torch.from_numpy(s.T.astype(np.float16))
        sd[f"{mod}.g_idx"] = torch.from_numpy(g_idx)
    _copy_side_files(src, out)
    _save(out, sd)
    _update_config(out, quantization_config={"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                             "sym": sym, "desc_act": act_order, "format": "gptq",
                                             "damp_percent": 0.01, "true_sequential": True})
    return out


def build_gptq(bits: int = 4, group_size: int = 32, sym: bool = True, act_order: bool = False, seed: int = 11,
               fp16_scales: bool = False, source: str = SOURCE_MODEL) -> Path:
    """source: MOE_MODEL for the 26B-A4B-like model with one GPTQ Linear per expert."""
    extra = {} if source == SOURCE_MODEL else {"source": source}
    return cached_build(f"{source.split('_')[0]}_gptq", _build_gptq, bits=bits, group_size=group_size, sym=sym,
                        act_order=act_order, seed=seed, fp16_scales=fp16_scales, digest=_DIGEST, **extra)


# --- AutoRound (auto-round itself, RTN) on the mixture of experts ------------------------------

# How auto-round is driven. "model_free": a checkpoint path with iters=0 and disable_opt_rtn=True
# (auto-round 0.16 routes that to its ModelFreeCompressor: the fused 3-D experts split into one
# Linear per expert, every Linear of the decoder quantized, the router included; input widths
# padded with zeros to a multiple of the group size). "model": the loaded Gemma4 model object
# (the regular compressor: its MoE preparation unfuses Gemma4TextExperts into per-expert Linears;
# a Linear whose output width is not a multiple of 32, here the 12-expert router, is skipped and
# kept in bf16 with an extra_config entry of bits 16).
AUTO_ROUND_ROUTES = ("model_free", "model")


def _build_auto_round_moe(out: Path, route: str, fmt: str, sym: bool, group_size: int, autoround_version: str,
                          digest: str) -> Path:
    import tempfile

    from auto_round import AutoRound

    src = tiny_model(MOE_MODEL)
    opts = dict(scheme="W4A16", bits=4, group_size=group_size, sym=sym, iters=0, disable_opt_rtn=True)
    if route == "model_free":
        ar = AutoRound(str(src), model_free=True, enable_torch_compile=False, **opts)
    elif route == "model":
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        # (a path would take auto-round's multimodal loader, which needs torchvision for
        # Gemma4VideoProcessor; the model object goes through the same compressor)
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16)
        ar = AutoRound(model, tokenizer=AutoTokenizer.from_pretrained(src), **opts)
    else:
        raise ValueError(f"route must be one of {AUTO_ROUND_ROUTES}, got {route!r}")
    with tempfile.TemporaryDirectory() as tmp:
        ar.quantize_and_save(tmp, format=fmt)
        produced = list(Path(tmp).rglob("config.json"))
        if len(produced) != 1:
            raise RuntimeError(f"auto-round wrote {len(produced)} config.json files for {route} {fmt}")
        shutil.copytree(produced[0].parent, out, ignore=shutil.ignore_patterns(".cache"))
    return out


def build_auto_round_moe(route: str = "model_free", fmt: str = "auto_round", sym: bool = True,
                         group_size: int = 32) -> Path:
    """The 26B-A4B-like model quantized by auto-round itself (RTN: iters=0, W4A16) along `route`
    (AUTO_ROUND_ROUTES) and exported in `fmt`; keyed on the installed auto-round version."""
    import auto_round

    return cached_build("gemma4_auto_round_moe", _build_auto_round_moe, route=route, fmt=fmt, sym=sym,
                        group_size=group_size, autoround_version=auto_round.__version__, digest=_DIGEST)


# --- GLQ (glq 0.8.16, GPL-3.0: imported by this test fixture only) --------------------------------

# Layer 0's Linears with every bpw of 2..8 once; the other layers stay bf16.
GLQ_BPW = {"self_attn.q_proj": 2, "self_attn.k_proj": 3, "self_attn.v_proj": 4, "self_attn.o_proj": 5,
           "mlp.gate_proj": 6, "mlp.up_proj": 7, "mlp.down_proj": 8}


def _build_glq(out: Path, layer: int, digest: str) -> Path:
    import torch
    from glq.codebook import E8ShellCodebook
    from glq.quantize_model import quantize_layer_e8_shell_rht

    # glq's paired residual scale search for the 8-bit stage is slow and unseeded; pinned as in
    # fixtures.quantized.build_glq (the decoder reads the stored scales).
    cb = E8ShellCodebook.build(verbose=False)
    cb.compute_paired_resid_scale = lambda secondary, *args, **kwargs: 2.0  # this instance only
    src = tiny_model(SOURCE_MODEL)
    sd = _read_checkpoint(src)
    layer_bpw = {}
    for sub, bpw in GLQ_BPW.items():
        mod = f"model.language_model.layers.{layer}.{sub}"
        w = sd.pop(f"{mod}.weight").float()
        _, art, _ = quantize_layer_e8_shell_rht(w, torch.eye(w.shape[1]), cb, bpw=bpw)
        sd.update({f"{mod}.{k}": v for k, v in art.items()})
        layer_bpw[mod] = bpw
    _copy_side_files(src, out)
    _save(out, sd)
    _update_config(out, quantization_config={"quant_method": "glq", "codebook": "e8_shell", "block_diagonal": True,
                                             "codesz": 8, "bpw": 5, "layer_bpw": layer_bpw})
    return out


def build_glq(layer: int = 0) -> Path:
    return cached_build("gemma4_glq", _build_glq, layer=layer, digest=_DIGEST)


# glq 0.8.16 on Gemma 4's experts (quantize_model.quantize, the `is_gemma4` branch): every expert's
# gate_up_proj [2F, H] is quantized as ONE matrix (one SU/SV/Wscale), then its row artifacts
# (Qidxs*, SU) are split at F into experts.<e>.gate_proj / up_proj and the shared ones (SV, Wscale,
# inv_resid_scale*) duplicated (_split_gate_up_arts); down_proj per expert; the router stays bf16.
_GLQ_ROW_ARTS = ("Qidxs", "Qidxs2", "Qidxs3", "Qidxs4", "SU")


def _build_glq_moe(out: Path, layer: int, bpw: int, digest: str) -> Path:
    import torch
    from glq.codebook import E8ShellCodebook
    from glq.quantize_model import quantize_layer_e8_shell_rht

    cb = E8ShellCodebook.build(verbose=False)
    src = tiny_model(MOE_MODEL)
    sd = _read_checkpoint(src)
    p = f"model.language_model.layers.{layer}.experts."
    gate_up, down = sd.pop(p + "gate_up_proj").float(), sd.pop(p + "down_proj").float()
    F = gate_up.shape[1] // 2
    layer_bpw, oracle = {}, {}
    for e in range(gate_up.shape[0]):
        w_hat, art, _ = quantize_layer_e8_shell_rht(gate_up[e], torch.eye(gate_up.shape[2]), cb, bpw=bpw)
        oracle[f"{p}{e}.gate_up_proj"] = w_hat.float().numpy()
        for proj, rows in (("gate_proj", slice(0, F)), ("up_proj", slice(F, 2 * F))):
            sd.update({f"{p}{e}.{proj}.{k}": (v[rows] if k in _GLQ_ROW_ARTS else v).clone() for k, v in art.items()})
            layer_bpw[f"{p}{e}.{proj}"] = bpw
        w_hat, art, _ = quantize_layer_e8_shell_rht(down[e], torch.eye(down.shape[2]), cb, bpw=bpw)
        oracle[f"{p}{e}.down_proj"] = w_hat.float().numpy()
        sd.update({f"{p}{e}.down_proj.{k}": v for k, v in art.items()})
        layer_bpw[f"{p}{e}.down_proj"] = bpw
    _copy_side_files(src, out)
    _save(out, sd)
    np.savez(out / "oracle.npz", **oracle)  # glq's own reconstruction (W_hat) of every quantized matrix
    _update_config(out, quantization_config={"quant_method": "glq", "codebook": "e8_shell", "block_diagonal": True,
                                             "codesz": 8, "bpw": bpw, "layer_bpw": layer_bpw})
    return out


def build_glq_moe(layer: int = 0, bpw: int = 2) -> Path:
    """The 26B-A4B-like model with layer `layer`'s experts in glq's Gemma 4 expert layout (above),
    quantized by glq's own per-layer function (identity Hessian); every other tensor bf16.
    oracle.npz: glq's reconstruction of each expert's gate_up_proj [2F, H] and down_proj."""
    return cached_build("gemma4_glq_moe", _build_glq_moe, layer=layer, bpw=bpw, digest=_DIGEST)


# --- MLX affine --------------------------------------------------------------------------------


def _build_mlx(out: Path, bits: int, group_size: int, overrides: dict, digest: str, source: str = SOURCE_MODEL) -> Path:
    import mlx.core as mx

    src = tiny_model(source)
    out.mkdir(parents=True, exist_ok=True)
    tensors = mx.load(str(src / "model.safetensors"))
    quant: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    embeds = ("model.language_model.embed_tokens.weight", "model.language_model.embed_tokens_per_layer.weight",
              "model.embed_tokens.weight")
    for key in sorted(tensors):
        if not (_TEXT_LINEAR.match(key) or key in embeds):
            continue
        mod = key[: -len(".weight")]
        o = overrides.get(mod, {})
        b, g = o.get("bits", bits), o.get("group_size", group_size)
        wq, scales, biases = mx.quantize(tensors[key], group_size=g, bits=b, mode="affine")
        tensors.update({key: wq, f"{mod}.scales": scales, f"{mod}.biases": biases})
        if o:
            quant[mod] = {"group_size": g, "bits": b}
    mx.eval(tensors)
    _copy_side_files(src, out)
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    _update_config(out, quantization=quant, quantization_config=quant)
    return out


def build_mlx(bits: int = 4, group_size: int = 32, overrides: dict | None = None, source: str = SOURCE_MODEL) -> Path:
    extra = {} if source == SOURCE_MODEL else {"source": source}
    return cached_build(f"{source.split('_')[0]}_mlx", _build_mlx, bits=bits, group_size=group_size,
                        overrides=overrides or {}, digest=_DIGEST, **extra)


# --- the dequantized reference -------------------------------------------------------------------


def _dequantized_copy(out: Path, qdir: str, digest: str) -> Path:
    import torch
    from safetensors import safe_open

    from ggquant.formats.quantized import open_quantized
    from ggquant.formats.quantized.records import torch_to_numpy

    qdir_p = Path(qdir)
    cfg = json.loads((qdir_p / "config.json").read_text())
    f = safe_open(str(qdir_p / "model.safetensors"), "pt")
    names = list(f.keys())
    model = open_quantized(cfg, names, lambda n: torch_to_numpy(f.get_tensor(n))[0])
    sd = {n: f.get_tensor(n) for n in names if n not in model.consumed}
    for rec in model:
        sd[rec.name] = torch.from_numpy(np.ascontiguousarray(rec.dequantize()))
    _copy_side_files(qdir_p, out)
    _save(out, fuse_experts(sd))  # per-expert modules back in the architecture's fused layout
    _update_config(out, quantization_config=None, quantization=None)
    return out


def dequantized_copy(qdir: Path) -> Path:
    """`qdir` with every quantized weight replaced by its exact float32 dequantization."""
    return cached_build(Path(qdir).name + "_f32", _dequantized_copy, qdir=str(qdir), digest=_DIGEST)
