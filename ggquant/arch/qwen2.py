"""Qwen2ForCausalLM (Qwen2, Qwen2.5, Qwen2.5-Coder): GGUF architecture `qwen2`.

llama.cpp's converter (conversion/qwen.py Qwen2Model on TextModel) writes it like a Llama without
the q/k permutation (qwen2 runs NeoX RoPE, which rotates the two halves of each head as the
checkpoint stores them), with the q/k/v biases as F32 tensors, no llama.vocab_size /
rope.dimension_count keys, and the vocabulary from tokenizer.model when present, else the GPT-2
BPE of tokenizer.json (pre-tokenizer `qwen2`). A sentence-transformers checkpoint (modules.json)
would get a pooling type: refused (ggquant converts the causal LM).

Read back: LlamaHparams (arch/llama.py), NeoX RoPE; runtime/models/qwen2.py.
"""

from __future__ import annotations

from gguf import MODEL_ARCH

from ggquant.arch import register
from ggquant.arch.llama import LLAMA_GLOBAL, LLAMA_LAYER, LlamaLike
from ggquant.errors import GGQuantError


@register("Qwen2ForCausalLM")
class Qwen2(LlamaLike):
    model_arch = MODEL_ARCH.QWEN2
    TEXT_TENSORS = LLAMA_GLOBAL + LLAMA_LAYER
    PERMUTE_QK = False
    DEFAULT_MODEL_TYPE = "qwen2"
    GENERATED = ()
    HF_CLASS = "Qwen2ForCausalLM"
    HF_MODEL_TYPE = "qwen2"

    def text_hparams(self, config: dict) -> dict:
        h = super().text_hparams(config)
        h.setdefault("attention_bias", True)  # Qwen2Attention always has q/k/v biases
        h["attention_bias"] = True
        return h

    def validate_hparams(self) -> None:
        super().validate_hparams()
        h = self.hparams
        if h.get("use_sliding_window"):
            raise GGQuantError(f"{self.config_path}: use_sliding_window = true; llama.cpp's {self.gguf_arch} graph "
                               f"attends to every position")
        if str(self.rope.get("rope_type", "default")).lower() == "llama3":
            raise GGQuantError(f"{self.config_path}: rope_type llama3 on {self.hf_arch}; llama.cpp's "
                               f"{self.gguf_arch} graph takes no frequency factors")

    def expected_layer_shapes(self, il: int):
        exp = super().expected_layer_shapes(il)
        exp.pop(f"model.layers.{il}.self_attn.o_proj.bias", None)
        return exp

    @classmethod
    def hf_config(cls, g, mm) -> dict:
        cfg = super().hf_config(g, mm)
        if cls is Qwen2 and cfg["head_dim"] * cfg["num_attention_heads"] == cfg["hidden_size"]:
            del cfg["head_dim"]  # Qwen2Config has none (hidden_size / num_attention_heads)
        return cfg

    @classmethod
    def hf_extra_config(cls, g, hp) -> dict:
        return dict(use_sliding_window=False, sliding_window=None, max_window_layers=hp.n_layer,
                    layer_types=["full_attention"] * hp.n_layer, attention_bias=True)


__all__ = ["Qwen2"]
