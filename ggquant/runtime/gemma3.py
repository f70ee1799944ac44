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

Details as llama.cpp has them:
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

from dataclasses import dataclass

import numpy as np

from ggquant.errors import GGQuantError

from .model import KVCache, Model, TensorSet, f32, register, sqrtf


@dataclass
class Gemma3Params:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: list[int]
    n_head_kv: list[int]
    head_dim: int
    n_ff: list[int]
    eps: float
    n_ctx_train: int
    rope_base: float
    rope_base_swa: float
    rope_scale: float  # global layers: 1 / rope.scaling.factor
    n_swa: int  # 0: no sliding window
    is_swa: list[bool]
    attn_scale: float
    final_softcap: float  # 0: none

    @classmethod
    def from_meta(cls, meta, n_vocab: int) -> "Gemma3Params":
        n_layer = int(meta.get("block_count"))
        n_embd = int(meta.get("embedding_length"))
        n_head = [int(h) for h in meta.per_layer("attention.head_count", n_layer)]
        n_head_kv = [int(h) for h in meta.per_layer("attention.head_count_kv", n_layer, n_head[0])]
        head_dim = int(meta.get("attention.key_length", n_embd // n_head[0]))
        if int(meta.get("attention.value_length", head_dim)) != head_dim:
            raise GGQuantError(f"{meta.path}: gemma3 with key_length != value_length is not supported")
        n_swa = int(meta.get("attention.sliding_window", 0))
        if n_swa > 0:
            pat = meta.get("attention.sliding_window_pattern", 6)
            if isinstance(pat, (list, np.ndarray)):
                is_swa = [bool(p) for p in pat]
                if len(is_swa) != n_layer:
                    raise GGQuantError(f"{meta.path}: sliding_window_pattern has {len(is_swa)} entries for "
                                       f"{n_layer} layers")
            else:
                n = int(pat)
                is_swa = [n == 0 or (il % n < n - 1) for il in range(n_layer)]
        else:
            is_swa = [False] * n_layer
        factor = float(meta.get("rope.scaling.factor", meta.get("rope.scale_linear", 0.0)))
        # llama_model_gemma3::load_arch_hparams
        if n_layer == 62:
            attn_scale = f32(1.0 / np.sqrt(np.float32(n_embd // n_head[0])))
        else:
            attn_scale = f32(np.float32(1.0) / np.sqrt(np.float32(head_dim)))
        return cls(
            n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
            head_dim=head_dim, n_ff=[int(f) for f in meta.per_layer("feed_forward_length", n_layer)],
            eps=float(meta.get("attention.layer_norm_rms_epsilon")),
            n_ctx_train=int(meta.get("context_length", 8192)),
            rope_base=float(meta.get("rope.freq_base", 10000.0)),
            rope_base_swa=float(meta.get("rope.freq_base_swa", 10000.0)),
            rope_scale=1.0 if factor == 0.0 else f32(1.0 / np.float32(factor)),
            n_swa=n_swa, is_swa=is_swa, attn_scale=attn_scale,
            final_softcap=float(meta.get("final_logit_softcapping", 0.0) or 0.0),
        )


class Gemma3Layer:
    def __init__(self, ts: TensorSet, il: int, hp: Gemma3Params):
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


@register
class Gemma3(Model):
    arch = "gemma3"

    def __init__(self, reader, backend):
        super().__init__(reader, backend)
        ts = TensorSet(reader, backend)
        n_vocab = ts.n_vocab()
        self.hp = hp = Gemma3Params.from_meta(self.meta, n_vocab)
        self.n_vocab, self.n_ctx_train = n_vocab, hp.n_ctx_train
        H = hp.n_embd
        self.tok_embd = ts.get("token_embd.weight", (n_vocab, H))
        self.output_norm = ts.vector("output_norm.weight", (H,))
        self.output = ts.get("output.weight", (n_vocab, H), required=False) or self.tok_embd
        self.layers = [Gemma3Layer(ts, il, hp) for il in range(hp.n_layer)]
        ts.check("gemma3")

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
            scale = 1.0 if swa else hp.rope_scale
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
