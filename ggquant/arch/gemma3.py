"""Gemma 3 text decoder (Gemma3ForCausalLM, and the text part of Gemma3ForConditionalGeneration).

What llama.cpp's converter does for it (conversion/gemma.py Gemma3Model on top of
conversion/base.py TextModel):
- every `*norm.weight` is stored as `1 + w`: Gemma3RMSNorm multiplies by (1 + weight);
- token_embd is trimmed to the tokenizer's size (out-of-vocabulary padding rows dropped);
- tied embeddings: no output.weight (llama.cpp reuses token_embd);
- vocabulary from tokenizer.model (SentencePiece), add_space_prefix = false; a folder with only
  tokenizer.json (transformers 5 writes no tokenizer.model) gets the same vocabulary rebuilt from it
  (vocab.sentencepiece_tokens_from_json), which llama.cpp's converter does not do.

Read back (runtime/models/gemma3.py and `convert --to hf`): Gemma3Hparams decodes the GGUF keys
as llama.cpp's src/models/gemma3.cpp loads them; Gemma3.hf_config turns them into config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR, GGMLQuantizationType, Keys

from ggquant.arch import register
from ggquant.arch import vocab as V
from ggquant.arch.base import (FULL, MMPROJ, SLIDING, TEXT, Arch, GGUFFacts, Rule, TextHparams, f32_value, hf_rope_parameters, hf_token_ids, swa_pattern, token_ids_by_text)
from ggquant.formats.gguf import KV
from ggquant.formats.hf_folder import read_json, with_defaults
from ggquant.arch.transforms import IDENTITY, SCALAR_TO_1D, AddConstant, Transform
from ggquant.errors import GGQuantError
from ggquant.tensor import Tensor

NORM_SHIFT = 1.0  # Gemma3RMSNorm: output * (1 + weight)
SWA_PATTERN_HF_DEFAULT = 6  # transformers Gemma3TextConfig.sliding_window_pattern: every 6th layer global

# transformers 5.x Gemma3TextConfig defaults (configuration_gemma3.py); llama.cpp's converter
# sees them through AutoConfig.to_dict() when config.json leaves a key out.
GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
    rms_norm_eps=1e-6, sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
    tie_word_embeddings=True,
)
GEMMA3_ROPE_THETA = {"global": 1_000_000.0, "local": 10_000.0}

# Decoder-layer tensors shared by Gemma 3 and Gemma 4 (HF names after llama.cpp drops
# "language_model."; shapes [out, in] in HF order).
DECODER_LAYER = (
    Rule("model.layers.{bid}.input_layernorm", MODEL_TENSOR.ATTN_NORM, "RMSNorm gain before attention [hidden]"),
    Rule("model.layers.{bid}.self_attn.q_proj", MODEL_TENSOR.ATTN_Q, "query projection [n_head*head_dim, hidden]"),
    Rule("model.layers.{bid}.self_attn.k_proj", MODEL_TENSOR.ATTN_K, "key projection [n_kv_head*head_dim, hidden]"),
    Rule("model.layers.{bid}.self_attn.v_proj", MODEL_TENSOR.ATTN_V, "value projection [n_kv_head*head_dim, hidden]"),
    Rule("model.layers.{bid}.self_attn.o_proj", MODEL_TENSOR.ATTN_OUT, "attention output [hidden, n_head*head_dim]"),
    Rule("model.layers.{bid}.self_attn.q_norm", MODEL_TENSOR.ATTN_Q_NORM, "per-head RMSNorm gain on q [head_dim]"),
    Rule("model.layers.{bid}.self_attn.k_norm", MODEL_TENSOR.ATTN_K_NORM, "per-head RMSNorm gain on k [head_dim]"),
    Rule("model.layers.{bid}.post_attention_layernorm", MODEL_TENSOR.ATTN_POST_NORM,
         "RMSNorm gain on the attention output, before the residual add [hidden]"),
    Rule("model.layers.{bid}.pre_feedforward_layernorm", MODEL_TENSOR.FFN_PRE_NORM,
         "RMSNorm gain before the MLP [hidden]"),
    Rule("model.layers.{bid}.post_feedforward_layernorm", MODEL_TENSOR.FFN_POST_NORM,
         "RMSNorm gain on the MLP output, before the residual add [hidden]"),
    Rule("model.layers.{bid}.mlp.gate_proj", MODEL_TENSOR.FFN_GATE, "MLP gate (gelu-tanh) [ffn, hidden]"),
    Rule("model.layers.{bid}.mlp.up_proj", MODEL_TENSOR.FFN_UP, "MLP up [ffn, hidden]"),
    Rule("model.layers.{bid}.mlp.down_proj", MODEL_TENSOR.FFN_DOWN, "MLP down [hidden, ffn]"),
)
DECODER_GLOBAL = (
    Rule("model.embed_tokens", MODEL_TENSOR.TOKEN_EMBD,
         "token embeddings [n_vocab, hidden]; the output matrix too when tied"),
    Rule("model.norm", MODEL_TENSOR.OUTPUT_NORM, "final RMSNorm gain [hidden]"),
    Rule("lm_head", MODEL_TENSOR.OUTPUT, "untied output matrix [n_vocab, hidden] (absent when tie_word_embeddings)"),
)


# SigLIP tower + Gemma 3 projector (llama.cpp Gemma3VisionModel). Names as published
# (vision_tower.vision_model.*); transformers 5 saves the tower without "vision_model." and
# may prefix "model.", which ggquant accepts too.
_SV = "vision_tower.vision_model."
GEMMA3_MMPROJ = (
    Rule("multi_modal_projector.mm_input_projection", MODEL_TENSOR.V_MM_INP_PROJ,
         "SigLIP -> text hidden [vision_hidden, text_hidden] (stored as a plain matrix, no transpose), F16",
         (".weight",)),
    Rule("multi_modal_projector.mm_soft_emb_norm", MODEL_TENSOR.V_MM_SOFT_EMB_NORM,
         "RMSNorm gain before the projection, +1"),
    Rule(_SV + "embeddings.patch_embedding", MODEL_TENSOR.V_ENC_EMBD_PATCH, "patch conv [hidden, 3, p, p], F32"),
    Rule(_SV + "embeddings.position_embedding", MODEL_TENSOR.V_ENC_EMBD_POS,
         "learned positions [n_patches, hidden], F32"),
    Rule(_SV + "encoder.layers.{bid}.layer_norm1", MODEL_TENSOR.V_ENC_INPUT_NORM,
         "LayerNorm before attention [hidden]"),
    Rule(_SV + "encoder.layers.{bid}.layer_norm2", MODEL_TENSOR.V_ENC_POST_ATTN_NORM,
         "LayerNorm before the MLP [hidden]"),
    Rule(_SV + "encoder.layers.{bid}.self_attn.q_proj", MODEL_TENSOR.V_ENC_ATTN_Q, "query [hidden, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.self_attn.k_proj", MODEL_TENSOR.V_ENC_ATTN_K, "key [hidden, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.self_attn.v_proj", MODEL_TENSOR.V_ENC_ATTN_V, "value [hidden, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.self_attn.out_proj", MODEL_TENSOR.V_ENC_ATTN_O,
         "attention output [hidden, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.mlp.fc1", MODEL_TENSOR.V_ENC_FFN_UP, "MLP up (gelu) [ffn, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.mlp.fc2", MODEL_TENSOR.V_ENC_FFN_DOWN, "MLP down [hidden, ffn]"),
    Rule(_SV + "post_layernorm", MODEL_TENSOR.V_POST_NORM, "final LayerNorm [hidden]"),
)
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16)
DEFAULT_IMAGE_SEQ_LENGTH = 256  # Gemma 3 processors: 256 soft tokens per image
DEFAULT_PROJ_SCALE_FACTOR = 4  # clip.cpp's default pooling for gemma3; written only when different


def rope_parameters_gemma3(h: dict) -> dict:
    """transformers Gemma3TextConfig.convert_rope_params_to_dict: nested per layer type, with
    legacy rope_scaling / rope_theta / rope_local_base_freq folded in."""
    rp = h.get("rope_parameters")
    rp = {k: dict(v) if isinstance(v, dict) else v for k, v in rp.items()} if isinstance(rp, dict) else {
        SLIDING: {"rope_type": "default"}, FULL: {"rope_type": "default"}}
    if isinstance(h.get("rope_scaling"), dict):
        rp.setdefault(FULL, {"rope_type": "default"}).update(h["rope_scaling"])
    if not isinstance(rp.get(FULL), dict):
        rp[FULL] = {"rope_type": "default"}
    rp[FULL].setdefault("rope_theta", h.get("rope_theta", GEMMA3_ROPE_THETA["global"]))
    if not isinstance(rp.get(SLIDING), dict):
        rp[SLIDING] = {"rope_type": "default"}
    rp[SLIDING].setdefault("rope_theta", h.get("rope_local_base_freq", GEMMA3_ROPE_THETA["local"]))
    for v in (rp[FULL], rp[SLIDING]):
        v.setdefault("rope_type", v.get("type", "default"))
    return rp


# llama.cpp src/models/gemma3.cpp load_arch_hparams
SWA_PATTERN_DEFAULT = 6  # load_swa_pattern(ml, 6): every 6th layer global when the key is absent
LAYERS_27B = 62  # the 27B model scales q by 1/sqrt(n_embd / n_head) instead of 1/sqrt(head_dim)


@dataclass
class Gemma3Hparams(TextHparams):
    """A gemma3 GGUF's hyperparameters, decoded once for the runtime (runtime/models/gemma3.py)
    and the GGUF -> HF direction (Gemma3.hf_text_config)."""

    @classmethod
    def decode(cls, g: GGUFFacts) -> dict:
        """llama_model_gemma3::load_arch_hparams: sliding-window layers when attention.sliding_window
        is set, chosen by attention.sliding_window_pattern (llama_model_base::load_swa_pattern)."""
        d = super().decode(g)
        a, A, n_layer = g.arch, Keys.Attention, d["n_layer"]
        if d["head_dim"] != d["head_dim_v"]:
            raise GGQuantError(f"{g.path}: gemma3 with key_length != value_length is not supported")
        d["n_swa"] = g.need(A.SLIDING_WINDOW.format(arch=a), default=0)
        if d["n_swa"] > 0:
            d["is_swa"] = swa_pattern(g, n_layer, SWA_PATTERN_DEFAULT)
        return d

    @property
    def query_pre_attn_scalar(self) -> int:
        return self.n_embd // self.n_head[0] if self.n_layer == LAYERS_27B else self.head_dim

    @property
    def attn_scale(self) -> float:
        """f_attention_scale, applied to q before attention: 1 / sqrt(query_pre_attn_scalar) in float32."""
        return float(np.float32(1.0) / np.sqrt(np.float32(self.query_pre_attn_scalar)))


@register("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
class Gemma3(Arch):
    model_arch = MODEL_ARCH.GEMMA3
    TEXT_TENSORS = DECODER_GLOBAL + DECODER_LAYER
    MMPROJ_TENSORS = GEMMA3_MMPROJ
    TEXT_DEFAULTS = GEMMA3_TEXT_DEFAULTS
    REQUIRED_HPARAMS = Arch.REQUIRED_HPARAMS + ("head_dim",)
    HF_TOKENIZER_CLASS = "GemmaTokenizer"
    norm_shift = NORM_SHIFT

    def text_hparams(self, config: dict) -> dict:
        h = super().text_hparams(config)
        h = with_defaults(h, self.TEXT_DEFAULTS)
        if not isinstance(h.get("layer_types"), list):
            n = h.get("num_hidden_layers")
            pattern = h.get("sliding_window_pattern", h.get("_sliding_window_pattern", SWA_PATTERN_HF_DEFAULT))
            if isinstance(n, int) and isinstance(pattern, int) and pattern > 0:
                h["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        h["rope_parameters"] = rope_parameters_gemma3(h)
        return h

    # --- vocabulary --------------------------------------------------------------------------
    def read_tokens(self):
        if (self.dir / "tokenizer.model").is_file():
            return self.sp_tokens()
        if (self.dir / "tokenizer.json").is_file():
            # transformers 5 and the tools built on it write no tokenizer.model (beyond llama.cpp,
            # whose converter takes such a folder for a GPT-2 BPE)
            return V.sentencepiece_tokens_from_json(self.dir, self._vocab_size())
        raise GGQuantError(f"{self.dir}: neither tokenizer.model nor tokenizer.json found; the Gemma 3 vocabulary "
                           f"is read from one of them (copy them from the original model)")

    def _vocab_size(self) -> int | None:
        n = self.hparams.get("vocab_size_per_layer_input") or self.hparams.get("vocab_size")
        return n if isinstance(n, int) else None

    def sp_tokens(self):
        """_create_vocab_sentencepiece, padded to vocab_size_per_layer_input or vocab_size."""
        if not hasattr(self, "_sp_tokens"):
            self._sp_tokens = V.sentencepiece_tokens(self.dir, self._vocab_size())
        return self._sp_tokens

    def n_vocab_real(self) -> int:
        """The token_embd rows llama.cpp keeps (Gemma3Model.modify_tensors)."""
        if (self.dir / "tokenizer.model").is_file():
            return len(self.sp_tokens()[0])
        if type(self).read_tokens is Gemma3.read_tokens:  # the SentencePiece vocabulary, from tokenizer.json
            return len(self.tokens()[0])
        tj = read_json(self.dir / "tokenizer.json", "the tokenizer is needed to size token_embd")
        return len(tj["model"]["vocab"]) + len(tj.get("added_tokens") or [])

    def vocab(self, kv: KV) -> None:
        tokens, scores, types = self.tokens()
        kv.string(Keys.Tokenizer.MODEL, "llama")
        kv.string(Keys.Tokenizer.PRE, "default")
        kv.array(Keys.Tokenizer.LIST, tokens)
        kv.array(Keys.Tokenizer.SCORES, scores)
        kv.array(Keys.Tokenizer.TOKEN_TYPE, types)
        V.SpecialVocab(self.dir, load_merges=False, n_vocab=len(tokens)).write(kv)
        kv.bool(Keys.Tokenizer.ADD_PREFIX, False)

    # --- tensors ----------------------------------------------------------------------------
    def n_outer(self, hf_name: str, src: Tensor, part: str) -> int:
        if part == TEXT and "embed_tokens.weight" in hf_name:
            if not hasattr(self, "_n_vocab_real"):
                self._n_vocab_real = self.n_vocab_real()
            return min(src.n_outer, self._n_vocab_real)
        return src.n_outer

    def transform(self, hf_name: str, gguf_name: str, src: Tensor, part: str) -> Transform:
        if part == TEXT and self.norm_shift and hf_name.endswith("norm.weight"):
            return AddConstant(self.norm_shift)
        if part == MMPROJ and "soft_emb_norm.weight" in hf_name:
            return AddConstant(NORM_SHIFT)  # the projector's Gemma3RMSNorm; SigLIP norms are plain
        return SCALAR_TO_1D if not src.shape else IDENTITY

    # --- mmproj (SigLIP) ------------------------------------------------------------------------
    def has_mmproj(self) -> bool:
        return isinstance(self.raw.get("vision_config"), dict)

    def is_mmproj_tensor(self, name: str) -> bool:
        # Gemma3VisionModel.filter_tensors keeps only these prefixes
        return self.has_mmproj() and name.removeprefix("model.").startswith(
            ("multi_modal_projector.", "vision_tower.", "multimodal_projector.", "vision_model."))

    def normalize_name(self, name: str) -> str:
        name = super().normalize_name(name)
        if not self.is_text_tensor(name):
            name = name.removeprefix("model.").replace("_weight", ".weight")
            if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
                name = "vision_tower.vision_model." + name[len("vision_tower."):]
        return name

    def skip_tensor(self, name: str, part: str) -> bool:
        return super().skip_tensor(name, part) or (part == MMPROJ and "vision_model.head." in name)

    def block_count_for(self, part: str) -> int:
        return self.block_count if part == TEXT else self.vision_hparams()["num_hidden_layers"]

    def force_type(self, hf_name, gguf_name, n_dims, ftype, part):
        if part != MMPROJ:
            return None
        # Gemma3VisionModel.tensor_force_quant (llama.cpp issue 13025), then MmprojModel's
        if "input_projection" in hf_name:
            return GGMLQuantizationType.F16
        if ".embeddings." in hf_name:
            return GGMLQuantizationType.F32
        if ".patch_embd.weight" in gguf_name:
            return GGMLQuantizationType.F16 if ftype == GGMLQuantizationType.F16 else GGMLQuantizationType.F32
        return None

    def vision_hparams(self) -> dict:
        vc = self.raw.get("vision_config")
        if not isinstance(vc, dict):
            raise GGQuantError(f"{self.config_path}: no 'vision_config'; nothing to write as an mmproj")
        return {**SIGLIP_DEFAULTS, **vc}

    def mmproj_metadata(self, kv: KV, file_type: int) -> None:
        """MmprojModel + Gemma3VisionModel.set_gguf_parameters."""
        vis = self.vision_hparams()
        self.mmproj_vision_common(kv, file_type, vis, vis["image_size"])
        kv.string(Keys.Clip.PROJECTOR_TYPE, "gemma3")
        kv.f32(Keys.ClipVision.Attention.LAYERNORM_EPS, vis.get("layer_norm_eps", 1e-6))
        kv.bool(Keys.ClipVision.USE_GELU, True)
        seq = self.preprocessor().get("image_seq_length", DEFAULT_IMAGE_SEQ_LENGTH)
        per_side = int(seq ** 0.5)
        scale = (vis["image_size"] // vis["patch_size"]) // per_side if per_side else 0
        if scale > 0 and scale != DEFAULT_PROJ_SCALE_FACTOR:
            kv.u32(Keys.ClipVision.Projector.SCALE_FACTOR, scale)

    def expected_layer_shapes(self, il: int) -> dict[str, tuple[tuple[int, ...], bool]]:
        """The llama-style layer plus Gemma's q/k norms and the norms around the MLP."""
        exp = super().expected_layer_shapes(il)
        H, d, p = self.hparams["hidden_size"], self.layer_dims(il), f"model.layers.{il}."
        exp.update({
            p + "self_attn.q_norm.weight": ((d["head_dim"],), True),
            p + "self_attn.k_norm.weight": ((d["head_dim"],), d.get("has_kv", True)),
            p + "pre_feedforward_layernorm.weight": ((H,), True),
            p + "post_feedforward_layernorm.weight": ((H,), True),
        })
        return exp

    def validate_hparams(self) -> None:
        h = self.hparams
        if h.get("attn_logit_softcapping") is not None:
            raise GGQuantError(f"{self.config_path}: attn_logit_softcapping is set; Gemma 3 has none and "
                               f"llama.cpp's converter refuses it")
        lt = h.get("layer_types")
        if not isinstance(lt, list) or len(lt) != self.block_count or any(t not in (SLIDING, FULL) for t in lt):
            raise GGQuantError(f"{self.config_path}: 'layer_types' must list {self.block_count} entries of "
                               f"'{SLIDING}'/'{FULL}', got {lt!r}")

    # --- metadata ---------------------------------------------------------------------------
    def text_metadata(self, kv: KV, file_type: int) -> None:
        """TextModel.set_gguf_parameters, then conversion/gemma.py Gemma3Model.set_gguf_parameters
        (which writes several keys a second time)."""
        super().text_metadata(kv, file_type)
        a, h = self.gguf_arch, self.hparams
        L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
        kv.u32(L.CONTEXT_LENGTH.format(arch=a), h.get("max_position_embeddings", 131072))
        kv.u32(A.HEAD_COUNT.format(arch=a), h.get("num_attention_heads", 8))
        kv.f32(A.LAYERNORM_RMS_EPS.format(arch=a), h.get("rms_norm_eps", 1e-6))
        kv.u32(A.KEY_LENGTH.format(arch=a), h.get("head_dim", 256))
        kv.u32(A.VALUE_LENGTH.format(arch=a), h.get("head_dim", 256))
        rp = h["rope_parameters"]
        kv.f32(R.FREQ_BASE.format(arch=a), rp.get(FULL, rp).get("rope_theta", 1_000_000.0))
        if h.get("final_logit_softcapping"):
            kv.f32(L.FINAL_LOGIT_SOFTCAPPING.format(arch=a), h["final_logit_softcapping"])
        if h.get("sliding_window_pattern") != 1:
            kv.u32(A.SLIDING_WINDOW.format(arch=a), self.need("sliding_window"))
        kv.u32(A.HEAD_COUNT_KV.format(arch=a), h.get("num_key_value_heads", 4))

    # --- GGUF -> HF -------------------------------------------------------------------------
    HF_CAUSAL, HF_CONDITIONAL = "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"
    HF_TEXT_MODEL_TYPE, HF_MODEL_TYPE = "gemma3_text", "gemma3"
    # the conditional checkpoints' layout as published (and as transformers 5 saves it)
    CONDITIONAL_TEXT_PREFIX = "language_model."

    @classmethod
    def hf_text_config(cls, g: GGUFFacts) -> dict:
        """Gemma3TextConfig from the GGUF keys llama.cpp reads (src/models/gemma3.cpp)."""
        hp = Gemma3Hparams.from_gguf(g)
        L, A = Keys.LLM, Keys.Attention
        emb = g.shapes.get("token_embd.weight")
        if emb is None:
            raise GGQuantError(f"{g.path}: tensor 'token_embd.weight' is missing; a {hp.arch} GGUF needs it")
        cfg = dict(
            architectures=[cls.HF_CAUSAL], model_type=cls.HF_TEXT_MODEL_TYPE,
            vocab_size=emb[0], hidden_size=hp.n_embd, intermediate_size=hp.single(hp.n_ff, L.FEED_FORWARD_LENGTH),
            num_hidden_layers=hp.n_layer, num_attention_heads=hp.single(hp.n_head, A.HEAD_COUNT),
            num_key_value_heads=hp.single(hp.n_head_kv, A.HEAD_COUNT_KV), head_dim=hp.head_dim,
            max_position_embeddings=hp.n_ctx_train, rms_norm_eps=f32_value(hp.eps),
            sliding_window=hp.n_swa or hp.n_ctx_train, layer_types=[SLIDING if s else FULL for s in hp.is_swa],
            rope_parameters={FULL: hf_rope_parameters(hp),
                             SLIDING: {"rope_type": "default", "rope_theta": f32_value(hp.rope_base_swa)}},
            query_pre_attn_scalar=hp.query_pre_attn_scalar,
            final_logit_softcapping=f32_value(hp.final_softcap) if hp.final_softcap else None,
            attn_logit_softcapping=None,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings="output.weight" not in g.shapes,
        )
        if not hp.causal:
            cfg["use_bidirectional_attention"] = True
        cfg.update(hf_token_ids(g))
        return cfg

    @classmethod
    def hf_config(cls, g, mm) -> dict:
        text = cls.hf_text_config(g)
        if mm is None:
            return text
        C, CV = Keys.Clip, Keys.ClipVision
        if mm.get(CV.PROJECTOR_TYPE, mm.get(C.PROJECTOR_TYPE)) != "gemma3":
            raise GGQuantError(f"{mm.path}: projector type {mm.get(CV.PROJECTOR_TYPE, mm.get(C.PROJECTOR_TYPE))!r} "
                               f"is not Gemma 3's ('gemma3'); this mmproj belongs to another model")
        image, patch = mm.need(CV.IMAGE_SIZE), mm.need(CV.PATCH_SIZE)
        scale = mm.get(CV.Projector.SCALE_FACTOR, DEFAULT_PROJ_SCALE_FACTOR)
        vision = dict(
            model_type="siglip_vision_model", hidden_size=mm.need(CV.EMBEDDING_LENGTH),
            intermediate_size=mm.need(CV.FEED_FORWARD_LENGTH), num_hidden_layers=mm.need(CV.BLOCK_COUNT),
            num_attention_heads=mm.need(CV.Attention.HEAD_COUNT), image_size=image, patch_size=patch,
            layer_norm_eps=f32_value(mm.get(CV.Attention.LAYERNORM_EPS, 1e-6)), num_channels=3,
            hidden_act="gelu_pytorch_tanh", vision_use_head=False,
        )
        text.pop("architectures")
        ids = token_ids_by_text(g, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                                image_token_index="<image_soft_token>")
        return dict(architectures=[cls.HF_CONDITIONAL], model_type=cls.HF_MODEL_TYPE, text_config=text,
                    vision_config=vision, mm_tokens_per_image=((image // patch) // scale) ** 2,
                    tie_word_embeddings=text["tie_word_embeddings"], **ids)

    @classmethod
    def hf_preprocessor(cls, config: dict, mm) -> dict:
        """preprocessor_config.json: the image normalisation the mmproj carries."""
        v = config["vision_config"]
        return {"image_processor_type": "Gemma3ImageProcessor", "do_normalize": True, "do_rescale": True,
                "do_resize": True, "rescale_factor": 1 / 255, "resample": 2,
                "image_mean": mm.get(Keys.ClipVision.IMAGE_MEAN), "image_std": mm.get(Keys.ClipVision.IMAGE_STD),
                "image_seq_length": config["mm_tokens_per_image"],
                "size": {"height": v["image_size"], "width": v["image_size"]}}

    @classmethod
    def hf_named_tokens(cls) -> dict[str, str]:
        """tokenizer_config.json names of the multimodal marker tokens (Gemma 3 processors)."""
        return {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

    def denormalize_name(self, name: str, part: str, conditional: bool) -> str:
        if part == TEXT:
            return self.CONDITIONAL_TEXT_PREFIX + name if conditional else name
        if name == "multi_modal_projector.mm_input_projection.weight":
            return "multi_modal_projector.mm_input_projection_weight"
        return name

