"""Gemma 3 text decoder (Gemma3ForCausalLM, and the text part of Gemma3ForConditionalGeneration).

What llama.cpp's converter does for it (conversion/gemma.py Gemma3Model on top of
conversion/base.py TextModel):
- every `*norm.weight` is stored as `1 + w`: Gemma3RMSNorm multiplies by (1 + weight);
- token_embd is trimmed to the tokenizer's size (out-of-vocabulary padding rows dropped);
- tied embeddings: no output.weight (llama.cpp reuses token_embd);
- vocabulary from tokenizer.model (SentencePiece), add_space_prefix = false.
"""

from __future__ import annotations

from gguf import GGMLQuantizationType, Keys

from ggquant.arch import vocab as V
from ggquant.arch.base import (IDENTITY, KV, MMPROJ, SCALAR_TO_1D, TEXT, AddConstant, Arch, Rule, Transform,
                               f32_value, read_json, with_defaults)
from ggquant.errors import GGQuantError
from ggquant.tensor import Tensor

SLIDING, FULL = "sliding_attention", "full_attention"
NORM_SHIFT = 1.0  # Gemma3RMSNorm: output * (1 + weight)

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
    Rule("model.layers.{bid}.input_layernorm", "blk.{bid}.attn_norm", "RMSNorm gain before attention [hidden]"),
    Rule("model.layers.{bid}.self_attn.q_proj", "blk.{bid}.attn_q", "query projection [n_head*head_dim, hidden]"),
    Rule("model.layers.{bid}.self_attn.k_proj", "blk.{bid}.attn_k", "key projection [n_kv_head*head_dim, hidden]"),
    Rule("model.layers.{bid}.self_attn.v_proj", "blk.{bid}.attn_v", "value projection [n_kv_head*head_dim, hidden]"),
    Rule("model.layers.{bid}.self_attn.o_proj", "blk.{bid}.attn_output", "attention output [hidden, n_head*head_dim]"),
    Rule("model.layers.{bid}.self_attn.q_norm", "blk.{bid}.attn_q_norm", "per-head RMSNorm gain on q [head_dim]"),
    Rule("model.layers.{bid}.self_attn.k_norm", "blk.{bid}.attn_k_norm", "per-head RMSNorm gain on k [head_dim]"),
    Rule("model.layers.{bid}.post_attention_layernorm", "blk.{bid}.post_attention_norm",
         "RMSNorm gain on the attention output, before the residual add [hidden]"),
    Rule("model.layers.{bid}.pre_feedforward_layernorm", "blk.{bid}.ffn_norm", "RMSNorm gain before the MLP [hidden]"),
    Rule("model.layers.{bid}.post_feedforward_layernorm", "blk.{bid}.post_ffw_norm",
         "RMSNorm gain on the MLP output, before the residual add [hidden]"),
    Rule("model.layers.{bid}.mlp.gate_proj", "blk.{bid}.ffn_gate", "MLP gate (gelu-tanh) [ffn, hidden]"),
    Rule("model.layers.{bid}.mlp.up_proj", "blk.{bid}.ffn_up", "MLP up [ffn, hidden]"),
    Rule("model.layers.{bid}.mlp.down_proj", "blk.{bid}.ffn_down", "MLP down [hidden, ffn]"),
)
DECODER_GLOBAL = (
    Rule("model.embed_tokens", "token_embd", "token embeddings [n_vocab, hidden]; the output matrix too when tied"),
    Rule("model.norm", "output_norm", "final RMSNorm gain [hidden]"),
    Rule("lm_head", "output", "untied output matrix [n_vocab, hidden] (absent when tie_word_embeddings)"),
)


