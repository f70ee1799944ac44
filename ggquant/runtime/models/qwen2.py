"""Qwen2 decoder (GGUF architecture `qwen2`: Qwen2, Qwen2.5, Qwen2.5-Coder), as llama.cpp runs it
(src/models/qwen2.cpp): the Llama graph of runtime/models/llama.py with required q/k/v biases,
NeoX RoPE and no frequency factors."""

from __future__ import annotations

from ggquant.runtime.models.llama import LlamaModel


class Qwen2Model(LlamaModel):
    arch = "qwen2"
    QKV_BIAS = True
