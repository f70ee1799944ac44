"""Gemma 4 (Gemma4ForConditionalGeneration, Gemma4ForCausalLM): text decoder + mmproj towers.

Text (llama.cpp conversion/gemma.py Gemma4Model, a Gemma3Model without the norm shift):
- per-layer embeddings (PLE): `per_layer_token_embd` [n_vocab, n_layer*P], a projection from
  the hidden state and its norm; per layer `inp_gate`, `proj`, `post_norm`;
- KV sharing: the last `num_kv_shared_layers` layers have no k/v of their own;
- sliding layers use `head_dim`, full layers `global_head_dim` (or per_layer_config);
- proportional RoPE on full layers, expressed as the generated `rope_freqs` tensor;
- `layer_scalar` (a [1] buffer) -> `blk.N.layer_output_scale.weight`;
- the double-wide MLP on KV-shared layers -> a per-layer feed_forward_length array.

mmproj (Gemma4VisionAudioModel, general.architecture = clip): the vision tower (gemma4v) and the
audio conformer (gemma4a), with the converter's reshapes, F32-forced tensors and softplus of
the audio `per_dim_scale`.

Read back (runtime/models/gemma4.py and `convert --to hf`): Gemma4Hparams decodes the GGUF keys
as llama.cpp's src/models/gemma4.cpp loads them, the KV reuse map included.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, Keys, TokenType

from ggquant.arch import register
from ggquant.arch import vocab as V
from ggquant.arch.base import (FULL, MMPROJ, SLIDING, TEXT, Arch, GGUFFacts, Rule, TextHparams, expert_counts,
                               f32_value, hf_token_ids, token_ids_by_text)
from ggquant.formats.gguf import KV
from ggquant.formats.hf_folder import read_json
from ggquant.arch.gemma3 import DECODER_GLOBAL, DECODER_LAYER, Gemma3
from ggquant.arch.transforms import IDENTITY, SCALAR_TO_1D, Reshape, Softplus, Transform
from ggquant.errors import GGQuantError
from ggquant.tensor import Tensor

T = GGMLQuantizationType

# transformers 5.x Gemma4TextConfig / Gemma4VisionConfig / Gemma4AudioConfig defaults
GEMMA4_TEXT_DEFAULTS = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
    rms_norm_eps=1e-6, sliding_window=512, final_logit_softcapping=None, tie_word_embeddings=True,
    vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256, attention_k_eq_v=False,
    num_kv_shared_layers=0, enable_moe_block=False, use_double_wide_mlp=False, num_experts=None,
    top_k_experts=None, moe_intermediate_size=None, use_bidirectional_attention=None,
)
GEMMA4_DEFAULT_GLOBAL_HEAD_DIM = 512
GEMMA4_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                       patch_size=16, pooling_kernel_size=3)
AUDIO_DEFAULTS = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8)
AUDIO_MEL_BINS = 128  # converter default for input_feat_size
DUMMY_IMAGE_SIZE = 224  # the converter writes this placeholder; clip.cpp does not use it for gemma4v
MMPROJ_EPS = 1e-6  # the converter reads a 'layer_norm_eps' the Gemma 4 tower configs never have
ROPE_FREQ_UNROTATED = 1e30  # freq factor that makes the angle ~0: a pass-through dimension
ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"  # generated: proportional RoPE on full layers
SWA_PATTERN_HF_DEFAULT = 6  # transformers Gemma4TextConfig: layer_types default, every 6th layer full
CLIP_TOWERS = 128  # llama.cpp MmprojModel block_count when both vision and audio are present

# Gemma 4 text-only tensors, on top of the Gemma 3 decoder tables.
GEMMA4_TEXT = DECODER_GLOBAL + DECODER_LAYER + (
    Rule("model.embed_tokens_per_layer", MODEL_TENSOR.PER_LAYER_TOKEN_EMBD,
         "per-layer token embeddings (PLE) [n_vocab, n_layer*P], P = hidden_size_per_layer_input"),
    Rule("model.per_layer_model_projection", MODEL_TENSOR.PER_LAYER_MODEL_PROJ,
         "hidden state -> PLE inputs [n_layer*P, hidden]"),
    Rule("model.per_layer_projection_norm", MODEL_TENSOR.PER_LAYER_PROJ_NORM,
         "RMSNorm gain per P-slice of that projection [P]"),
    Rule("model.layers.{bid}.per_layer_input_gate", MODEL_TENSOR.PER_LAYER_INP_GATE, "PLE gate [P, hidden]"),
    Rule("model.layers.{bid}.per_layer_projection", MODEL_TENSOR.PER_LAYER_PROJ,
         "PLE back to the residual [hidden, P]"),
    Rule("model.layers.{bid}.post_per_layer_input_norm", MODEL_TENSOR.PER_LAYER_POST_NORM,
         "RMSNorm gain after the PLE branch [hidden]"),
    Rule("model.layers.{bid}.layer_scalar", MODEL_TENSOR.LAYER_OUT_SCALE,
         "per-layer output scale, a [1] buffer (the converter appends .weight)", ("",), ".weight"),
) + (
    # The mixture-of-experts block of 26B-A4B (transformers Gemma4TextDecoderLayer with
    # enable_moe_block): it runs beside the dense MLP (which becomes the "shared expert") and the
    # two outputs are normed separately, summed and normed again by post_feedforward_layernorm.
    # Names as llama.cpp's converter writes them (conversion/gemma.py Gemma4Model.filter_tensors
    # appends ".weight" to the bare expert parameters; modify_tensors renames the router scales).
    Rule("model.layers.{bid}.pre_feedforward_layernorm_2", MODEL_TENSOR.FFN_PRE_NORM_2,
         "RMSNorm gain before the experts [hidden]"),
    Rule("model.layers.{bid}.post_feedforward_layernorm_1", MODEL_TENSOR.FFN_POST_NORM_1,
         "RMSNorm gain on the dense MLP's output in an MoE layer [hidden]"),
    Rule("model.layers.{bid}.post_feedforward_layernorm_2", MODEL_TENSOR.FFN_POST_NORM_2,
         "RMSNorm gain on the experts' output [hidden]"),
    Rule("model.layers.{bid}.router.proj", MODEL_TENSOR.FFN_GATE_INP,
         "router logits [n_expert, hidden], kept F32 (ModelBase.prepare_tensors)"),
    Rule("model.layers.{bid}.router.scale", MODEL_TENSOR.FFN_GATE_INP,
         "router input gain [hidden] -> ffn_gate_inp.scale", ("",), ".scale"),
    Rule("model.layers.{bid}.router.per_expert_scale", MODEL_TENSOR.FFN_DOWN_EXP,
         "per-expert output scale [n_expert] -> ffn_down_exps.scale (llama.cpp multiplies each expert's "
         "down output by it)", ("",), ".scale"),
    Rule("model.layers.{bid}.experts.gate_up_proj", MODEL_TENSOR.FFN_GATE_UP_EXP,
         "fused expert gate|up [n_expert, 2*moe_ffn, hidden], gate rows first", ("",), ".weight"),
    Rule("model.layers.{bid}.experts.down_proj", MODEL_TENSOR.FFN_DOWN_EXP,
         "expert down [n_expert, hidden, moe_ffn]", ("",), ".weight"),
    # NVFP4 experts stay separate (ModelBase._flush_nvfp4_experts stacks each projection on its own);
    # llama.cpp's gguf-py lists FFN_GATE_EXP / FFN_UP_EXP for GEMMA4, the pinned gguf does not yet
    Rule("model.layers.{bid}.experts.gate_proj", "blk.{bid}.ffn_gate_exps",
         "NVFP4 expert gate [n_expert, moe_ffn, hidden]", ("",), ".weight"),
    Rule("model.layers.{bid}.experts.up_proj", "blk.{bid}.ffn_up_exps",
         "NVFP4 expert up [n_expert, moe_ffn, hidden]", ("",), ".weight"),
)

# mmproj: HF names after the converter's own renames (".linear." dropped from clippable linears);
# every linear may carry the clipping scalars input_min/input_max/output_min/output_max.
MM = (".weight", ".bias", ".input_max", ".input_min", ".output_max", ".output_min")
_VL = "model.vision_tower.encoder.layers.{bid}."
_AL = "model.audio_tower.layers.{bid}."
GEMMA4_MMPROJ = (
    # vision tower (gemma4v)
    Rule("model.vision_tower.patch_embedder.input_proj", MODEL_TENSOR.V_ENC_EMBD_PATCH,
         "patch embedding [hidden, 3*p*p] (r, c, rgb) -> conv kernel [hidden, 3, p, p]", MM),
    Rule("model.vision_tower.patch_embedder.position_embedding_table", MODEL_TENSOR.V_ENC_EMBD_POS,
         "2-D position table [2, pos, hidden] (x and y), F32", ("",), ".weight"),
    Rule("model.vision_tower.std_bias", MODEL_TENSOR.V_STD_BIAS,
         "optional output standardization bias [hidden]", ("",)),
    Rule("model.vision_tower.std_scale", MODEL_TENSOR.V_STD_SCALE,
         "optional output standardization scale [hidden]", ("",)),
    Rule(_VL + "input_layernorm", MODEL_TENSOR.V_ENC_INPUT_NORM, "RMSNorm before attention [hidden]", MM),
    Rule(_VL + "pre_feedforward_layernorm", MODEL_TENSOR.V_ENC_POST_ATTN_NORM, "RMSNorm before the MLP [hidden]", MM),
    Rule(_VL + "post_attention_layernorm", MODEL_TENSOR.V_ENC_ATTN_POST_NORM, "RMSNorm after attention [hidden]", MM),
    Rule(_VL + "post_feedforward_layernorm", MODEL_TENSOR.V_ENC_FFN_POST_NORM, "RMSNorm after the MLP [hidden]", MM),
    Rule(_VL + "self_attn.q_proj", MODEL_TENSOR.V_ENC_ATTN_Q, "query [n_head*head_dim, hidden]", MM),
    Rule(_VL + "self_attn.k_proj", MODEL_TENSOR.V_ENC_ATTN_K, "key [n_kv*head_dim, hidden]", MM),
    Rule(_VL + "self_attn.v_proj", MODEL_TENSOR.V_ENC_ATTN_V, "value [n_kv*head_dim, hidden]", MM),
    Rule(_VL + "self_attn.o_proj", MODEL_TENSOR.V_ENC_ATTN_O, "attention output [hidden, n_head*head_dim]", MM),
    Rule(_VL + "self_attn.q_norm", MODEL_TENSOR.V_ENC_ATTN_Q_NORM, "q RMSNorm gain [head_dim]", MM),
    Rule(_VL + "self_attn.k_norm", MODEL_TENSOR.V_ENC_ATTN_K_NORM, "k RMSNorm gain [head_dim]", MM),
    Rule(_VL + "mlp.gate_proj", MODEL_TENSOR.V_ENC_FFN_GATE, "MLP gate [ffn, hidden]", MM),
    Rule(_VL + "mlp.up_proj", MODEL_TENSOR.V_ENC_FFN_UP, "MLP up [ffn, hidden]", MM),
    Rule(_VL + "mlp.down_proj", MODEL_TENSOR.V_ENC_FFN_DOWN, "MLP down [hidden, ffn]", MM),
    Rule(_VL + "layer_scalar", MODEL_TENSOR.V_LAYER_OUT_SCALE, "optional per-layer output scale", ("",),
         ".weight"),
    Rule("model.embed_vision.embedding_projection", MODEL_TENSOR.V_MM_INP_PROJ,
         "vision -> text hidden [H_text, hidden]", MM),
    # audio conformer (gemma4a)
    Rule("model.audio_tower.subsample_conv_projection.layer{bid}.conv", MODEL_TENSOR.A_ENC_CONV1D,
         "subsampling Conv2d 3x3 stride 2 [c_out, c_in, 3, 3], F32", MM),
    Rule("model.audio_tower.subsample_conv_projection.layer{bid}.norm", MODEL_TENSOR.A_ENC_CONV1D_NORM,
         "LayerNorm after that conv [c_out]", MM),
    Rule("model.audio_tower.subsample_conv_projection.input_proj_linear", MODEL_TENSOR.A_ENC_INP_PROJ,
         "subsampled features -> hidden [hidden, (mel/4)*c1], F32", MM),
    Rule(_AL + "feed_forward1.ffw_layer_1", MODEL_TENSOR.A_ENC_FFN_UP, "first macaron FFN up [4*hidden, hidden]", MM),
    Rule(_AL + "feed_forward1.ffw_layer_2", MODEL_TENSOR.A_ENC_FFN_DOWN,
         "first macaron FFN down [hidden, 4*hidden]", MM),
    Rule(_AL + "feed_forward1.pre_layer_norm", MODEL_TENSOR.A_ENC_FFN_NORM, "RMSNorm before FFN1 [hidden]", MM),
    Rule(_AL + "feed_forward1.post_layer_norm", MODEL_TENSOR.A_ENC_FFN_POST_NORM, "RMSNorm after FFN1 [hidden]", MM),
    Rule(_AL + "feed_forward2.ffw_layer_1", MODEL_TENSOR.A_ENC_FFN_UP_1, "second macaron FFN up", MM),
    Rule(_AL + "feed_forward2.ffw_layer_2", MODEL_TENSOR.A_ENC_FFN_DOWN_1, "second macaron FFN down", MM),
    Rule(_AL + "feed_forward2.pre_layer_norm", MODEL_TENSOR.A_ENC_FFN_NORM_1, "RMSNorm before FFN2 [hidden]", MM),
    Rule(_AL + "feed_forward2.post_layer_norm", MODEL_TENSOR.A_ENC_FFN_POST_NORM_1, "RMSNorm after FFN2 [hidden]", MM),
    Rule(_AL + "norm_pre_attn", MODEL_TENSOR.A_ENC_ATTN_PRE_NORM, "RMSNorm before attention [hidden]", MM),
    Rule(_AL + "norm_post_attn", MODEL_TENSOR.A_ENC_ATTN_POST_NORM, "RMSNorm after attention [hidden]", MM),
    Rule(_AL + "norm_out", MODEL_TENSOR.A_ENC_OUTPUT_NORM, "block output RMSNorm [hidden]", MM),
    Rule(_AL + "self_attn.q_proj", MODEL_TENSOR.A_ENC_ATTN_Q, "query [hidden, hidden]", MM),
    Rule(_AL + "self_attn.k_proj", MODEL_TENSOR.A_ENC_ATTN_K, "key [hidden, hidden]", MM),
    Rule(_AL + "self_attn.v_proj", MODEL_TENSOR.A_ENC_ATTN_V, "value [hidden, hidden]", MM),
    Rule(_AL + "self_attn.post", MODEL_TENSOR.A_ENC_OUTPUT, "attention output [hidden, hidden]", MM),
    Rule(_AL + "self_attn.relative_k_proj", MODEL_TENSOR.A_ENC_ATTN_K_REL,
         "relative-position key [hidden, hidden]", MM),
    Rule(_AL + "self_attn.per_dim_scale", MODEL_TENSOR.A_PER_DIM_SCALE,
         "per-dim query scale [head_dim], stored as softplus(x)", ("",), ".weight"),
    Rule(_AL + "lconv1d.pre_layer_norm", MODEL_TENSOR.A_ENC_CONV_NORM, "RMSNorm before the light conv [hidden]", MM),
    Rule(_AL + "lconv1d.linear_start", MODEL_TENSOR.A_ENC_CONV_PW1, "pointwise in, GLU halves [2*hidden, hidden]", MM),
    Rule(_AL + "lconv1d.depthwise_conv1d", MODEL_TENSOR.A_ENC_CONV_DW,
         "causal depthwise conv [hidden, 1, K] -> [hidden, K], F32", MM),
    Rule(_AL + "lconv1d.conv_norm", MODEL_TENSOR.A_ENC_NORM_CONV, "RMSNorm after the depthwise conv [hidden]", MM),
    Rule(_AL + "lconv1d.linear_end", MODEL_TENSOR.A_ENC_CONV_PW2, "pointwise out [hidden, hidden]", MM),
    Rule("model.audio_tower.output_proj", MODEL_TENSOR.A_ENC_OUT, "tower output projection [out_dims, hidden]", MM),
    Rule("model.embed_audio.embedding_projection", MODEL_TENSOR.A_MM_INP_PROJ,
         "audio -> text hidden [H_text, out_dims]", MM),
)


class PatchEmbedToConv(Transform):
    """[hidden, p*p*3] in (row, col, channel) order -> conv kernel [hidden, 3, p, p]
    (Gemma4VisionAudioModel.modify_tensors: reshape(n, p, p, 3).permute(0, 3, 1, 2))."""

    label = "-> conv [n, 3, p, p]"

    def shape(self, s):
        p = int((s[1] // 3) ** 0.5)
        if p * p * 3 != s[1]:
            raise GGQuantError(f"patch embedding width {s[1]} is not 3*p*p")
        return (s[0], 3, p, p)

    def __call__(self, x, src_dtype):
        n, _, p, _ = self.shape(x.shape)
        return np.ascontiguousarray(x.reshape(n, p, p, 3).transpose(0, 3, 1, 2))


    def inverse(self, hf_shape):
        return ConvToPatchEmbed()


class ConvToPatchEmbed(Transform):
    """The inverse of PatchEmbedToConv: conv kernel [hidden, 3, p, p] -> [hidden, p*p*3]."""

    label = "conv -> [n, p*p*3]"

    def shape(self, s):
        return (s[0], s[1] * s[2] * s[3])

    def __call__(self, x, src_dtype):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(x.shape[0], -1)


DEPTHWISE_TO_2D = Reshape(lambda s: (s[0], s[2]) if len(s) == 3 and s[1] == 1 else s, "[C, 1, K] -> [C, K]")


# Gemma4ClippableLinear modules (transformers modeling_gemma4.py): their weight is stored as
# `<module>.linear.weight`, which the converter shortens to `<module>.weight`.
CLIPPABLE_VISION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CLIPPABLE_AUDIO = ("feed_forward1.ffw_layer_1", "feed_forward1.ffw_layer_2", "feed_forward2.ffw_layer_1",
                   "feed_forward2.ffw_layer_2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.post", "lconv1d.linear_start", "lconv1d.linear_end")
CLIP_SCALARS = (".input_min", ".input_max", ".output_min", ".output_max")  # HF: 0-d buffers
# token text -> Gemma4Config key of the multimodal marker tokens
GEMMA4_MARKERS = dict(boi_token_id="<|image>", eoi_token_id="<image|>", image_token_id="<|image|>",
                      boa_token_id="<|audio>", eoa_token_index="<audio|>", audio_token_id="<|audio|>",
                      video_token_id="<|video|>")


@dataclass
class Gemma4Hparams(TextHparams):
    """A gemma4 GGUF's hyperparameters, decoded once for the runtime (runtime/models/gemma4.py)
    and the GGUF -> HF direction (Gemma4.hf_text_config)."""

    n_kv_from_start: int  # layers 0 .. n_kv_from_start - 1 compute their own K/V
    kv_source: list[int]  # per layer: the layer whose K/V cache it attends over
    n_embd_per_layer: int  # embedding_length_per_layer_input (P); 0: no per-layer embeddings
    n_expert: int  # expert_count; 0: dense (E2B, E4B, 31B)
    n_expert_used: list[int]  # expert_used_count, per layer (top-k of the router)
    n_ff_exp: list[int]  # expert_feed_forward_length, per layer (one expert's MLP width)

    @classmethod
    def decode(cls, g: GGUFFacts) -> dict:
        """llama_model_gemma4::load_arch_hparams (src/models/gemma4.cpp), and the KV reuse map of
        llama-model.cpp: a KV-shared sliding layer reads layer n_kv - 2, a shared full layer n_kv - 1."""
        d = super().decode(g)
        a, A, L, n_layer = g.arch, Keys.Attention, Keys.LLM, d["n_layer"]
        key = A.SLIDING_WINDOW_PATTERN.format(arch=a)
        if not isinstance(g.get(key), list):
            raise GGQuantError(f"{g.path}: '{key}' must be a bool array with one entry per layer ({n_layer})")
        is_swa = [bool(p) for p in g.per_layer(key, n_layer, bool)]
        d.update(
            is_swa=is_swa, n_swa=g.need(A.SLIDING_WINDOW.format(arch=a)),
            head_dim_swa=g.need(A.KEY_LENGTH_SWA.format(arch=a)),
            head_dim_v_swa=g.need(A.VALUE_LENGTH_SWA.format(arch=a)),
            # llama.cpp requires the key; 0 (no per-layer embeddings) when a file lacks it, as ggquant always read it
            n_embd_per_layer=g.need(L.EMBD_LENGTH_PER_LAYER_INP.format(arch=a), default=0),
        )
        if d["head_dim"] != d["head_dim_v"] or d["head_dim_swa"] != d["head_dim_v_swa"]:
            raise GGQuantError(f"{g.path}: Gemma 4 requires value_length == key_length (llama.cpp does too)")
        n_expert, n_used = expert_counts(g, n_layer)
        d.update(n_expert=n_expert, n_expert_used=n_used,
                 n_ff_exp=g.per_layer(L.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), n_layer, default=0))
        n_shared = g.need(A.SHARED_KV_LAYERS.format(arch=a), default=0)
        n_kv = n_layer - n_shared
        kv_source = list(range(n_layer))
        if n_shared > 0 and not (n_kv == 0 and g.arch == GEMMA4_ASSISTANT_ARCH):  # a drafter reads its target's KV
            if n_kv < 2:
                raise GGQuantError(f"{g.path}: {n_shared} KV-shared layers of {n_layer} leave fewer than 2 "
                                   f"layers with their own K/V")
            for il in range(n_kv, n_layer):
                src = n_kv - (2 if is_swa[il] else 1)
                if is_swa[src] != is_swa[il]:
                    raise GGQuantError(
                        f"{g.path}: layer {il} ({'sliding' if is_swa[il] else 'full'}) would reuse the K/V of "
                        f"layer {src} ({'sliding' if is_swa[src] else 'full'}); llama.cpp requires layer "
                        f"{n_kv - 1} full and layer {n_kv - 2} sliding (it aborts on this file)")
                kv_source[il] = src
        d.update(n_kv_from_start=n_kv, kv_source=kv_source)
        return d


@register("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM")
class Gemma4(Gemma3):
    model_arch = MODEL_ARCH.GEMMA4
    TEXT_TENSORS = GEMMA4_TEXT
    MMPROJ_TENSORS = GEMMA4_MMPROJ
    TEXT_DEFAULTS = GEMMA4_TEXT_DEFAULTS
    norm_shift = 0.0  # Gemma4RMSNorm multiplies by w directly
    VISIBLE_TOKENS = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                      "<tool_response|>", '<|"|>')  # always rendered so the chat parser sees them
    VISION_PROJECTOR, AUDIO_PROJECTOR = "gemma4v", "gemma4a"  # clip.{vision,audio}.projector_type
    MMPROJ_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")

    def text_hparams(self, config: dict) -> dict:
        h = dict(super(Gemma3, self).text_hparams(config))
        raw_text = dict(h)
        for k, v in self.TEXT_DEFAULTS.items():
            h.setdefault(k, v)
        # Gemma4TextConfig.__post_init__
        if h.get("use_bidirectional_attention") == "all":
            h["is_causal"] = False
        if not isinstance(h.get("layer_types"), list):
            n, period = h["num_hidden_layers"], SWA_PATTERN_HF_DEFAULT
            h["layer_types"] = [SLIDING if (i + 1) % period else FULL for i in range(n)] if isinstance(n, int) else None
        else:
            h["layer_types"] = list(h["layer_types"])
            if h["layer_types"] and h["layer_types"][-1] != FULL:
                h["layer_types"][-1] = FULL  # transformers forces the last layer to full attention
        if not isinstance(h.get("rope_parameters"), dict):
            h["rope_parameters"] = json.loads(json.dumps(GEMMA4_DEFAULT_ROPE))
        if not isinstance(h.get("per_layer_config"), dict):
            overrides = {"head_dim": raw_text.get("global_head_dim", GEMMA4_DEFAULT_GLOBAL_HEAD_DIM)}
            n_gkv = raw_text.get("num_global_key_value_heads")
            if n_gkv is not None and h.get("attention_k_eq_v", True):
                overrides["num_key_value_heads"] = n_gkv
            h["per_layer_config"] = {str(i): dict(overrides) for i, t in enumerate(h["layer_types"] or []) if t == FULL}
        return h

    # --- derived dims (converter's reading of per_layer_config) ------------------------------
    def _full_layer_value(self, key: str):
        lt = self.hparams["layer_types"]
        for idx, cfg in self.hparams["per_layer_config"].items():
            try:
                i = int(idx)
            except ValueError:
                continue
            if i < len(lt) and lt[i] == FULL and isinstance(cfg, dict) and key in cfg:
                return cfg[key]
        return None

    @property
    def head_dim_full(self) -> int:
        v = self._full_layer_value("head_dim")
        if not isinstance(v, int):
            raise GGQuantError(f"{self.config_path}: cannot find the full-attention head dim (global_head_dim, or "
                               f"head_dim in per_layer_config for a full layer)")
        return v

    @property
    def n_kv_full(self) -> int | None:
        return self._full_layer_value("num_key_value_heads")

    @property
    def first_shared(self) -> int:
        return self.block_count - self.hparams["num_kv_shared_layers"]

    def layer_dims(self, il: int) -> dict:
        h = self.hparams
        full = h["layer_types"][il] == FULL
        ff = h["intermediate_size"] * (2 if h.get("use_double_wide_mlp") and il >= self.first_shared else 1)
        nkv = (self.n_kv_full or h["num_key_value_heads"]) if full else h["num_key_value_heads"]
        # shared layers may or may not carry k/v (transformers ignores them); v is optional everywhere
        # attention_k_eq_v: full layers have no v_proj (Gemma4TextAttention.use_alternative_attention,
        # V = K); sliding layers keep theirs
        return dict(head_dim=self.head_dim_full if full else h["head_dim"], n_kv=nkv, ffn=ff,
                    has_kv=il < self.first_shared, has_v=not (h.get("attention_k_eq_v") and full))

    def expected_shapes(self):
        exp = super().expected_shapes()
        h = self.hparams
        H, L, P = h["hidden_size"], self.block_count, h.get("hidden_size_per_layer_input") or 0
        if P:
            exp.update({
                "model.embed_tokens_per_layer.weight": ((h["vocab_size_per_layer_input"], L * P), True),
                "model.per_layer_model_projection.weight": ((L * P, H), True),
                "model.per_layer_projection_norm.weight": ((P,), True),
            })
        moe = bool(h.get("enable_moe_block"))
        for il in range(L):
            p = f"model.layers.{il}."
            exp[p + "layer_scalar"] = ((1,), True)
            if moe:  # Gemma4TextRouter + Gemma4TextExperts, and the norms around them
                E, F = h["num_experts"], h["moe_intermediate_size"]
                # NVFP4 experts: gate and up stacked apart, per_expert_scale folded into down's scales
                split = self._nvfp4_experts()
                exp.update({p + "router.proj.weight": ((E, H), True), p + "router.scale": ((H,), True),
                            p + "router.per_expert_scale": ((E,), not split),
                            p + "experts.gate_up_proj": ((E, 2 * F, H), not split),
                            p + "experts.gate_proj": ((E, F, H), split), p + "experts.up_proj": ((E, F, H), split),
                            p + "experts.down_proj": ((E, H, F), True)})
                exp.update({p + n + ".weight": ((H,), True) for n in (
                    "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2")})
            if P:
                exp.update({p + "per_layer_input_gate.weight": ((P, H), True),
                            p + "per_layer_projection.weight": ((H, P), True),
                            p + "post_per_layer_input_norm.weight": ((H,), True)})
        return exp

    # --- checks -----------------------------------------------------------------------------
    def validate(self, parts):
        super().validate(parts)
        if MMPROJ in parts:
            self.mmproj_hparams()  # raises when the towers or the image normalisation are missing

    def validate_hparams(self):
        h = self.hparams
        if h.get("enable_moe_block"):
            self.validate_moe()
        lt = h.get("layer_types")
        L = self.block_count
        if not isinstance(lt, list) or len(lt) != L or any(t not in (SLIDING, FULL) for t in lt):
            raise GGQuantError(f"{self.config_path}: 'layer_types' must list {L} entries of '{SLIDING}'/'{FULL}', "
                               f"got {lt!r}")
        n_shared = self.need("num_kv_shared_layers")
        if not 0 <= n_shared < L:
            raise GGQuantError(f"{self.config_path}: num_kv_shared_layers = {n_shared} must be in [0, {L})")
        if n_shared:
            first = L - n_shared
            # llama.cpp (src/llama-model.cpp, gemma4) hard-codes the reuse map: shared sliding
            # layers read layer first-2, shared full layers layer first-1; anything else makes
            # llama-kv-cache.cpp hit GGML_ASSERT and kill the process while loading.
            if first < 2 or lt[first - 1] != FULL or lt[first - 2] != SLIDING:
                got = ", ".join(f"{i}: {lt[i]}" for i in range(max(0, first - 2), first))
                raise GGQuantError(
                    f"{self.config_path}: KV-sharing layout llama.cpp cannot load: with num_kv_shared_layers = "
                    f"{n_shared} the first shared layer is {first}, so layers {first - 2} and {first - 1} (the "
                    f"last two with their own KV) must be '{SLIDING}' then '{FULL}' (got {got or 'none'}); "
                    f"llama.cpp would abort while loading this model")
        self._validate_attention()

    def _validate_attention(self):
        """The RoPE and head-size keys llama.cpp's converter needs (Gemma4Model)."""
        h = self.hparams
        rp_full = h["rope_parameters"].get(FULL)
        if not isinstance(rp_full, dict) or rp_full.get("rope_type") != "proportional":
            raise GGQuantError(f"{self.config_path}: rope_parameters.{FULL}.rope_type must be 'proportional' "
                               f"(what llama.cpp's gemma4 expects), got {rp_full!r}")
        if not isinstance(rp_full.get("partial_rotary_factor"), (int, float)):
            raise GGQuantError(f"{self.config_path}: rope_parameters.{FULL}.partial_rotary_factor is missing")
        self.head_dim_full  # raises when missing
        P = h.get("hidden_size_per_layer_input") or 0
        if P and h.get("vocab_size_per_layer_input") != h.get("vocab_size"):
            raise GGQuantError(
                f"{self.config_path}: vocab_size_per_layer_input = {h.get('vocab_size_per_layer_input')} differs "
                f"from vocab_size = {h.get('vocab_size')}; llama.cpp sizes per_layer_token_embd by the vocabulary "
                f"and would refuse the GGUF")
        super().validate_hparams()

    def validate_moe(self) -> None:
        """The expert counts llama.cpp needs (llama_model_base::load_hparams asserts
        n_expert_used <= n_expert and n_expert_used > 0 once n_expert > 0)."""
        E = self.need("num_experts")
        k = self.need("top_k_experts")
        self.need("moe_intermediate_size")
        if E < 1:
            raise GGQuantError(f"{self.config_path}: num_experts = {E}; a mixture-of-experts layer needs experts")
        if not 0 < k <= E:
            raise GGQuantError(f"{self.config_path}: top_k_experts = {k} must be in [1, num_experts = {E}]; "
                               f"llama.cpp refuses to load a model that routes to more experts than it has")

    # per-expert modules of a quantized MoE checkpoint (llmcompressor / GPTQ unfuse the experts:
    # ...layers.N.experts.E.{gate_proj,up_proj,down_proj}.weight, as vLLM and llama.cpp's NVFP4
    # path read them)
    EXPERT_MODULE = re.compile(r"^(?P<layer>.*layers\.\d+\.)experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
                               r"\.weight$")

    def _nvfp4_experts(self) -> bool:
        """The checkpoint's experts are stacked NVFP4 records (gate / up apart)."""
        return self.ckpt is not None and any(
            self.normalize_name(n).endswith("experts.gate_proj") for n in self.ckpt.tensors)

    def quantized_expert_stacks(self, names, fuse_gate_up: bool = True):
        """Per-expert gate_proj + up_proj rows -> experts.gate_up_proj [E, 2F, H] (gate rows first,
        as the fused HF parameter), down_proj -> experts.down_proj [E, H, F]; with fuse_gate_up
        False (NVFP4, ModelBase._generate_nvfp4_tensors) experts.gate_proj and experts.up_proj
        [E, F, H] apart."""
        found: dict[str, dict[str, dict[int, str]]] = {}
        for n in names:
            m = self.EXPERT_MODULE.match(n)
            if m:
                found.setdefault(m["layer"], {}).setdefault(m["proj"], {})[int(m["e"])] = n
        if not found:
            return {}
        first = next(iter(next(iter(found.values())).values()))
        E = self._declared_experts(next(iter(first.values())))
        stacks = {}
        for layer, projs in found.items():
            for proj in ("gate_proj", "up_proj", "down_proj"):
                have = projs.get(proj, {})
                missing = [e for e in range(E) if e not in have]
                if missing and self.ckpt is not None and f"{layer}experts.{missing[0]}.{proj}.weight" in self.ckpt.tensors:
                    raise GGQuantError(f"{self.dir}: tensor '{layer}experts.{missing[0]}.{proj}.weight' is not "
                                       f"quantized like the other experts' {proj} ({len(missing)} of the {E} are "
                                       f"not): partial quantization across a layer's experts cannot be stacked "
                                       f"into one tensor (llama.cpp's converter refuses it too)")
                if missing:
                    raise GGQuantError(f"{self.dir}: tensor '{layer}experts.{missing[0]}.{proj}.weight' is missing "
                                       f"({len(missing)} of the {E} experts' {proj} are); a mixture-of-experts "
                                       f"layer needs every expert")
                extra = sorted(set(have) - set(range(E)))
                if extra:
                    raise GGQuantError(f"{self.dir}: tensor '{have[extra[0]]}' is expert {extra[0]}, but "
                                       f"{self.config_path.name} declares {E} experts")
            if fuse_gate_up:
                stacks[layer + "experts.gate_up_proj"] = [[projs["gate_proj"][e], projs["up_proj"][e]]
                                                          for e in range(E)]
            else:
                for proj in ("gate_proj", "up_proj"):
                    stacks[layer + "experts." + proj] = [[projs[proj][e]] for e in range(E)]
            stacks[layer + "experts.down_proj"] = [[projs["down_proj"][e]] for e in range(E)]
        return stacks

    def expert_output_scales(self, stacks):
        """{stacked down_proj: router.per_expert_scale of its layer}: Gemma 4 scales each expert's
        output, which llama.cpp's converter folds into NVFP4 experts' down_proj factors
        (Gemma4Model._generate_nvfp4_tensors)."""
        return {n: n.removesuffix("experts.down_proj") + "router.per_expert_scale"
                for n in stacks if n.endswith("experts.down_proj")}

    def _declared_experts(self, tensor: str) -> int:
        E = self.hparams.get("num_experts")
        if not self.hparams.get("enable_moe_block") or not _is_int(E):
            raise GGQuantError(f"{self.dir}: tensor '{tensor}' is a per-expert weight, but "
                               f"{self.config_path.name} declares no experts (enable_moe_block, num_experts)")
        return E

    # mlx-lm's Gemma 4 (models/gemma4_text.py sanitize) splits the fused gate_up_proj into
    # stacked SwitchGLU weights: ...layers.N.experts.switch_glu.{gate_proj,up_proj,down_proj}.weight
    # [E, F, H] / [E, H, F] (QuantizedSwitchLinear when quantized)
    SWITCH_GLU = re.compile(r"^(?P<layer>.*layers\.\d+\.)experts\.switch_glu\.(?P<proj>gate_proj|up_proj|down_proj)"
                            r"\.weight$")

    def quantized_expert_concats(self, names):
        """switch_glu.gate_proj + up_proj -> experts.gate_up_proj (each expert's gate rows, then its
        up rows), switch_glu.down_proj -> experts.down_proj."""
        found: dict[str, dict[str, str]] = {}
        for n in names:
            m = self.SWITCH_GLU.match(n)
            if m:
                found.setdefault(m["layer"], {})[m["proj"]] = n
        concats = {}
        for layer, projs in found.items():
            self._declared_experts(next(iter(projs.values())))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if proj not in projs:
                    raise GGQuantError(f"{self.dir}: tensor '{layer}experts.switch_glu.{proj}.weight' is missing "
                                       f"(mlx-lm's stacked experts come as gate_proj, up_proj and down_proj)")
            concats[layer + "experts.gate_up_proj"] = [projs["gate_proj"], projs["up_proj"]]
            concats[layer + "experts.down_proj"] = [projs["down_proj"]]
        return concats

    def check_vocab_sizes(self):
        super().check_vocab_sizes()
        n_tokens = len(self.tokens()[0])
        assert self.ckpt is not None
        for name, t in self.ckpt.tensors.items():
            if self.normalize_name(name) == "model.embed_tokens_per_layer.weight" and t.n_outer != n_tokens:
                raise GGQuantError(
                    f"{t.file}: tensor '{name}' has {t.n_outer} rows but the tokenizer has {n_tokens} tokens; "
                    f"llama.cpp would refuse the GGUF (per_layer_token_embd has the wrong shape)")

    # --- vocabulary --------------------------------------------------------------------------
    def read_tokens(self):
        tokens, scores, types = V.hf_bpe_tokens(self.dir)
        types = [int(TokenType.USER_DEFINED) if t in self.VISIBLE_TOKENS else ty for t, ty in zip(tokens, types)]
        return tokens, scores, types

    def vocab(self, kv: KV) -> None:
        tokens, scores, types = self.tokens()
        kv.string(Keys.Tokenizer.MODEL, "gemma4")
        kv.array(Keys.Tokenizer.LIST, tokens)
        kv.array(Keys.Tokenizer.SCORES, scores)
        kv.array(Keys.Tokenizer.TOKEN_TYPE, types)
        sv = V.SpecialVocab(self.dir, load_merges=True)
        if not sv.merges:
            raise GGQuantError(f"{self.dir / 'tokenizer.json'}: no BPE merges found; llama.cpp's gemma4 tokenizer "
                               f"needs them ('cannot find tokenizer merges')")
        sv.write(kv)
        kv.bool(Keys.Tokenizer.ADD_PREFIX, False)
        kv.bool(Keys.Tokenizer.ADD_BOS, True)

    # --- tensors ----------------------------------------------------------------------------
    def normalize_name(self, name: str) -> str:
        name = name.replace("language_model.", "")
        if name.startswith("model.vision_tower."):
            name = name.replace(".linear.weight", ".weight")
        elif name.startswith("model.audio_tower."):
            name = name.replace(".linear.", ".")
        return name

    def skip_tensor(self, name, part):
        return Arch.skip_tensor(self, name, part)

    def is_mmproj_tensor(self, name: str) -> bool:
        return name.startswith(self.MMPROJ_PREFIXES)

    def has_mmproj(self) -> bool:
        return isinstance(self.raw.get("vision_config"), dict)

    def block_count_for(self, part: str) -> int:
        if part == TEXT:
            return self.block_count
        return CLIP_TOWERS

    def map_tensor(self, name, part, src=None):
        gname, bid = super().map_tensor(name, part, src)
        if part == MMPROJ and bid is not None:
            vis, aud = self.mmproj_hparams()
            limit = (vis["num_hidden_layers"] if name.startswith("model.vision_tower.")
                     else 2 if "subsample_conv_projection" in name else aud["num_hidden_layers"])
            if bid >= limit:
                where = f"{src.file}: tensor '{src.name}'" if src is not None else f"{self.dir}: tensor '{name}'"
                raise GGQuantError(f"{where} is for layer {bid}, but the tower has {limit} layers in "
                                   f"{self.config_path.name}")
        return gname, bid

    def transform(self, hf_name: str, gguf_name: str, src: Tensor, part: str) -> Transform:
        if part == MMPROJ:
            if hf_name.endswith("patch_embedder.input_proj.weight"):
                return PatchEmbedToConv()
            if hf_name.startswith("model.audio_tower."):
                if hf_name.endswith(("per_dim_scale", "per_dim_key_scale")):
                    return Softplus()
                if "lconv1d.depthwise_conv1d" in hf_name and hf_name.endswith(".weight"):
                    if src.ndim != 3 or src.shape[1] != 1:
                        raise GGQuantError(f"{src.file}: tensor '{src.name}' has shape {list(src.shape)}; expected a "
                                           f"depthwise kernel [C, 1, K]")
                    return DEPTHWISE_TO_2D
            return SCALAR_TO_1D if not src.shape else IDENTITY
        return super().transform(hf_name, gguf_name, src, part)

    def force_type(self, hf_name, gguf_name, n_dims, ftype, part):
        if part != MMPROJ:
            return None
        # Gemma4VisionAudioModel.tensor_force_quant (note Python's `or` / `and` precedence)
        if ("audio_tower" in hf_name or "embed_audio" in hf_name) and (
                ".conv" in hf_name or "_conv" in hf_name and ".weight" in hf_name):
            return T.F32
        if "position_embedding_table" in hf_name:
            return T.F32
        # MmprojModel.tensor_force_quant
        if ".patch_embd.weight" in gguf_name or ".patch_merger.weight" in gguf_name:
            return T.F16 if ftype == T.F16 else T.F32
        return None

    def extra_tensors(self, part):
        if part != TEXT:
            return []
        # Proportional RoPE on full layers: ggml's NeoX rope rotates dims [0, n_rot) pairs only,
        # so the unrotated pairs get a huge frequency factor (angle / 1e30 ~ 0); llama.cpp uses
        # this tensor on full-attention layers only (Gemma4Model.generate_extra_tensors).
        hd = self.head_dim_full
        prf = self.hparams["rope_parameters"][FULL]["partial_rotary_factor"]
        n_rot = int(hd * prf / 2)
        n_unrot = int(hd / 2) - n_rot
        return [(ROPE_FREQS, np.array([1.0] * n_rot + [ROPE_FREQ_UNROTATED] * n_unrot, dtype=np.float32))]

    # --- metadata ---------------------------------------------------------------------------
    def text_metadata(self, kv: KV, file_type: int) -> None:
        super().text_metadata(kv, file_type)
        a, h = self.gguf_arch, self.hparams
        L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
        kv.u32(A.SHARED_KV_LAYERS.format(arch=a), h["num_kv_shared_layers"])
        kv.u32(L.EMBD_LENGTH_PER_LAYER_INP.format(arch=a), h.get("hidden_size_per_layer_input") or 0)
        swa = [t == SLIDING for t in h["layer_types"]]
        kv.array(A.SLIDING_WINDOW_PATTERN.format(arch=a), swa)
        hd_full, hd_swa = self.head_dim_full, h["head_dim"]
        kv.u32(A.KEY_LENGTH.format(arch=a), hd_full)
        kv.u32(A.VALUE_LENGTH.format(arch=a), hd_full)
        kv.u32(A.KEY_LENGTH_SWA.format(arch=a), hd_swa)
        kv.u32(A.VALUE_LENGTH_SWA.format(arch=a), hd_swa)
        exp_ff = h.get("expert_intermediate_size", h.get("moe_intermediate_size"))
        if exp_ff is not None:
            kv.u32(L.EXPERT_FEED_FORWARD_LENGTH.format(arch=a), exp_ff)
        if h.get("use_double_wide_mlp"):
            n_ff = h["intermediate_size"]
            kv.array(L.FEED_FORWARD_LENGTH.format(arch=a),
                     [n_ff if il < self.first_shared else n_ff * 2 for il in range(self.block_count)])
        kv_full, kv_swa = self.n_kv_full, h.get("num_key_value_heads")
        if kv_full is not None and kv_swa is not None:
            kv.array(A.HEAD_COUNT_KV.format(arch=a), [kv_swa if s else kv_full for s in swa])
        rp = h["rope_parameters"]
        prf_swa = rp.get("partial_rotary_factor", 1.0)
        kv.u32(R.DIMENSION_COUNT.format(arch=a), int(hd_full))
        kv.u32(R.DIMENSION_COUNT_SWA.format(arch=a), int(hd_swa * prf_swa))

    # --- mmproj ------------------------------------------------------------------------------
    def mmproj_hparams(self) -> tuple[dict, dict | None]:
        vc = self.raw.get("vision_config")
        if not isinstance(vc, dict):
            raise GGQuantError(f"{self.config_path}: no 'vision_config'; this {self.hf_arch} checkpoint has no "
                               f"vision tower to write as an mmproj (llama.cpp requires one)")
        vis = {**VISION_DEFAULTS, **vc}
        ac = self.raw.get("audio_config")
        aud = {**AUDIO_DEFAULTS, **ac} if isinstance(ac, dict) and ac else None
        return vis, aud

    def mmproj_metadata(self, kv: KV, file_type: int) -> None:
        """MmprojModel.set_gguf_parameters + Gemma4VisionAudioModel.set_gguf_parameters."""
        vis, aud = self.mmproj_hparams()
        CV, CA, C = Keys.ClipVision, Keys.ClipAudio, Keys.Clip
        n_embd_text = self.hparams.get("hidden_size") or 0
        self.mmproj_vision_common(kv, file_type, vis, DUMMY_IMAGE_SIZE)
        if aud is not None:
            kv.bool(C.HAS_AUDIO_ENCODER, True)
            kv.u32(CA.PROJECTION_DIM, n_embd_text)
            kv.u32(CA.EMBEDDING_LENGTH, aud["hidden_size"])
            kv.u32(CA.FEED_FORWARD_LENGTH, aud.get("intermediate_size", aud["hidden_size"] * 4))
            kv.u32(CA.BLOCK_COUNT, aud["num_hidden_layers"])
            kv.u32(CA.Attention.HEAD_COUNT, aud["num_attention_heads"])
        kv.string(CV.PROJECTOR_TYPE, self.VISION_PROJECTOR)
        kv.f32(CV.Attention.LAYERNORM_EPS, vis.get("layer_norm_eps", MMPROJ_EPS))
        if aud is not None:
            kv.string(CA.PROJECTOR_TYPE, self.AUDIO_PROJECTOR)
            kv.u32(CA.NUM_MEL_BINS, aud.get("input_feat_size", AUDIO_MEL_BINS))
            kv.f32(CA.Attention.LAYERNORM_EPS, aud.get("layer_norm_eps", MMPROJ_EPS))

    # --- GGUF -> HF -------------------------------------------------------------------------
    HF_CAUSAL, HF_CONDITIONAL = "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration"
    HF_TEXT_MODEL_TYPE, HF_MODEL_TYPE = "gemma4_text", "gemma4"
    CONDITIONAL_TEXT_PREFIX = "model.language_model."
    GENERATED = (ROPE_FREQS,)
    HF_EXPERT_JOINS = {"experts.gate_up_proj": ("experts.gate_proj", "experts.up_proj")}  # gate rows first

    def folded_expert_factors(self, gguf_names):
        """In a layer whose experts are stacked per projection (ffn_gate_exps / ffn_up_exps, which
        only llama.cpp's NVFP4 path writes: ModelBase._flush_nvfp4_experts) each stack's `.scale`
        holds its experts' NVFP4 factors (weight_scale_2), down's multiplied by
        router.per_expert_scale (Gemma4Model._generate_nvfp4_tensors), which the GGUF cannot
        tell apart. All three are folded into the weights and router.per_expert_scale is written
        as ones: transformers multiplies expert e's routing weight by per_expert_scale[e], i.e.
        e's down output, so the function is the same, and the weights come out at the model's
        own scale (the bare NVFP4 values are 1/weight_scale_2 times larger, ~10^3-10^4, which
        overflows float16 activations), as a dense NVFP4 weight's [1] scale is folded."""
        names = set(gguf_names)
        out = set()
        for n in names:
            m = re.fullmatch(r"blk\.(\d+)\.ffn_(?:gate|up)_exps\.weight", n)
            if m:
                out.update(s for s in (f"blk.{m[1]}.ffn_{p}_exps.scale" for p in ("gate", "up", "down")) if s in names)
        return out

    @classmethod
    def hf_text_config(cls, g) -> dict:
        """Gemma4TextConfig from the keys llama.cpp reads (src/models/gemma4.cpp) and what the
        converter encodes in tensors (rope_freqs: the proportional-RoPE fraction)."""
        hp = Gemma4Hparams.from_gguf(g)
        L, A = Keys.LLM, Keys.Attention
        layer_types = [SLIDING if s_ else FULL for s_ in hp.is_swa]
        n_layer, first_shared = hp.n_layer, hp.n_kv_from_start

        def per_type(values: list, key: str) -> tuple[int, int]:
            """(sliding value, full value) of a per-layer key."""
            sw = {values[i] for i in range(n_layer) if layer_types[i] == SLIDING}
            fu = {values[i] for i in range(n_layer) if layer_types[i] == FULL}
            if len(sw) > 1 or len(fu) > 1:
                raise GGQuantError(f"{g.path}: '{key.format(arch=hp.arch)}' varies within a layer type ({values}); "
                                   f"Gemma 4 in transformers has one value per layer type")
            return (sw or fu).pop(), (fu or sw).pop()

        kv_swa, kv_full = per_type(hp.n_head_kv, A.HEAD_COUNT_KV)
        ff, n_ff = hp.n_ff, hp.n_ff[0]
        double_wide = ff != [n_ff] * n_layer
        if double_wide and ff != [n_ff if i < first_shared else 2 * n_ff for i in range(n_layer)]:
            raise GGQuantError(f"{g.path}: '{L.FEED_FORWARD_LENGTH.format(arch=hp.arch)}' = {ff} is neither uniform "
                               f"nor Gemma 4's double-wide MLP (twice as wide on the {n_layer - first_shared} "
                               f"KV-shared layers)")
        # proportional RoPE: rope_freqs holds 1.0 for the rotated pairs, 1e30 for the others
        hd_full, prf = hp.head_dim, 1.0
        if ROPE_FREQS in g.shapes:
            freqs = g.values(ROPE_FREQS)
            n_rot = int(np.count_nonzero(freqs == 1.0))
            if freqs.size != hd_full // 2 or np.any(freqs[n_rot:] != np.float32(ROPE_FREQ_UNROTATED)):
                raise GGQuantError(f"{g.path}: {ROPE_FREQS} is not a proportional-RoPE mask (1.0 then 1e30) "
                                   f"over {hd_full // 2} pairs")
            prf = n_rot * 2 / hd_full
        emb = g.shapes.get("token_embd.weight")
        if emb is None:
            raise GGQuantError(f"{g.path}: tensor 'token_embd.weight' is missing; a {hp.arch} GGUF needs it")
        # attention_k_eq_v: the full layers with their own K/V have no attn_v (V = K)
        has_v = any(f"blk.{i}.attn_v.weight" in g.shapes for i in range(first_shared) if layer_types[i] == FULL)
        cfg = dict(
            architectures=[cls.HF_CAUSAL], model_type=cls.HF_TEXT_MODEL_TYPE,
            vocab_size=emb[0], vocab_size_per_layer_input=emb[0], hidden_size=hp.n_embd, intermediate_size=n_ff,
            num_hidden_layers=n_layer, num_attention_heads=hp.single(hp.n_head, A.HEAD_COUNT),
            num_key_value_heads=kv_swa, head_dim=hp.head_dim_swa, global_head_dim=hd_full,
            hidden_size_per_layer_input=hp.n_embd_per_layer, num_kv_shared_layers=n_layer - first_shared,
            use_double_wide_mlp=double_wide, layer_types=layer_types, sliding_window=hp.n_swa,
            max_position_embeddings=hp.n_ctx_train, rms_norm_eps=f32_value(hp.eps),
            rope_parameters={
                SLIDING: {"rope_type": "default", "rope_theta": f32_value(hp.rope_base_swa)},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": prf,
                       "rope_theta": f32_value(hp.rope_base)},
            },
            final_logit_softcapping=f32_value(hp.final_softcap) if hp.final_softcap else None,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings="output.weight" not in g.shapes,
            attention_k_eq_v=not has_v, enable_moe_block=hp.n_expert > 0,
        )
        if hp.n_expert > 0:  # the router and experts of 26B-A4B (ffn_gate_inp, ffn_*_exps)
            cfg.update(num_experts=hp.n_expert, top_k_experts=hp.single(hp.n_expert_used, L.EXPERT_USED_COUNT),
                       moe_intermediate_size=hp.single(hp.n_ff_exp, L.EXPERT_FEED_FORWARD_LENGTH))
        if kv_full != kv_swa:
            cfg["per_layer_config"] = {str(i): {"head_dim": hd_full, "num_key_value_heads": kv_full}
                                       for i, t in enumerate(layer_types) if t == FULL}
        cfg.update(hf_token_ids(g))
        return cfg

    @classmethod
    def export_class(cls, g, mm) -> type[Arch]:
        # a Unified model's text GGUF says gemma4 like the others: its mmproj's projector tells
        if mm is not None and mm.get(Keys.ClipVision.PROJECTOR_TYPE) == Gemma4Unified.VISION_PROJECTOR:
            return Gemma4Unified
        return cls

    @classmethod
    def hf_config(cls, g, mm) -> dict:
        text = cls.hf_text_config(g)
        if mm is None:
            return text
        C, CV, CA = Keys.Clip, Keys.ClipVision, Keys.ClipAudio
        if mm.get(CV.PROJECTOR_TYPE, mm.get(C.PROJECTOR_TYPE)) != "gemma4v":
            raise GGQuantError(f"{mm.path}: vision projector type {mm.get(CV.PROJECTOR_TYPE)!r} is not Gemma 4's "
                               f"('gemma4v'); this mmproj belongs to another model")
        hidden, heads = mm.need(CV.EMBEDDING_LENGTH), mm.need(CV.Attention.HEAD_COUNT)
        hd = hidden // heads  # clip.cpp: head_dim = n_embd / n_head
        k = mm.shapes.get("v.blk.0.attn_k.weight")
        pos = mm.shapes.get("v.position_embd.weight")
        if k is None or pos is None:
            raise GGQuantError(f"{mm.path}: tensors 'v.blk.0.attn_k.weight' and 'v.position_embd.weight' are needed "
                               f"to describe the vision tower; the mmproj is incomplete")
        vision = dict(
            model_type="gemma4_vision", hidden_size=hidden, intermediate_size=mm.need(CV.FEED_FORWARD_LENGTH),
            num_hidden_layers=mm.need(CV.BLOCK_COUNT), num_attention_heads=heads, num_key_value_heads=k[0] // hd,
            head_dim=hd, patch_size=mm.need(CV.PATCH_SIZE), position_embedding_size=pos[1],
            pooling_kernel_size=mm.get(CV.Projector.SCALE_FACTOR, 3),  # clip.cpp gemma4v: n_merge 3 by default
            use_clipped_linears=any(n.startswith("v.blk.") and n.endswith(CLIP_SCALARS) for n in mm.shapes),
            standardize="v.std_bias" in mm.shapes,
            rms_norm_eps=f32_value(mm.get(CV.Attention.LAYERNORM_EPS, MMPROJ_EPS)),
        )
        audio = None
        if mm.get(C.HAS_AUDIO_ENCODER):
            if mm.get(CA.PROJECTOR_TYPE) != "gemma4a":
                raise GGQuantError(f"{mm.path}: audio projector type {mm.get(CA.PROJECTOR_TYPE)!r} is not Gemma 4's "
                                   f"('gemma4a')")
            need = ("a.conv1d.0.weight", "a.conv1d.1.weight", "a.blk.0.conv_dw.weight", "a.pre_encode.out.weight")
            missing = [n for n in need if n not in mm.shapes]
            if missing:
                raise GGQuantError(f"{mm.path}: tensor '{missing[0]}' is missing; the audio tower is incomplete")
            # gemma4a.cpp hard-codes chunk 12, left context 13, logit cap 50, residual 0.5, silu
            audio = dict(
                model_type="gemma4_audio", hidden_size=mm.need(CA.EMBEDDING_LENGTH),
                num_hidden_layers=mm.need(CA.BLOCK_COUNT), num_attention_heads=mm.need(CA.Attention.HEAD_COUNT),
                hidden_act="silu",
                subsampling_conv_channels=[mm.shapes["a.conv1d.0.weight"][0], mm.shapes["a.conv1d.1.weight"][0]],
                conv_kernel_size=mm.shapes["a.blk.0.conv_dw.weight"][-1], attention_chunk_size=12,
                attention_context_left=13, attention_context_right=0, attention_logit_cap=50.0,
                residual_weight=0.5, output_proj_dims=mm.shapes["a.pre_encode.out.weight"][0],
                use_clipped_linears=any(n.startswith("a.blk.") and n.endswith(CLIP_SCALARS) for n in mm.shapes),
                rms_norm_eps=f32_value(mm.get(CA.Attention.LAYERNORM_EPS, MMPROJ_EPS)),
            )
        text.pop("architectures")
        return dict(architectures=[cls.HF_CONDITIONAL], model_type=cls.HF_MODEL_TYPE, text_config=text,
                    vision_config=vision, audio_config=audio, tie_word_embeddings=text["tie_word_embeddings"],
                    **token_ids_by_text(g, **GEMMA4_MARKERS))

    @classmethod
    def hf_preprocessor(cls, config: dict, mm) -> dict:
        v = config["vision_config"]
        return {"image_processor_type": "Gemma4ImageProcessor", "do_convert_rgb": True, "do_normalize": False,
                "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 3,
                "image_mean": mm.get(Keys.ClipVision.IMAGE_MEAN), "image_std": mm.get(Keys.ClipVision.IMAGE_STD),
                "patch_size": v["patch_size"], "pooling_kernel_size": v["pooling_kernel_size"],
                "max_soft_tokens": 280}

    @classmethod
    def hf_generation_extra(cls, g) -> dict:
        # Gemma 4 Unified's generation_config.json suppress_tokens, which the converter stores
        ids = g.get(KEY_SUPPRESS_TOKENS)
        return {} if ids is None else {"suppress_tokens": [int(i) for i in ids]}

    @classmethod
    def hf_named_tokens(cls) -> dict[str, str]:
        return {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"}

    def hf_shape(self, hf_name, gguf_shape, part):
        if part == MMPROJ:
            if hf_name.endswith(CLIP_SCALARS) and tuple(gguf_shape) == (1,):
                return ()
            if hf_name.endswith("lconv1d.depthwise_conv1d.weight") and len(gguf_shape) == 2:
                return (gguf_shape[0], 1, gguf_shape[1])
            if hf_name.endswith("patch_embedder.input_proj.weight") and len(gguf_shape) == 4:
                return ConvToPatchEmbed().shape(tuple(gguf_shape))
        return tuple(gguf_shape)

    def denormalize_name(self, name, part, conditional):
        if part == TEXT:
            if conditional and name.startswith("model."):
                return self.CONDITIONAL_TEXT_PREFIX + name[len("model."):]
            return name
        for tower, mods in (("model.vision_tower.", CLIPPABLE_VISION), ("model.audio_tower.", CLIPPABLE_AUDIO)):
            if name.startswith(tower):
                for suf in (".weight", ".bias"):
                    base = name[: -len(suf)]
                    if name.endswith(suf) and any(base.endswith("." + m) for m in mods):
                        return base + ".linear" + suf
        return name


# =============================================================================================
# Gemma 4 "Unified" (Gemma4UnifiedForConditionalGeneration): encoder-free vision and audio
# =============================================================================================

# transformers 5.x Gemma4UnifiedTextConfig defaults (no per-layer embeddings, no experts)
GEMMA4_UNIFIED_TEXT_DEFAULTS = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=262_144,
    rms_norm_eps=1e-6, sliding_window=1024, final_logit_softcapping=None, tie_word_embeddings=True,
    attention_k_eq_v=False, num_kv_shared_layers=0, use_double_wide_mlp=False, use_bidirectional_attention="vision",
)
UNIFIED_VISION_DEFAULTS = dict(patch_size=16, pooling_kernel_size=3, mm_embed_dim=3840, mm_posemb_size=1120)
UNIFIED_AUDIO_DEFAULTS = dict(audio_embed_dim=640)
# tokenizer.ggml.suppress_tokens (gguf-py of llama.cpp: Keys.Tokenizer.SUPPRESS_TOKENS; the pinned gguf lacks
# it), an INT32 array as llama-vocab.cpp requires
KEY_SUPPRESS_TOKENS = "tokenizer.ggml.suppress_tokens"
# v.patch_norm.{bid}: llama.cpp gguf-py MODEL_TENSOR.V_ENC_EMBD_PATCH_NORM (not in the pinned gguf)
V_ENC_EMBD_PATCH_NORM = "v.patch_norm.{bid}"
UNIFIED_PATCH_NORMS = 3  # patch_ln1, patch_ln2 and pos_norm (written as patch_ln3)