# SigLIP tower + Gemma 3 projector (llama.cpp Gemma3VisionModel). Names as published
# (vision_tower.vision_model.*); transformers 5 saves the tower without "vision_model." and
# may prefix "model.", which ggquant accepts too.
_SV = "vision_tower.vision_model."
GEMMA3_MMPROJ = (
    Rule("multi_modal_projector.mm_input_projection.weight", "mm.input_projection.weight",
         "SigLIP -> text hidden [vision_hidden, text_hidden] (stored as a plain matrix, no transpose), F16",
         ("",)),
    Rule("multi_modal_projector.mm_soft_emb_norm", "mm.soft_emb_norm", "RMSNorm gain before the projection, +1"),
    Rule(_SV + "embeddings.patch_embedding", "v.patch_embd", "patch conv [hidden, 3, p, p], F32"),
    Rule(_SV + "embeddings.position_embedding", "v.position_embd", "learned positions [n_patches, hidden], F32"),
    Rule(_SV + "encoder.layers.{bid}.layer_norm1", "v.blk.{bid}.ln1", "LayerNorm before attention [hidden]"),
    Rule(_SV + "encoder.layers.{bid}.layer_norm2", "v.blk.{bid}.ln2", "LayerNorm before the MLP [hidden]"),
    Rule(_SV + "encoder.layers.{bid}.self_attn.q_proj", "v.blk.{bid}.attn_q", "query [hidden, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.self_attn.k_proj", "v.blk.{bid}.attn_k", "key [hidden, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.self_attn.v_proj", "v.blk.{bid}.attn_v", "value [hidden, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.self_attn.out_proj", "v.blk.{bid}.attn_out", "attention output [hidden, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.mlp.fc1", "v.blk.{bid}.ffn_up", "MLP up (gelu) [ffn, hidden]"),
    Rule(_SV + "encoder.layers.{bid}.mlp.fc2", "v.blk.{bid}.ffn_down", "MLP down [hidden, ffn]"),
    Rule(_SV + "post_layernorm", "v.post_ln", "final LayerNorm [hidden]"),
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


class Gemma3(Arch):
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    gguf_arch = "gemma3"
    TEXT_TENSORS = DECODER_GLOBAL + DECODER_LAYER
    MMPROJ_TENSORS = GEMMA3_MMPROJ
    TEXT_DEFAULTS = GEMMA3_TEXT_DEFAULTS
    norm_shift = NORM_SHIFT

    def text_hparams(self, config: dict) -> dict:
        h = super().text_hparams(config)
        h = with_defaults(h, self.TEXT_DEFAULTS)
        if not isinstance(h.get("layer_types"), list):
            n = h.get("num_hidden_layers")
            pattern = h.get("sliding_window_pattern", h.get("_sliding_window_pattern", 6))
            if isinstance(n, int) and isinstance(pattern, int) and pattern > 0:
                h["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
        h["rope_parameters"] = self.rope_parameters(h)
        return h

    def rope_parameters(self, h: dict) -> dict:
        return rope_parameters_gemma3(h)

    # --- vocabulary --------------------------------------------------------------------------
    def tokens(self) -> tuple[list[str], list[float], list[int]]:
        """(tokens, scores, types) as written to the GGUF; cached."""
        if not hasattr(self, "_tokens"):
            self._tokens = self.read_tokens()
        return self._tokens

    def read_tokens(self):
        if not (self.dir / "tokenizer.model").is_file():
            raise GGQuantError(
                f"{self.dir}: tokenizer.model not found; llama.cpp's Gemma 3 converter reads the SentencePiece "
                f"model (its tokenizer.json fallback only accepts pre-tokenizers it knows by hash)"
            )
        return self.sp_tokens()

    def sp_tokens(self):
        """_create_vocab_sentencepiece, padded to vocab_size_per_layer_input or vocab_size."""
        if not hasattr(self, "_sp_tokens"):
            n = self.hparams.get("vocab_size_per_layer_input") or self.hparams.get("vocab_size")
            self._sp_tokens = V.sentencepiece_tokens(self.dir, n if isinstance(n, int) else None)
        return self._sp_tokens

    def n_vocab_real(self) -> int:
        """The token_embd rows llama.cpp keeps (Gemma3Model.modify_tensors)."""
        if (self.dir / "tokenizer.model").is_file():
            return len(self.sp_tokens()[0])
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

    def preprocessor(self) -> dict:
        """MmprojModel: preprocessor_config.json, then processor_config.json merged over it."""
        cfg: dict = {}
        p = read_json(self.dir / "preprocessor_config.json", "", required=False)
        if isinstance(p, dict):
            cfg.update({**p, **p["media_proc_cfg"]} if isinstance(p.get("media_proc_cfg"), dict) else p)
        q = read_json(self.dir / "processor_config.json", "", required=False)
        if isinstance(q, dict):
            cfg.update({**q, **q["image_processor"]} if isinstance(q.get("image_processor"), dict) else q)
        return cfg

    def mmproj_vision_common(self, kv: KV, file_type: int, vis: dict, image_size: int) -> None:
        """MmprojModel.set_gguf_parameters, vision part."""
        CV = Keys.ClipVision
        kv.u32(Keys.General.FILE_TYPE, file_type)
        kv.bool(Keys.Clip.HAS_VISION_ENCODER, True)
        kv.u32(CV.PROJECTION_DIM, self.hparams.get("hidden_size") or 0)
        kv.u32(CV.IMAGE_SIZE, image_size)
        kv.u32(CV.PATCH_SIZE, vis["patch_size"])
        kv.u32(CV.EMBEDDING_LENGTH, vis["hidden_size"])
        kv.u32(CV.FEED_FORWARD_LENGTH, vis["intermediate_size"])
        kv.u32(CV.BLOCK_COUNT, vis["num_hidden_layers"])
        kv.u32(CV.Attention.HEAD_COUNT, vis["num_attention_heads"])
        pp = self.preprocessor()
        for key, name in ((CV.IMAGE_MEAN, "image_mean"), (CV.IMAGE_STD, "image_std")):
            if not isinstance(pp.get(name), list):
                raise GGQuantError(f"{self.dir}: '{name}' not found in preprocessor_config.json or "
                                   f"processor_config.json; the mmproj needs the image normalisation")
            kv.array(key, pp[name], f"{self.dir}: {name}")

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

    def layer_dims(self, il: int) -> dict:
        h = self.hparams
        return dict(head_dim=h["head_dim"], n_kv=h["num_key_value_heads"], ffn=h["intermediate_size"])

    def expected_shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """HF name (normalized) -> (shape, required) for the text decoder."""
        h = self.hparams
        H, nh = h["hidden_size"], h["num_attention_heads"]
        exp: dict[str, tuple[tuple[int, ...], bool]] = {
            "model.embed_tokens.weight": ((h["vocab_size"], H), True),
            "model.norm.weight": ((H,), True),
            "lm_head.weight": ((h["vocab_size"], H), not h.get("tie_word_embeddings", True)),
        }
        for il in range(self.block_count):
            d = self.layer_dims(il)
            hd, nkv, ff = d["head_dim"], d["n_kv"], d["ffn"]
            p = f"model.layers.{il}."
            kv_required = d.get("has_kv", True)
            exp.update({
                p + "input_layernorm.weight": ((H,), True),
                p + "self_attn.q_proj.weight": ((nh * hd, H), True),
                p + "self_attn.k_proj.weight": ((nkv * hd, H), kv_required),
                p + "self_attn.v_proj.weight": ((nkv * hd, H), kv_required and d.get("has_v", True)),
                p + "self_attn.o_proj.weight": ((H, nh * hd), True),
                p + "self_attn.q_norm.weight": ((hd,), True),
                p + "self_attn.k_norm.weight": ((hd,), kv_required),
                p + "post_attention_layernorm.weight": ((H,), True),
                p + "pre_feedforward_layernorm.weight": ((H,), True),
                p + "post_feedforward_layernorm.weight": ((H,), True),
                p + "mlp.gate_proj.weight": ((ff, H), True),
                p + "mlp.up_proj.weight": ((ff, H), True),
                p + "mlp.down_proj.weight": ((H, ff), True),
            })
        return exp

    def check_text_tensors(self) -> None:
        """Missing tensors and wrong shapes, against what the config declares."""
        assert self.ckpt is not None
        present = {self.normalize_name(n): t for n, t in self.ckpt.tensors.items() if self.is_text_tensor(n)}
        nested = any(n.startswith("model.language_model.") for n in self.ckpt.tensors)
        for name, (shape, required) in self.expected_shapes().items():
            t = present.get(name)
            if t is None:
                if required:
                    stored = "model.language_model." + name[len("model."):] if nested and name.startswith(
                        "model.") else name
                    raise GGQuantError(
                        f"{self.dir}: tensor '{stored}' is missing from the checkpoint ({self.config_path.name} "
                        f"declares it); the download is incomplete or the config does not belong to these weights")
                continue
            if tuple(t.shape) != tuple(shape):
                raise GGQuantError(
                    f"{t.file}: tensor '{t.name}' has shape {list(t.shape)}, but {self.config_path.name} implies "
                    f"{list(shape)}; the config and the weights disagree")

    def check_vocab_sizes(self) -> None:
        """llama.cpp refuses a token_embd whose rows differ from the tokenizer's size."""
        n_tokens = len(self.tokens()[0])
        assert self.ckpt is not None
        for name, t in self.ckpt.tensors.items():
            norm = self.normalize_name(name)
            if norm == "model.embed_tokens.weight":
                rows = self.n_outer(norm, t, TEXT)
                if rows != n_tokens:
                    raise GGQuantError(
                        f"{t.file}: tensor '{name}' has {rows} rows but the tokenizer has {n_tokens} tokens "
                        f"(config vocab_size {self.hparams.get('vocab_size')}); llama.cpp would refuse to load "
                        f"the GGUF (token_embd has the wrong shape). Fix vocab_size or the tokenizer files")

    def validate(self, parts: tuple[str, ...]) -> None:
        h = self.hparams
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size"):
            self.need(key)
        if h.get("attn_logit_softcapping") is not None:
            raise GGQuantError(f"{self.config_path}: attn_logit_softcapping is set; Gemma 3 has none and "
                               f"llama.cpp's converter refuses it")
        lt = h.get("layer_types")
        if not isinstance(lt, list) or len(lt) != self.block_count or any(t not in (SLIDING, FULL) for t in lt):
            raise GGQuantError(f"{self.config_path}: 'layer_types' must list {self.block_count} entries of "
                               f"'{SLIDING}'/'{FULL}', got {lt!r}")
        if TEXT in parts:
            self.check_text_tensors()
            self.check_vocab_sizes()

    # --- metadata ---------------------------------------------------------------------------
    def text_metadata(self, kv: KV, file_type: int) -> None:
        self.base_text_metadata(kv, file_type)
        self.gemma3_metadata(kv)

    def base_text_metadata(self, kv: KV, file_type: int) -> None:
        """conversion/base.py TextModel.set_gguf_parameters, for the keys a Gemma config has."""
        a, h = self.gguf_arch, self.hparams
        L, A, R = Keys.LLM, Keys.Attention, Keys.Rope
        kv.u32(L.BLOCK_COUNT.format(arch=a), self.block_count)
        kv.u32(L.CONTEXT_LENGTH.format(arch=a), h["max_position_embeddings"])
        kv.u32(L.EMBEDDING_LENGTH.format(arch=a), h["hidden_size"])
        kv.u32(L.FEED_FORWARD_LENGTH.format(arch=a), h["intermediate_size"])
        kv.u32(A.HEAD_COUNT.format(arch=a), h["num_attention_heads"])
        kv.u32(A.HEAD_COUNT_KV.format(arch=a), h["num_key_value_heads"])
        if h.get("is_causal") is False:
            kv.bool(A.CAUSAL.format(arch=a), False)
        rp = h["rope_parameters"]
        full = rp.get(FULL, rp)
        rtype, factor = full.get("rope_type"), full.get("factor")
        if rtype == "linear" and factor is not None:
            kv.string(R.SCALING_TYPE.format(arch=a), "linear")
            kv.f32(R.SCALING_FACTOR.format(arch=a), factor)
        elif rtype == "yarn" and factor is not None:
            kv.string(R.SCALING_TYPE.format(arch=a), "yarn")
            kv.f32(R.SCALING_FACTOR.format(arch=a), factor)
            kv.u32(R.SCALING_ORIG_CTX_LEN.format(arch=a), full["original_max_position_embeddings"])
            for key, names in ((R.SCALING_YARN_EXT_FACTOR, ("extrapolation_factor",)),
                               (R.SCALING_YARN_ATTN_FACTOR, ("attention_factor", "attn_factor")),
                               (R.SCALING_YARN_BETA_FAST, ("beta_fast",)), (R.SCALING_YARN_BETA_SLOW, ("beta_slow",))):
                v = next((full[n] for n in names if full.get(n) is not None), None)
                if v is not None:
                    kv.f32(key.format(arch=a), v)
        if full.get("rope_theta") is not None:
            kv.f32(R.FREQ_BASE.format(arch=a), full["rope_theta"])
        swa = rp.get(SLIDING, {}) if isinstance(rp.get(SLIDING), dict) else {}
        if swa.get("rope_theta") is not None:
            kv.f32(R.FREQ_BASE_SWA.format(arch=a), swa["rope_theta"])
        kv.f32(A.LAYERNORM_RMS_EPS.format(arch=a), h["rms_norm_eps"])
        n_exp = next((h[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in h), None)
        if n_exp is not None:
            kv.u32(L.EXPERT_COUNT.format(arch=a), n_exp)
        n_used = next((h[k] for k in ("num_experts_per_tok", "num_experts_per_token", "top_k_experts") if k in h), None)
        if n_used is not None:
            kv.u32(L.EXPERT_USED_COUNT.format(arch=a), n_used)
        if h.get("head_dim") is not None:
            kv.u32(A.KEY_LENGTH.format(arch=a), h["head_dim"])
            kv.u32(A.VALUE_LENGTH.format(arch=a), h["head_dim"])
        kv.u32(Keys.General.FILE_TYPE, file_type)

    def gemma3_metadata(self, kv: KV) -> None:
        """conversion/gemma.py Gemma3Model.set_gguf_parameters (several keys a second time)."""
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
    SWA_PATTERN_DEFAULT = 6  # llama.cpp gemma3 load_arch_hparams: load_swa_pattern(ml, 6)
    SWA_FREQ_BASE_DEFAULT = 10_000.0  # llama_hparams::rope_freq_base_train_swa default
    LAYERS_27B = 62  # llama.cpp scales attention by 1/sqrt(hidden/heads) for the 27B only

    @classmethod
    def hf_layer_types(cls, g, n_layer: int) -> list[str] | None:
        """llama_model_base::load_swa_pattern: a bool array (true = sliding), or a period."""
        pat = g.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=cls.gguf_arch))
        if isinstance(pat, list):
            if len(pat) != n_layer:
                raise GGQuantError(f"{g.path}: {cls.gguf_arch}.attention.sliding_window_pattern has {len(pat)} "
                                   f"entries for {n_layer} layers")
            return [SLIDING if s else FULL for s in pat]
        n = pat if isinstance(pat, int) else cls.SWA_PATTERN_DEFAULT
        if n == 0:
            return [SLIDING] * n_layer
        # llama_hparams::set_swa_pattern: layer il is sliding unless (il % n) == n - 1
        return [SLIDING if (i % n) < n - 1 else FULL for i in range(n_layer)]

    @classmethod
    def hf_rope(cls, g) -> dict:
        a, R = cls.gguf_arch, Keys.Rope
        full: dict = {"rope_type": "default", "rope_theta": f32_value(g.need(R.FREQ_BASE.format(arch=a), (int, float)))}
        stype = g.get(R.SCALING_TYPE.format(arch=a))
        factor = g.get(R.SCALING_FACTOR.format(arch=a))
        if stype in ("linear", "yarn") and factor is not None:
            full["rope_type"] = stype
            full["factor"] = f32_value(factor)
        if stype == "yarn":
            full["original_max_position_embeddings"] = g.need(R.SCALING_ORIG_CTX_LEN.format(arch=a))
            for key, name in ((R.SCALING_YARN_EXT_FACTOR, "extrapolation_factor"),
                              (R.SCALING_YARN_ATTN_FACTOR, "attention_factor"),
                              (R.SCALING_YARN_BETA_FAST, "beta_fast"), (R.SCALING_YARN_BETA_SLOW, "beta_slow")):
                v = g.get(key.format(arch=a))
                if v is not None:
                    full[name] = f32_value(v)
        elif stype not in (None, "none", "linear"):
            raise GGQuantError(f"{g.path}: rope scaling type {stype!r} has no Hugging Face Gemma equivalent")
        swa = {"rope_type": "default",
               "rope_theta": f32_value(g.get(R.FREQ_BASE_SWA.format(arch=a), cls.SWA_FREQ_BASE_DEFAULT))}
        return {FULL: full, SLIDING: swa}

    @classmethod
    def hf_text_config(cls, g) -> dict:
        """Gemma3TextConfig from the GGUF keys llama.cpp reads (src/models/gemma3.cpp)."""
        a, L, A = cls.gguf_arch, Keys.LLM, Keys.Attention
        n_layer = g.need(L.BLOCK_COUNT.format(arch=a))
        H = g.need(L.EMBEDDING_LENGTH.format(arch=a))
        heads = g.need(A.HEAD_COUNT.format(arch=a))
        n_kv = g.need(A.HEAD_COUNT_KV.format(arch=a))
        hd = g.get(A.KEY_LENGTH.format(arch=a), H // heads)
        swa = g.get(A.SLIDING_WINDOW.format(arch=a))
        ctx = g.need(L.CONTEXT_LENGTH.format(arch=a))
        layer_types = cls.hf_layer_types(g, n_layer) if swa else [FULL] * n_layer
        softcap = g.get(L.FINAL_LOGIT_SOFTCAPPING.format(arch=a))
        emb = g.shapes.get("token_embd.weight")
        if emb is None:
            raise GGQuantError(f"{g.path}: tensor 'token_embd.weight' is missing; a {a} GGUF needs it")
        cfg = dict(
            architectures=[cls.HF_CAUSAL], model_type=cls.HF_TEXT_MODEL_TYPE,
            vocab_size=emb[0], hidden_size=H, intermediate_size=g.need(L.FEED_FORWARD_LENGTH.format(arch=a)),
            num_hidden_layers=n_layer, num_attention_heads=heads, num_key_value_heads=n_kv, head_dim=hd,
            max_position_embeddings=ctx,
            rms_norm_eps=f32_value(g.need(A.LAYERNORM_RMS_EPS.format(arch=a), (int, float))),
            sliding_window=swa or ctx, layer_types=layer_types, rope_parameters=cls.hf_rope(g),
            query_pre_attn_scalar=H // heads if n_layer == cls.LAYERS_27B else hd,
            final_logit_softcapping=f32_value(softcap) if softcap else None, attn_logit_softcapping=None,
            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings="output.weight" not in g.shapes,
        )
        if g.get(A.CAUSAL.format(arch=a)) is False:
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


def hf_token_ids(g) -> dict:
    """bos/eos/pad ids of the GGUF tokenizer, as config.json carries them."""
    T = Keys.Tokenizer
    out = {}
    for key, name in ((T.BOS_ID, "bos_token_id"), (T.EOS_ID, "eos_token_id"), (T.PAD_ID, "pad_token_id")):
        if isinstance(g.get(key), int):
            out[name] = g.get(key)
    return out


def token_ids_by_text(g, **names: str) -> dict:
    """{config key: id} of tokens found by their text (multimodal marker tokens)."""
    tokens = g.get(Keys.Tokenizer.LIST) or []
    index = {t: i for i, t in enumerate(tokens)}
    return {k: index[t] for k, t in names.items() if t in index}
