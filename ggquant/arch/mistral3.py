"""Ministral3ForCausalLM and the text part of Mistral3ForConditionalGeneration (Ministral 3, Mistral
Small 3.1 / 3.2): GGUF architecture `mistral3`.

What llama.cpp's converter does for them (conversion/mistral3.py Mistral3Model, registered for both
names in conversion/__init__.py; the llama tree of llama-cpp-python 0.3.36): unless the text
model_type is "mistral4" (a DeepSeek-V2-style MoE, not converted here), it runs
Mistral3Model.Ministral3Model, which is LlamaModel with model_arch MISTRAL3. So everything of
arch/llama.py holds (q/k rows permuted for NORM RoPE, llama.vocab_size + rope.dimension_count,
the SentencePiece / GPT-2 BPE vocabulary paths), plus, when the text model_type is "ministral3":
- rope_parameters must be rope_type "yarn" (asserted); TextModel.set_gguf_parameters writes the
  yarn keys (factor, original context, beta_fast / beta_slow, ext / attention factors when given);
- rope.scaling.yarn_log_multiplier = rope_parameters.mscale_all_dim;
- attention.temperature_scale = rope_parameters.llama_4_scaling_beta (Llama 4's attention
  temperature: q *= 1 + beta * log(1 + floor(pos / original_max_position_embeddings))).
These go through the converter's Hugging Face path (config.json + safetensors): the native
consolidated layout (params.json, tekken.json) is Mistral's other path and is refused here as for
MistralForCausalLM.

Mistral3ForConditionalGeneration stores the decoder under `language_model.` (dropped by
ModelBase.filter_tensors) beside `vision_tower.` / `multi_modal_projector.` (skipped by
TextModel.filter_tensors). llama.cpp writes that Pixtral tower as an mmproj with --mmproj
(conversion/llava.py LlavaVisionModel); ggquant does not write that mmproj (refused, naming it).

Read back: Mistral3Hparams (below), runtime/models/mistral3.py (src/models/mistral3.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import MODEL_ARCH, Keys

from ggquant.arch import register
from ggquant.arch.base import GGUFFacts
from ggquant.arch.llama import Llama, LlamaHparams
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import KV

MINISTRAL3 = "ministral3"  # the text model_type that gets the yarn log multiplier and temperature keys


@register("Ministral3ForCausalLM", "Mistral3ForConditionalGeneration")
class Mistral3(Llama):
    model_arch = MODEL_ARCH.MISTRAL3
    DEFAULT_MODEL_TYPE = MINISTRAL3
    ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # mistral3 graph: ggml_rope_ext with yarn parameters
    HF_CLASS = "Ministral3ForCausalLM"
    HF_MODEL_TYPE = MINISTRAL3

    def text_hparams(self, config: dict) -> dict:
        tc = config.get("text_config")
        if isinstance(tc, dict) and tc.get("model_type") == "mistral4" or config.get("model_type") == "mistral4":
            raise GGQuantError(f"{self.dir / 'config.json'}: text model_type 'mistral4' (a mixture-of-experts "
                               f"decoder llama.cpp writes as GGUF architecture mistral4); ggquant converts the "
                               f"ministral3 / mistral decoders of {self.hf_arch}")
        return super().text_hparams(config)

    def validate_hparams(self) -> None:
        super().validate_hparams()
        h, where = self.hparams, self.config_path
        if self.model_type == MINISTRAL3:
            rope = self.rope
            if str(rope.get("rope_type")) != "yarn":  # Ministral3Model.set_gguf_parameters asserts it
                raise GGQuantError(f"{where}: rope_parameters.rope_type = {rope.get('rope_type')!r}; llama.cpp's "
                                   f"converter requires 'yarn' for a ministral3 model")
            for key in ("mscale_all_dim", "llama_4_scaling_beta", "factor", "original_max_position_embeddings"):
                if not isinstance(rope.get(key), (int, float)) or isinstance(rope.get(key), bool):
                    raise GGQuantError(f"{where}: rope_parameters.{key} is missing or not a number (got "
                                       f"{rope.get(key)!r}); a ministral3 model needs it")
        sw = h.get("sliding_window")
        if isinstance(sw, int) and sw < h["max_position_embeddings"]:
            raise GGQuantError(f"{where}: sliding_window = {sw} (< max_position_embeddings "
                               f"{h['max_position_embeddings']}); llama.cpp's mistral3 graph attends to every "
                               f"position, so the GGUF would not compute what this model computes beyond {sw} tokens")

    def text_metadata(self, kv: KV, file_type: int) -> None:
        """LlamaModel.set_gguf_parameters, then Ministral3Model's two keys (ministral3 only)."""
        super().text_metadata(kv, file_type)
        if self.model_type == MINISTRAL3:
            a = self.gguf_arch
            kv.f32(Keys.Rope.SCALING_YARN_LOG_MUL.format(arch=a), self.rope["mscale_all_dim"])
            kv.f32(Keys.Attention.TEMPERATURE_SCALE.format(arch=a), self.rope["llama_4_scaling_beta"])

    def no_mmproj_reason(self) -> str:
        if isinstance(self.raw.get("vision_config"), dict):
            return (f"ggquant does not write the Pixtral vision tower of {self.hf_arch} as an mmproj (llama.cpp's "
                    f"converter does, conversion/llava.py); convert the text part without --mmproj")
        return super().no_mmproj_reason()

    @classmethod
    def hf_config(cls, g: GGUFFacts, mm) -> dict:
        raise GGQuantError(f"{g.path}: `convert --to hf` of a mistral3 GGUF is not supported (the yarn and "
                           f"attention-temperature keys have no exporter yet)")


