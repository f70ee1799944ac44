"""Llama decoder (GGUF architecture `llama`: Llama 2/3.x, SmolLM2, Mistral...), as llama.cpp runs
it (src/models/llama.cpp, graph<false>); the Qwen2 / Qwen3 modules reuse it with their options.

Per token (H = n_embd, d = head_dim, nh / nkv heads, F = n_ff):

    x = E[id]                                                               E: token_embd [V, H]
    for each layer:
        h = rms(x) * attn_norm
        q = rope(h Wq + bq); k = rope(h Wk + bk); v = h Wv + bv            biases: Qwen2 (optional in llama)
            (Qwen3: q = rope(rms_head(h Wq) * q_norm), k likewise)
        a = softmax(q k^T / sqrt(d) + mask) v  Wo (+ bo)
        x = x + a
        m = rms(x) * ffn_norm
        x = x + W_down (silu(W_gate m) * W_up m)
    logits = (rms(x) * output_norm) W_out^T       (token_embd when there is no output.weight)

Details as llama.cpp has them:
- RoPE: llama_model_rope_type: NORM (adjacent pairs) for llama, NeoX for qwen2/qwen3; base
  rope.freq_base, scale 1 / rope.scaling.factor (linear); llama3 checkpoints carry rope_freqs.weight,
  frequency factors dividing theta (model.get_rope_factors: the same tensor for every layer).
- kq_scale 1 / sqrtf(head_dim), applied inside the softmax (ggml_soft_max_ext).
- The last layer keeps only the rows whose logits are wanted (inp_out_ids) before the residual add:
  with logits="last" its attention output and FFN run on one row, as in llama.cpp's decode;
  logits="none" runs every row through every layer (an imatrix collection sees every product).
- SwiGLU as ggml_vec_swiglu_f32 (vector silu over 8/16 lanes, scalar tail).
"""

from __future__ import annotations

import numpy as np

from ggquant.arch.llama import ROPE_FREQS, LlamaHparams
from ggquant.runtime.model import KVCache, Model, TensorSet


class LlamaLayer:
    def __init__(self, ts: TensorSet, il: int, hp: LlamaHparams, qk_norm: bool, qkv_bias: bool):
        H, d = hp.n_embd, hp.head_dim
        nh, nkv, F = hp.n_head[il], hp.n_head_kv[il], hp.n_ff[il]
        p = f"blk.{il}."
        self.attn_norm = ts.vector(p + "attn_norm.weight", (H,))
        self.wq = ts.get(p + "attn_q.weight", (nh * d, H))
        self.wk = ts.get(p + "attn_k.weight", (nkv * d, H))
        self.wv = ts.get(p + "attn_v.weight", (nkv * d, H))
        self.wo = ts.get(p + "attn_output.weight", (H, nh * d))
        # q/k/v biases: required by qwen2, optional in llama (create_tensor_qkv, TENSOR_NOT_REQUIRED)
        self.bq = ts.vector(p + "attn_q.bias", (nh * d,), required=qkv_bias)
        self.bk = ts.vector(p + "attn_k.bias", (nkv * d,), required=qkv_bias)
        self.bv = ts.vector(p + "attn_v.bias", (nkv * d,), required=qkv_bias)
        self.bo = ts.vector(p + "attn_output.bias", (H,), required=False)
        self.q_norm = ts.vector(p + "attn_q_norm.weight", (d,)) if qk_norm else None
        self.k_norm = ts.vector(p + "attn_k_norm.weight", (d,)) if qk_norm else None
        self.ffn_norm = ts.vector(p + "ffn_norm.weight", (H,))
        self.w_gate = ts.get(p + "ffn_gate.weight", (F, H))
        self.w_up = ts.get(p + "ffn_up.weight", (F, H))
        self.w_down = ts.get(p + "ffn_down.weight", (H, F))


class LlamaModel(Model):
    arch = "llama"
    hparams_class = LlamaHparams
    hp: LlamaHparams
    QK_NORM = False  # Qwen3: per-head RMS norms on q and k before RoPE
    QKV_BIAS = False  # Qwen2: q/k/v biases required

    def load_tensors(self, ts: TensorSet) -> None:
        hp = self.hp
        self.layers = [LlamaLayer(ts, il, hp, self.QK_NORM, self.QKV_BIAS) for il in range(hp.n_layer)]
        self.rope_freqs = ts.vector(ROPE_FREQS, (hp.n_rot // 2,), required=False)

    def rope_args(self) -> dict:
        """ggml_rope_ext's parameters, as keyword arguments of the backend's rope."""
        hp = self.hp
        return dict(n_dims=hp.n_rot, base=hp.rope_base, freq_scale=hp.rope_freq_scale, freq_factors=self.rope_freqs,
                    mode=hp.rope_mode)

    def scale_query(self, q, pos):
        """Roped queries [T, nh, d] before attention (mistral3: the attention temperature)."""
        return q

    def new_cache(self, n_ctx: int) -> KVCache:
        hp = self.hp
        return KVCache(self.backend, n_ctx, {il: (hp.n_head_kv[il], hp.head_dim) for il in range(hp.n_layer)})

    def forward(self, ids, pos0, cache, logits="last"):
        be, hp = self.backend, self.hp
        T, d, eps = len(ids), hp.head_dim, hp.eps
        pos = np.arange(pos0, pos0 + T)
        rope = self.rope_args()
        x = be.rows(self.tok_embd, ids)  # [T, H]
        last = len(self.layers) - 1
        for il, L in enumerate(self.layers):
            nh, nkv = hp.n_head[il], hp.n_head_kv[il]
            h = be.rms_norm(x, L.attn_norm, eps)
            q, k, v = be.matmuls(h, [L.wq, L.wk, L.wv])
            if L.bq is not None:
                q = be.add_bias(q, L.bq)
            if L.bk is not None:
                k = be.add_bias(k, L.bk)
            if L.bv is not None:
                v = be.add_bias(v, L.bv)
            q, k = q.reshape(T, nh, d), k.reshape(T, nkv, d)
            if L.q_norm is not None:
                q = be.norm_rope(q, L.q_norm, eps, pos, **rope)
                k = be.norm_rope(k, L.k_norm, eps, pos, **rope)
            else:
                q = be.rope(q, pos, **rope)
                k = be.rope(k, pos, **rope)
            q = self.scale_query(q, pos)
            cache.store(il, pos0, k, v.reshape(T, nkv, d))
            a = be.attention(q, cache.layers[il], pos0 + T, pos, 0, hp.kq_scale)  # [T, nh*d]
            if il == last and logits == "last":  # inp_out_ids: only the row whose logits are wanted
                a, x = a[-1:], x[-1:]
            o = be.matmul(a, L.wo)
            if L.bo is not None:
                o = be.add_bias(o, L.bo)
            x = o + x  # ffn_inp = ggml_add(cur, inpSA)

            m = be.rms_norm(x, L.ffn_norm, eps)
            gate, up = be.matmuls(m, [L.w_gate, L.w_up])
            x = be.matmul(be.swiglu(gate, up), L.w_down) + x
        return self.head(x, "none" if logits == "none" else "all")