_UV = "model.vision_embedder."
GEMMA4_UNIFIED_MMPROJ = (
    Rule(_UV + "patch_dense", MODEL_TENSOR.V_ENC_EMBD_PATCH,
         "raw pixel patch -> embedding [mm_embed, 3*P*P] (P = patch * pooling), columns reordered from the "
         "checkpoint's (row, col, rgb) to ggml im2col's (rgb, row, col); F16 in f16 mode, else F32"),
    Rule(_UV + "patch_ln{bid}", V_ENC_EMBD_PATCH_NORM,
         "LayerNorms: 1 on the raw patch [3*P*P] (reordered like patch_dense's columns), 2 after the dense, "
         "3 after the position embedding (the checkpoint's pos_norm)"),
    Rule(_UV + "pos_embedding", MODEL_TENSOR.V_ENC_EMBD_POS,
         "factorized 2-D positions [posemb, 2, mm_embed] -> [2, posemb, mm_embed], F32", ("",), ".weight"),
    Rule("model.embed_vision.embedding_projection", MODEL_TENSOR.V_MM_INP_PROJ,
         "RMSNorm'd vision embedding -> text hidden [H_text, mm_embed]"),
    Rule("model.embed_audio.embedding_projection", MODEL_TENSOR.A_MM_INP_PROJ,
         "RMSNorm'd raw waveform frame -> text hidden [H_text, audio_embed]"),
)


