"""Gemma 3 text decoder, as llama.cpp runs it (src/models/gemma3.cpp, graph<iswa>).

Per token (H = n_embd, d = head_dim, nh / nkv heads, F = n_ff):

    x = E[id] * sqrt(H)                                                     E: token_embd [V, H]
    for each layer l (sliding window or global, see below):
        h = rms(x) * attn_norm                                              [H]
        q = rope(rms_head(h Wq) * q_norm) * f_attention_scale               Wq [nh*d, H]
        k = rope(rms_head(h Wk) * k_norm);  v = h Wv                        Wk, Wv [nkv*d, H]
        a = softmax(q k^T + mask) v  Wo                                     Wo [H, nh*d]
        x = x + rms(a) * post_attention_norm
        m = rms(x) * ffn_norm
        x = x + rms(W_down (gelu_tanh(W_gate m) * W_up m)) * post_ffw_norm  W_gate, W_up [F, H]
    logits = (rms(x) * output_norm) E^T        (output.weight if present; optional final softcap)

The hyperparameters are decoded by ggquant.arch.gemma3.Gemma3Hparams, the decoder the GGUF -> HF
direction uses too. Details as llama.cpp has them:
- The GGUF already stores the norm weights as 1 + w (the converter's norm_shift), so every
  norm is a plain multiply; the Hugging Face (1 + w) offset must not be applied again.
- Layer types: `attention.sliding_window_pattern` (bool array, true = sliding) if present;
  otherwise a period n (key scalar, default 6) where layer l slides unless l % n == n - 1
  (llama_hparams::set_swa_pattern). No `attention.sliding_window` key: all layers global.
- RoPE NeoX over all head dims; sliding layers use rope.freq_base_swa (default 10000) and scale 1,
  global layers rope.freq_base and 1 / rope.scaling.factor (llama_model::get_rope_freq_base).
- f_attention_scale = 1 / sqrt(head_dim) applied to q before attention (kq_scale 1), except the
  62-layer 27B model, which uses 1 / sqrt(n_embd / n_head) (query_pre_attn_scalar).
- A sliding key is masked when q_pos - k_pos >= sliding_window.
"""

from __future__ import annotations

import numpy as np

from ggquant.arch.gemma3 import Gemma3Hparams
from ggquant.runtime.model import KVCache, Model, TensorSet, sqrtf


class Gemma3Layer:
    def __init__(self, ts: TensorSet, il: int, hp: Gemma3Hparams):
        H, d = hp.n_embd, hp.head_dim
        nh, nkv, F = hp.n_head[il], hp.n_head_kv[il], hp.n_ff[il]
        p = f"blk.{il}."
        self.attn_norm = ts.vector(p + "attn_norm.weight", (H,))
        self.wq = ts.get(p + "attn_q.weight", (nh * d, H))
        self.wk = ts.get(p + "attn_k.weight", (nkv * d, H))
        self.wv = ts.get(p + "attn_v.weight", (nkv * d, H))
        self.wo = ts.get(p + "attn_output.weight", (H, nh * d))
        self.q_norm = ts.vector(p + "attn_q_norm.weight", (d,))
        self.k_norm = ts.vector(p + "attn_k_norm.weight", (d,))
        self.post_attn_norm = ts.vector(p + "post_attention_norm.weight", (H,))
        self.ffn_norm = ts.vector(p + "ffn_norm.weight", (H,))
        self.w_gate = ts.get(p + "ffn_gate.weight", (F, H))
        self.w_up = ts.get(p + "ffn_up.weight", (F, H))
        self.w_down = ts.get(p + "ffn_down.weight", (H, F))
        self.post_ffw_norm = ts.vector(p + "post_ffw_norm.weight", (H,))


class Gemma3Model(Model):
    arch = "gemma3"
    hparams_class = Gemma3Hparams
    hp: Gemma3Hparams

    def load_tensors(self, ts: TensorSet) -> None:
        self.layers = [Gemma3Layer(ts, il, self.hp) for il in range(self.hp.n_layer)]

    def new_cache(self, n_ctx: int) -> KVCache:
        hp = self.hp
        return KVCache(self.backend, n_ctx, {il: (hp.n_head_kv[il], hp.head_dim) for il in range(hp.n_layer)})

    def forward(self, ids, pos0, cache, logits="last"):
        be, hp = self.backend, self.hp
        T, d, eps = len(ids), hp.head_dim, hp.eps
        pos = np.arange(pos0, pos0 + T)
        x = be.rows(self.tok_embd, ids) * sqrtf(hp.n_embd)  # [T, H]
        for il, L in enumerate(self.layers):
            swa = hp.is_swa[il]
            base = hp.rope_base_swa if swa else hp.rope_base
            scale = 1.0 if swa else hp.rope_freq_scale
            nh, nkv = hp.n_head[il], hp.n_head_kv[il]

            h = be.rms_norm(x, L.attn_norm, eps)
            q, k, v = be.matmuls(h, [L.wq, L.wk, L.wv])
            q = be.norm_rope(q.reshape(T, nh, d), L.q_norm, eps, pos, d, base, scale) * hp.attn_scale
            k = be.norm_rope(k.reshape(T, nkv, d), L.k_norm, eps, pos, d, base, scale)
            cache.store(il, pos0, k, v.reshape(T, nkv, d))
            a = be.attention(q, cache.layers[il], pos0 + T, pos, hp.n_swa if swa else 0)  # [T, nh*d]
            x = be.add_rms_norm(x, be.matmul(a, L.wo), L.post_attn_norm, eps)

            m = be.rms_norm(x, L.ffn_norm, eps)
            gate, up = be.matmuls(m, [L.w_gate, L.w_up])
            f = be.matmul(be.geglu(gate, up), L.w_down)
            x = be.add_rms_norm(x, f, L.post_ffw_norm, eps)

        return self.head(x, logits)
