"""Qwen3 decoder (GGUF architecture `qwen3`), as llama.cpp runs it (src/models/qwen3.cpp): the Llama
graph of runtime/models/llama.py with NeoX RoPE, per-head RMS norms on q and k (attn_q_norm /
attn_k_norm, before RoPE) and no biases."""

from __future__ import annotations

from ggquant.runtime.models.llama import LlamaModel


class Qwen3Model(LlamaModel):
    arch = "qwen3"
    QK_NORM = True