def chw_permutation(p: int) -> np.ndarray:
    """perm[i] = the checkpoint's (row, col, rgb) column of ggml im2col's (rgb, row, col) position i
    (Gemma4UnifiedVisionAudioModel.modify_tensors: ch = i // p^2, row = i % p^2 // p, col = i % p)."""
    i = np.arange(p * p * 3)
    ch, row, col = i // (p * p), (i % (p * p)) // p, i % p
    return row * p * 3 + col * 3 + ch


class PatchColumnsToCHW(Transform):
    """patch_dense.weight's columns (or patch_ln1's values) in CHW order: x[..., perm]."""

    whole = True  # a 1-D patch_ln1 would otherwise be cut into chunks of its values

    def __init__(self, p: int, inverse: bool = False):
        perm = chw_permutation(p)
        self.perm = np.argsort(perm) if inverse else perm
        self.p, self.inv = p, inverse
        self.label = "columns (r, c, rgb) -> (rgb, r, c)" if not inverse else "columns (rgb, r, c) -> (r, c, rgb)"

    def __call__(self, x, src_dtype):
        return np.ascontiguousarray(x[..., self.perm])

    def inverse(self, hf_shape):
        return PatchColumnsToCHW(self.p, not self.inv)


class SwapOuterAxes(Transform):
    """[a, b, ...] -> [b, a, ...] (pos_embedding.permute(1, 0, 2)); the whole tensor at once."""

    whole = True
    label = "permute(1, 0, 2)"

    def shape(self, s):
        return (s[1], s[0]) + tuple(s[2:])

    def __call__(self, x, src_dtype):
        return np.ascontiguousarray(np.swapaxes(x, 0, 1))

    def inverse(self, hf_shape):
        return self


