"""Gemma 4 text decoder (E2B / E4B family), as llama.cpp runs it (src/models/gemma4.cpp).

Per token (H = n_embd, P = per-layer input width, L = n_layer; d_l = head dim of layer l: the
sliding layers' key_length_swa or the full layers' key_length):

    x0  = E[id] * sqrt(H)                                                   E: token_embd [V, H]
    per-layer inputs (PLE), once:
        tok = E_pl[id] * sqrt(P)                          E_pl: per_layer_token_embd [V, L*P] -> [L, P]
        ctx = rms_P(W_plm x0 / sqrt(H)) * per_layer_proj_norm             W_plm: [L*P, H] -> [L, P]
        ple = (ctx + tok) / sqrt(2)                                                          [L, P]
    x = x0; for each layer l:
        h = rms(x) * attn_norm
        q = rope_l(rms_head(h Wq) * q_norm)                                 Wq [nh*d_l, H]
        layers with their own K/V (l < L - shared_kv_layers):
            k = rope_l(rms_head(h Wk) * k_norm);  v = rms_head(h Wv)          (v = raw k when Wv absent)
        later layers reuse the cache of the last own-K/V layer of the same kind (sliding / full)
        a = softmax(q k^T + mask) v  Wo        (scale 1: the q/k norms set the temperature)
        x = x + rms(a) * post_attention_norm
        x = x + rms(W_down (gelu(W_gate m) * W_up m)) * post_ffw_norm,  m = rms(x) * ffn_norm
        x = x + rms(W_proj (gelu(W_gate_l x) * ple[l])) * post_norm     W_gate_l [P, H], W_proj [H, P]
        x = x * layer_output_scale                                          (when present)
    logits = cap * tanh(((rms(x) * output_norm) E^T) / cap)                 (when the cap is set)

RoPE per layer kind: sliding layers rope.freq_base_swa over rope.dimension_count_swa dims; full
layers rope.freq_base over rope.dimension_count dims with rope_freqs.weight as frequency
factors (proportional RoPE: factor 1e30 switches a pair off). NeoX pairing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ggquant.errors import GGQuantError

from .model import KVCache, Model, TensorSet, f32, register, sqrtf


@dataclass
class Gemma4Params:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: list[int]
    n_head_kv: list[int]
    head_dim: list[int]  # per layer: key_length_swa on sliding layers, key_length on full layers
    n_rot: list[int]
    n_ff: list[int]
    eps: float
    n_ctx_train: int
    rope_base: float
    rope_base_swa: float
    rope_scale: float
    n_swa: int
    is_swa: list[bool]
    n_kv_from_start: int  # layers 0 .. n_kv_from_start - 1 compute their own K/V
    kv_source: list[int]  # the layer whose cache layer l attends over
    n_embd_per_layer: int
    final_softcap: float

    @classmethod
    def from_meta(cls, meta, n_vocab: int) -> "Gemma4Params":
        n_layer = int(meta.get("block_count"))
        n_embd = int(meta.get("embedding_length"))
        n_head = [int(h) for h in meta.per_layer("attention.head_count", n_layer)]
        n_head_kv = [int(h) for h in meta.per_layer("attention.head_count_kv", n_layer, n_head[0])]
        hd_full = int(meta.get("attention.key_length", n_embd // n_head[0]))
        hd_swa = int(meta.get("attention.key_length_swa"))
        if int(meta.get("attention.value_length", hd_full)) != hd_full or \
                int(meta.get("attention.value_length_swa", hd_swa)) != hd_swa:
            raise GGQuantError(f"{meta.path}: Gemma 4 requires value_length == key_length (llama.cpp does too)")
        rot_full = int(meta.get("rope.dimension_count", hd_full))
        rot_swa = int(meta.get("rope.dimension_count_swa", rot_full))
        pat = meta.get("attention.sliding_window_pattern")
        is_swa = [bool(p) for p in pat] if isinstance(pat, (list, np.ndarray)) else None
        if is_swa is None or len(is_swa) != n_layer:
            raise GGQuantError(f"{meta.path}: 'gemma4.attention.sliding_window_pattern' must be a bool array with "
                               f"one entry per layer ({n_layer})")
        n_shared = int(meta.get("attention.shared_kv_layers", 0))
        n_kv = n_layer - n_shared
        kv_source = list(range(n_layer))
        if n_shared > 0:
            # llama-model.cpp: a shared sliding layer reuses layer n_kv - 2, a shared full layer n_kv - 1
            if n_kv < 2:
                raise GGQuantError(f"{meta.path}: {n_shared} KV-shared layers of {n_layer} leave fewer than 2 "
                                   f"layers with their own K/V")
            for il in range(n_kv, n_layer):
                src = n_kv - (2 if is_swa[il] else 1)
                if is_swa[src] != is_swa[il]:
                    raise GGQuantError(
                        f"{meta.path}: layer {il} ({'sliding' if is_swa[il] else 'full'}) would reuse the K/V of "
                        f"layer {src} ({'sliding' if is_swa[src] else 'full'}); llama.cpp requires layer "
                        f"{n_kv - 1} full and layer {n_kv - 2} sliding (it aborts on this file)")
                kv_source[il] = src
        factor = float(meta.get("rope.scaling.factor", 0.0))
        return cls(
            n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
            head_dim=[hd_swa if s else hd_full for s in is_swa],
            n_rot=[rot_swa if s else rot_full for s in is_swa],
            n_ff=[int(f) for f in meta.per_layer("feed_forward_length", n_layer)],
            eps=float(meta.get("attention.layer_norm_rms_epsilon")),
            n_ctx_train=int(meta.get("context_length", 131072)),
            rope_base=float(meta.get("rope.freq_base", 10000.0)),
            rope_base_swa=float(meta.get("rope.freq_base_swa", 10000.0)),
            rope_scale=1.0 if factor == 0.0 else f32(1.0 / np.float32(factor)),
            n_swa=int(meta.get("attention.sliding_window")),
            is_swa=is_swa, n_kv_from_start=n_kv, kv_source=kv_source,
            n_embd_per_layer=int(meta.get("embedding_length_per_layer_input", 0)),
            final_softcap=float(meta.get("final_logit_softcapping", 0.0) or 0.0),
        )


class Gemma4Layer:
    def __init__(self, ts: TensorSet, il: int, hp: Gemma4Params):
        H, d, P = hp.n_embd, hp.head_dim[il], hp.n_embd_per_layer
        nh, nkv, F = hp.n_head[il], hp.n_head_kv[il], hp.n_ff[il]
        own_kv = il < hp.n_kv_from_start
        p = f"blk.{il}."
        if ts.has(p + "ffn_gate_inp.weight"):
            raise GGQuantError(f"{ts.reader.path}: layer {il} is a mixture-of-experts layer (ffn_gate_inp); the "
                               f"ggquant runtime supports the dense Gemma 4 models (E2B, E4B)")
        self.attn_norm = ts.vector(p + "attn_norm.weight", (H,))
        self.wqkv = ts.get(p + "attn_qkv.weight", (nh * d + 2 * nkv * d, H), required=False)
        if self.wqkv is None:
            self.wq = ts.get(p + "attn_q.weight", (nh * d, H))
            self.wk = ts.get(p + "attn_k.weight", (nkv * d, H), required=own_kv)
            self.wv = ts.get(p + "attn_v.weight", (nkv * d, H), required=False)
        self.wo = ts.get(p + "attn_output.weight", (H, nh * d))
        self.q_norm = ts.vector(p + "attn_q_norm.weight", (d,))
        self.k_norm = ts.vector(p + "attn_k_norm.weight", (d,), required=own_kv)
        self.post_attn_norm = ts.vector(p + "post_attention_norm.weight", (H,))
        self.out_scale = ts.vector(p + "layer_output_scale.weight", (1,), required=False)
        self.ffn_norm = ts.vector(p + "ffn_norm.weight", (H,))
        self.w_gate = ts.get(p + "ffn_gate.weight", (F, H))
        self.w_up = ts.get(p + "ffn_up.weight", (F, H))
        self.w_down = ts.get(p + "ffn_down.weight", (H, F))
        self.post_ffw_norm = ts.vector(p + "post_ffw_norm.weight", (H,))
        if P > 0:
            self.inp_gate = ts.get(p + "inp_gate.weight", (P, H))
            self.proj = ts.get(p + "proj.weight", (H, P))
            self.post_norm = ts.vector(p + "post_norm.weight", (H,))


@register
class Gemma4(Model):
    arch = "gemma4"

    def __init__(self, reader, backend):
        super().__init__(reader, backend)
        ts = TensorSet(reader, backend)
        n_vocab = ts.n_vocab()
        self.hp = hp = Gemma4Params.from_meta(self.meta, n_vocab)
        self.n_vocab, self.n_ctx_train = n_vocab, hp.n_ctx_train
        H, P, L = hp.n_embd, hp.n_embd_per_layer, hp.n_layer
        self.tok_embd = ts.get("token_embd.weight", (n_vocab, H))
        self.output_norm = ts.vector("output_norm.weight", (H,))
        self.output = ts.get("output.weight", (n_vocab, H), required=False) or self.tok_embd
        if P > 0:
            self.per_layer_tok_embd = ts.get("per_layer_token_embd.weight", (n_vocab, L * P))
            self.per_layer_model_proj = ts.get("per_layer_model_proj.weight", (L * P, H))
            self.per_layer_proj_norm = ts.vector("per_layer_proj_norm.weight", (P,))
        full = [il for il in range(L) if not hp.is_swa[il]]
        self.rope_freqs = None
        if full:
            half = hp.head_dim[full[0]] // 2
            self.rope_freqs = ts.vector("rope_freqs.weight", (half,))
        self.layers = [Gemma4Layer(ts, il, hp) for il in range(L)]
        ts.check("gemma4")

    def new_cache(self, n_ctx: int) -> KVCache:
        hp = self.hp
        return KVCache(self.backend, n_ctx,
                       {il: (hp.n_head_kv[il], hp.head_dim[il]) for il in range(hp.n_kv_from_start)})

    def per_layer_inputs(self, ids, x0):
        """[T, L, P]: llama_model_gemma4::graph build_inp_per_layer + project_per_layer_inputs."""
        be, hp = self.backend, self.hp
        T, L, P = len(ids), hp.n_layer, hp.n_embd_per_layer
        tok = be.rows(self.per_layer_tok_embd, ids).reshape(T, L, P) * sqrtf(P)
        proj = be.matmul(x0, self.per_layer_model_proj) * f32(np.float32(1.0) / np.sqrt(np.float32(hp.n_embd)))
        proj = be.rms_norm(proj.reshape(T, L, P), self.per_layer_proj_norm, hp.eps)
        return (proj + tok) * f32(np.float32(1.0) / np.sqrt(np.float32(2.0)))

    def forward(self, ids, pos0, cache, logits="last"):
        be, hp = self.backend, self.hp
        T, eps = len(ids), hp.eps
        pos = np.arange(pos0, pos0 + T)
        x = be.rows(self.tok_embd, ids) * sqrtf(hp.n_embd)  # [T, H]
        ple = self.per_layer_inputs(ids, x) if hp.n_embd_per_layer > 0 else None  # [T, L, P]
        for il, Ly in enumerate(self.layers):
            swa = hp.is_swa[il]
            d, nh, nkv = hp.head_dim[il], hp.n_head[il], hp.n_head_kv[il]
            base = hp.rope_base_swa if swa else hp.rope_base
            scale = 1.0 if swa else hp.rope_scale
            ff = None if swa else self.rope_freqs

            h = be.rms_norm(x, Ly.attn_norm, eps)
            if Ly.wqkv is not None:
                qkv = be.matmul(h, Ly.wqkv)
                q, k, v = qkv[:, :nh * d], qkv[:, nh * d:(nh + nkv) * d], qkv[:, (nh + nkv) * d:]
            else:
                own = il < hp.n_kv_from_start
                ws = [Ly.wq] + ([Ly.wk] + ([Ly.wv] if Ly.wv is not None else []) if own else [])
                outs = be.matmuls(h, ws)
                q = outs[0]
                k = outs[1] if own else None
                v = (outs[2] if Ly.wv is not None else k) if own else None
            q = be.norm_rope(q.reshape(T, nh, d), Ly.q_norm, eps, pos, hp.n_rot[il], base, scale, ff)
            if il < hp.n_kv_from_start:
                k = be.norm_rope(k.reshape(T, nkv, d), Ly.k_norm, eps, pos, hp.n_rot[il], base, scale, ff)
                v = be.rms_norm(v.reshape(T, nkv, d), None, eps)
                cache.store(il, pos0, k, v)
            src = hp.kv_source[il]
            a = be.attention(q, cache.layers[src], pos0 + T, pos, hp.n_swa if swa else 0)  # [T, nh*d]
            x = be.add_rms_norm(x, be.matmul(a, Ly.wo), Ly.post_attn_norm, eps)

            m = be.rms_norm(x, Ly.ffn_norm, eps)
            gate, up = be.matmuls(m, [Ly.w_gate, Ly.w_up])
            x = be.add_rms_norm(x, be.matmul(be.geglu(gate, up), Ly.w_down), Ly.post_ffw_norm, eps)

            if ple is not None:
                g = be.geglu(be.matmul(x, Ly.inp_gate), ple[:, il, :])  # gelu(.) * ple [T, P]
                x = be.add_rms_norm(x, be.matmul(g, Ly.proj), Ly.post_norm, eps)
            if Ly.out_scale is not None:
                x = x * Ly.out_scale

        return self.head(x, logits)
