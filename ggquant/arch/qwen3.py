"""Qwen3ForCausalLM: GGUF architecture `qwen3` — Qwen2 without the q/k/v biases, with per-head
RMSNorm gains on q and k (attn_q_norm / attn_k_norm, applied before RoPE) and an explicit head_dim.

llama.cpp's converter (conversion/qwen.py Qwen3Model, a Qwen2Model) writes it as Qwen2; a Qwen3
reranker (detected from the README, folder or config names) becomes a pooling model there and is
refused here. transformers' Qwen3Config defaults head_dim to 128 when config.json has none.
"""

from __future__ import annotations

from gguf import MODEL_ARCH, MODEL_TENSOR

from ggquant.arch import register
from ggquant.arch.base import Rule
from ggquant.arch.qwen2 import Qwen2
from ggquant.arch.llama import LLAMA_GLOBAL, LLAMA_LAYER
from ggquant.errors import GGQuantError

QK_NORMS = (
    Rule("model.layers.{bid}.self_attn.q_norm", MODEL_TENSOR.ATTN_Q_NORM, "per-head RMSNorm gain on q [head_dim]"),
    Rule("model.layers.{bid}.self_attn.k_norm", MODEL_TENSOR.ATTN_K_NORM, "per-head RMSNorm gain on k [head_dim]"),
)


@register("Qwen3ForCausalLM")
class Qwen3(Qwen2):
    model_arch = MODEL_ARCH.QWEN3
    TEXT_TENSORS = LLAMA_GLOBAL + LLAMA_LAYER + QK_NORMS
    DEFAULT_MODEL_TYPE = "qwen3"
    HF_CLASS = "Qwen3ForCausalLM"
    HF_MODEL_TYPE = "qwen3"

    def text_hparams(self, config: dict) -> dict:
        h = super(Qwen2, self).text_hparams(config)
        return h

    def validate_hparams(self) -> None:
        super().validate_hparams()
        readme = self.dir / "README.md"
        text = readme.read_text(encoding="utf-8", errors="replace").lower() if readme.is_file() else ""
        hints = [str(self.dir.name), str(self.hparams.get("_name_or_path", "")), str(self.hparams.get("model_type", "")),
                 str(self.hf_arch)]
        if ("# qwen3-reranker" in text or "# qwen3-vl-reranker" in text
                or any("qwen3-reranker" in x.lower() or "qwen3-vl-reranker" in x.lower() for x in hints)):
            raise GGQuantError(f"{self.dir}: a Qwen3 reranker; llama.cpp converts it to a ranking (pooling) model, "
                               f"ggquant converts causal LMs only")

    def expected_layer_shapes(self, il: int):
        exp = super().expected_layer_shapes(il)
        p, hd = f"model.layers.{il}.self_attn.", self.head_dim
        for b in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
            exp.pop(p + b, None)
        exp[p + "q_norm.weight"] = ((hd,), True)
        exp[p + "k_norm.weight"] = ((hd,), True)
        return exp

    @classmethod
    def hf_extra_config(cls, g, hp) -> dict:
        out = super().hf_extra_config(g, hp)
        out["attention_bias"] = any(n.endswith("attn_q.bias") for n in g.shapes)
        return out


__all__ = ["Qwen3"]