@register("Gemma4UnifiedForConditionalGeneration")
class Gemma4Unified(Gemma4):
    """Gemma 4 "Unified" (llama.cpp conversion/gemma.py Gemma4UnifiedModel for the text GGUF,
    Gemma4UnifiedVisionAudioModel for the mmproj): a dense Gemma 4 text decoder, plus
    generation_config.json's suppress_tokens in the GGUF; the mmproj holds the encoder-free
    vision embedder (projector gemma4uv) and the audio frame projection (gemma4ua)."""

    TEXT_DEFAULTS = GEMMA4_UNIFIED_TEXT_DEFAULTS
    MMPROJ_TENSORS = GEMMA4_UNIFIED_MMPROJ
    VISION_PROJECTOR, AUDIO_PROJECTOR = "gemma4uv", "gemma4ua"
    MMPROJ_PREFIXES = (_UV, "model.embed_vision.", "model.embed_audio.")

    def suppress_tokens(self) -> list | None:
        """Gemma4UnifiedModel._get_suppress_tokens: generation_config.json's suppress_tokens."""
        gen = read_json(self.dir / "generation_config.json", "", required=False)
        tokens = gen.get("suppress_tokens") if isinstance(gen, dict) else None
        if tokens is not None and (not isinstance(tokens, list) or not all(_is_int(t) for t in tokens)):
            raise GGQuantError(f"{self.dir / 'generation_config.json'}: 'suppress_tokens' must be a list of token "
                               f"ids, got {tokens!r}")
        return tokens

    def text_metadata(self, kv: KV, file_type: int) -> None:
        super().text_metadata(kv, file_type)
        tokens = self.suppress_tokens()
        if tokens is not None:
            kv.array(KEY_SUPPRESS_TOKENS, tokens)

    def normalize_name(self, name: str) -> str:
        # Gemma4UnifiedVisionAudioModel.modify_tensors: pos_norm is stored as patch_ln3
        return super().normalize_name(name).replace(_UV + "pos_norm.", _UV + f"patch_ln{UNIFIED_PATCH_NORMS}.")

    def block_count_for(self, part: str) -> int:
        return self.block_count if part == TEXT else UNIFIED_PATCH_NORMS + 1

    def map_tensor(self, name, part, src=None):
        return Arch.map_tensor(self, name, part, src)

    def mmproj_hparams(self) -> tuple[dict, dict | None]:
        """Gemma4UnifiedVisionAudioModel.__init__: vision hidden = mm_embed_dim, audio hidden =
        audio_embed_dim, and no transformer layers (0 sizes written, as the converter does)."""
        vc, ac = self.raw.get("vision_config"), self.raw.get("audio_config")
        if not isinstance(vc, dict) or not isinstance(ac, dict):
            raise GGQuantError(f"{self.config_path}: a {self.hf_arch} mmproj needs both 'vision_config' and "
                               f"'audio_config' (llama.cpp's converter asserts them)")
        vc, ac = {**UNIFIED_VISION_DEFAULTS, **vc}, {**UNIFIED_AUDIO_DEFAULTS, **ac}
        vis = dict(vc, hidden_size=vc["mm_embed_dim"], intermediate_size=0, num_hidden_layers=0, num_attention_heads=0)
        aud = dict(ac, hidden_size=ac["audio_embed_dim"], intermediate_size=0, num_hidden_layers=0,
                   num_attention_heads=0)
        return vis, aud

    def model_patch_size(self) -> int:
        vis, _ = self.mmproj_hparams()
        return vis.get("model_patch_size") or vis["patch_size"] * vis["pooling_kernel_size"]

    def transform(self, hf_name, gguf_name, src, part):
        if part == MMPROJ:
            if hf_name in (_UV + "patch_dense.weight", _UV + "patch_ln1.weight", _UV + "patch_ln1.bias"):
                p = self.model_patch_size()
                if src.shape[-1] != 3 * p * p:
                    raise GGQuantError(f"{src.file}: tensor '{src.name}' has {src.shape[-1]} columns, but a "
                                       f"{p}x{p} RGB patch (patch_size * pooling_kernel_size) has {3 * p * p}")
                return PatchColumnsToCHW(p)
            if hf_name == _UV + "pos_embedding":
                if src.ndim != 3 or src.shape[1] != 2:
                    raise GGQuantError(f"{src.file}: tensor '{src.name}' has shape {list(src.shape)}; expected the "
                                       f"factorized position table [posemb, 2, mm_embed_dim]")
                return SwapOuterAxes()
            return SCALAR_TO_1D if not src.shape else IDENTITY
        return super().transform(hf_name, gguf_name, src, part)

    def force_type(self, hf_name, gguf_name, n_dims, ftype, part):
        if part == MMPROJ and hf_name == _UV + "pos_embedding":
            return T.F32  # ModelBase.prepare_tensors: V_ENC_EMBD_POS is always F32
        return super().force_type(hf_name, gguf_name, n_dims, ftype, part)

    # --- GGUF -> HF -------------------------------------------------------------------------
    HF_CONDITIONAL, HF_MODEL_TYPE = "Gemma4UnifiedForConditionalGeneration", "gemma4_unified"
    HF_UNIFIED_TEXT_MODEL_TYPE = "gemma4_unified_text"

    @classmethod
    def hf_config(cls, g, mm) -> dict:
        """Gemma4UnifiedConfig from the text GGUF and the gemma4uv / gemma4ua mmproj: the embedders'
        sizes are in the tensor shapes (Gemma4UnifiedVisionAudioModel writes zero-layer towers)."""
        text = cls.hf_text_config(g)
        if mm is None:
            return text  # the text decoder alone: a Gemma4ForCausalLM
        C, CV, CA = Keys.Clip, Keys.ClipVision, Keys.ClipAudio
        need = ("v.patch_embd.weight", "v.position_embd.weight", "mm.input_projection.weight",
                "mm.a.input_projection.weight")
        missing = [n for n in need if n not in mm.shapes]
        if missing or not mm.get(C.HAS_AUDIO_ENCODER) or mm.get(CA.PROJECTOR_TYPE) != cls.AUDIO_PROJECTOR:
            what = f"tensor '{missing[0]}' is missing" if missing else \
                f"audio projector {mm.get(CA.PROJECTOR_TYPE)!r} is not {cls.AUDIO_PROJECTOR!r}"
            raise GGQuantError(f"{mm.path}: {what}; a {cls.VISION_PROJECTOR} mmproj of a Gemma 4 Unified holds the "
                               f"vision and the audio embedders")
        patch, dense = mm.need(CV.PATCH_SIZE), mm.shapes["v.patch_embd.weight"]  # [mm_embed, 3*P*P]
        side = math.isqrt(dense[-1] // 3)
        if 3 * side * side != dense[-1] or side % patch:
            raise GGQuantError(f"{mm.path}: v.patch_embd.weight has {dense[-1]} columns, not 3 * P * P for a merged "
                               f"patch P that is a multiple of the patch size {patch}")
        vision = dict(model_type="gemma4_unified_vision", patch_size=patch, pooling_kernel_size=side // patch,
                      mm_embed_dim=mm.need(CV.EMBEDDING_LENGTH), mm_posemb_size=mm.shapes["v.position_embd.weight"][1],
                      output_proj_dims=mm.shapes["mm.input_projection.weight"][1],
                      rms_norm_eps=f32_value(mm.get(CV.Attention.LAYERNORM_EPS, MMPROJ_EPS)))
        audio = dict(model_type="gemma4_unified_audio", audio_embed_dim=mm.shapes["mm.a.input_projection.weight"][1],
                     rms_norm_eps=f32_value(mm.get(CA.Attention.LAYERNORM_EPS, MMPROJ_EPS)))
        text.pop("architectures")
        text.pop("vocab_size_per_layer_input")  # Gemma4UnifiedTextConfig has no per-layer embeddings
        # the Gemma 4 keys a Unified config.json carries (llama.cpp's Gemma4Model.set_gguf_parameters
        # reads moe_intermediate_size without a default)
        for k in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            text.setdefault(k, None)
        text["model_type"] = cls.HF_UNIFIED_TEXT_MODEL_TYPE
        return dict(architectures=[cls.HF_CONDITIONAL], model_type=cls.HF_MODEL_TYPE, text_config=text,
                    vision_config=vision, audio_config=audio, tie_word_embeddings=text["tie_word_embeddings"],
                    **token_ids_by_text(g, **GEMMA4_MARKERS))

    def hf_shape(self, hf_name, gguf_shape, part):
        if part == MMPROJ and hf_name == _UV + "pos_embedding":
            return SwapOuterAxes().shape(tuple(gguf_shape))
        return tuple(gguf_shape)

    def denormalize_name(self, name, part, conditional):
        if part == MMPROJ:  # the inverse of normalize_name's pos_norm -> patch_ln3
            return name.replace(_UV + f"patch_ln{UNIFIED_PATCH_NORMS}.", _UV + "pos_norm.")
        return super().denormalize_name(name, part, conditional)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# =============================================================================================
# Gemma 4 assistant drafters (Gemma4AssistantForCausalLM, Gemma4UnifiedAssistantForCausalLM)
# =============================================================================================

# general.architecture of the drafters (llama.cpp gguf-py MODEL_ARCH.GEMMA4_ASSISTANT; the pinned gguf lacks it)
GEMMA4_ASSISTANT_ARCH = "gemma4-assistant"
GEMMA4_ASSISTANT_TEXT = GEMMA4_TEXT + (
    Rule("pre_projection", "nextn.pre_projection",
         "[target embedding, target hidden state] -> drafter hidden [hidden, 2*backbone_hidden] "
         "(llama.cpp gguf-py MODEL_TENSOR.NEXTN_PROJ_PRE)", (".weight",)),
    Rule("post_projection", "nextn.post_projection",
         "drafter hidden -> the target's hidden state for the next draft step [backbone_hidden, hidden] "
         "(MODEL_TENSOR.NEXTN_PROJ_POST)", (".weight",)),
)


@register("Gemma4AssistantForCausalLM", "Gemma4UnifiedAssistantForCausalLM")
class Gemma4Assistant(Gemma4):
    """A Gemma 4 multi-token-prediction drafter (llama.cpp conversion/gemma.py Gemma4AssistantModel,
    src/models/gemma4-assistant.cpp): a Gemma 4 text decoder whose layers all attend over the
    target model's KV cache (no k/v of their own), between pre_projection and post_projection;
    the GGUF records the target's hidden size (embedding_length_out) and the layer count as
    nextn_predict_layers. The masked embedding (the centroid-ordered vocabulary of the E2B/E4B
    drafters) is not converted, as llama.cpp's converter skips it."""

    gguf_arch = GEMMA4_ASSISTANT_ARCH
    TEXT_TENSORS = GEMMA4_ASSISTANT_TEXT
    MMPROJ_TENSORS = ()

    def validate_hparams(self):
        h, L = self.hparams, self.block_count
        backbone = self.backbone_hidden_size
        if backbone == h.get("hidden_size"):
            raise GGQuantError(f"{self.config_path}: backbone_hidden_size = {backbone} equals the drafter's own "
                               f"hidden_size; llama.cpp refuses such a gemma4-assistant (embedding_length_out must "
                               f"carry the target's hidden size)")
        n_shared = self.need("num_kv_shared_layers")
        if n_shared != L:
            raise GGQuantError(f"{self.config_path}: num_kv_shared_layers = {n_shared}; every layer of a Gemma 4 "
                               f"assistant reads the target's KV cache ({L} layers)")
        if h.get("enable_moe_block") or h.get("use_double_wide_mlp") or (h.get("hidden_size_per_layer_input") or 0):
            raise GGQuantError(f"{self.config_path}: a Gemma 4 assistant has no experts, double-wide MLP or per-layer "
                               f"embeddings (Gemma4AssistantConfig.validate_architecture)")
        Gemma4._validate_attention(self)

    @property
    def backbone_hidden_size(self) -> int:
        v = self.raw.get("backbone_hidden_size")
        if not _is_int(v) or v < 1:
            raise GGQuantError(f"{self.config_path}: key 'backbone_hidden_size' (the target model's hidden size) is "
                               f"missing or not a positive integer (got {v!r}); an assistant cannot be converted "
                               f"without its backbone's config")
        return v

    def skip_tensor(self, name, part):
        # Gemma4AssistantModel.filter_tensors: "masked_embedding" is not converted
        return "masked_embedding" in name or super().skip_tensor(name, part)

    def expected_shapes(self):
        exp = super().expected_shapes()
        H, B = self.hparams["hidden_size"], self.backbone_hidden_size
        exp.update({"pre_projection.weight": ((H, 2 * B), True), "post_projection.weight": ((B, H), True)})
        return exp

    def text_metadata(self, kv: KV, file_type: int) -> None:
        super().text_metadata(kv, file_type)
        kv.u32(Keys.LLM.EMBEDDING_LENGTH_OUT.format(arch=self.gguf_arch), self.backbone_hidden_size)
        kv.u32(Keys.LLM.NEXTN_PREDICT_LAYERS.format(arch=self.gguf_arch), self.block_count)

    def has_mmproj(self) -> bool:
        return False

    # --- GGUF -> HF -------------------------------------------------------------------------
    HF_ASSISTANT = "Gemma4AssistantForCausalLM"

    @classmethod
    def hf_config(cls, g, mm) -> dict:
        """Gemma4AssistantConfig: the text decoder's config, backbone_hidden_size from
        embedding_length_out. The masked embedding (centroids + token ordering of the E2B/E4B
        drafters) is not in the GGUF, so the drafter comes back with use_ordered_embeddings off:
        its logits are lm_head's over the whole vocabulary, as llama.cpp's gemma4-assistant graph
        computes them. The GGUF does not tell a Unified drafter (Gemma4UnifiedAssistantForCausalLM)
        from the others; it is written as the Gemma4AssistantForCausalLM its tensors load into."""
        if mm is not None:
            raise GGQuantError(f"{mm.path}: a {GEMMA4_ASSISTANT_ARCH} drafter has no mmproj; export {g.path} alone")
        text = cls.hf_text_config(g)
        text.pop("architectures")
        # no layer has K/V weights of its own, so V = K cannot be seen: Gemma4TextConfig's default
        text["attention_k_eq_v"] = False
        text["vocab_size_per_layer_input"] = 0  # Gemma4AssistantConfig.validate_architecture: no per-layer inputs
        backbone = g.need(Keys.LLM.EMBEDDING_LENGTH_OUT.format(arch=g.arch))
        return dict(architectures=[cls.HF_ASSISTANT], model_type="gemma4_assistant", backbone_hidden_size=backbone,
                    text_config=text, tie_word_embeddings=text["tie_word_embeddings"], use_ordered_embeddings=False)