@dataclass
class Mistral3Hparams(LlamaHparams):
    """llama_model_mistral3::load_arch_hparams: the generic keys, plus the optional attention
    temperature scale, yarn beta_fast / beta_slow and log multiplier (defaults: llama-hparams.h)."""

    attn_temp_scale: float = 0.0  # attention.temperature_scale; 0: no temperature tuning
    attn_temp_floor_scale: int = 0  # n_ctx_orig_yarn when the temperature is on
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_log_mul: float = 0.0  # rope.scaling.yarn_log_multiplier
    rope_attn_factor: float = 1.0  # rope.scaling.attn_factor (llama_model_base::load_hparams)

    @classmethod
    def decode(cls, g: GGUFFacts) -> dict:
        d = super().decode(g)
        a, R = g.arch, Keys.Rope
        d["attn_temp_scale"] = g.need(Keys.Attention.TEMPERATURE_SCALE.format(arch=a), (int, float), default=0.0)
        d["yarn_beta_fast"] = g.need(R.SCALING_YARN_BETA_FAST.format(arch=a), (int, float), default=32.0)
        d["yarn_beta_slow"] = g.need(R.SCALING_YARN_BETA_SLOW.format(arch=a), (int, float), default=1.0)
        d["yarn_log_mul"] = g.need(R.SCALING_YARN_LOG_MUL.format(arch=a), (int, float), default=0.0)
        d["rope_attn_factor"] = g.need(R.SCALING_ATTN_FACTOR.format(arch=a), (int, float), default=1.0)
        if d["attn_temp_scale"] != 0.0:
            if d["n_ctx_orig_yarn"] == 0:
                raise GGQuantError(f"{g.path}: {R.SCALING_ORIG_CTX_LEN.format(arch=a)} is 0; llama.cpp refuses "
                                   f"attention temperature scaling without it")
            d["attn_temp_floor_scale"] = d["n_ctx_orig_yarn"]
        return d

    @classmethod
    def rope_scalings(cls) -> tuple:
        return (None, "none", "linear", "yarn")


__all__ = ["Mistral3", "Mistral3Hparams"]
