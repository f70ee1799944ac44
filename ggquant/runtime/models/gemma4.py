"""Gemma 4 text decoder (E2B, E4B, 31B, 26B-A4B), as llama.cpp runs it (src/models/gemma4.cpp).

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
            MoE layers (26B-A4B): the dense MLP's output is normed by post_ffw_norm_1 and added to
            the experts' (rms(...) * post_ffw_norm_2) before post_ffw_norm:
            p = softmax(W_r ((rms(x) / sqrt(H)) * gate_inp.scale))                 W_r [E, H]
            top k experts by p, weights w = p_top / sum(p_top)
            experts = sum_j w_j * s[e_j] * W_down[e_j] (gelu(g) * u),  g|u = W_gate_up[e_j] h,
            h = rms(x) * pre_ffw_norm_2            W_gate_up [E, 2F, H], W_down [E, H, F], s [E]
        x = x + rms(W_proj (gelu(W_gate_l x) * ple[l])) * post_norm     W_gate_l [P, H], W_proj [H, P]
        x = x * layer_output_scale                                          (when present)
    logits = cap * tanh(((rms(x) * output_norm) E^T) / cap)                 (when the cap is set)

RoPE per layer kind: sliding layers rope.freq_base_swa over rope.dimension_count_swa dims; full
layers rope.freq_base over rope.dimension_count dims with rope_freqs.weight as frequency
factors (proportional RoPE: factor 1e30 switches a pair off). NeoX pairing.

The hyperparameters (the KV reuse map included) are decoded by ggquant.arch.gemma4.Gemma4Hparams,
the decoder the GGUF -> HF direction uses too.
"""

from __future__ import annotations

import numpy as np

from ggquant.arch.gemma4 import Gemma4Hparams
from ggquant.errors import GGQuantError
from ggquant.runtime.model import KVCache, Model, TensorSet, f32, sqrtf

# llama_model_gemma4::graph::project_per_layer_inputs: the token part and the projected part of
# the per-layer inputs are summed and scaled by per_layer_input_scale = 1.0f / sqrtf(2.0f)
PLE_INPUT_SCALE = f32(np.float32(1.0) / np.sqrt(np.float32(2.0)))


class Gemma4Layer:
    def __init__(self, ts: TensorSet, il: int, hp: Gemma4Hparams):
        H, d, P = hp.n_embd, hp.layer_head_dim(il), hp.n_embd_per_layer
        nh, nkv, F = hp.n_head[il], hp.n_head_kv[il], hp.n_ff[il]
        own_kv = il < hp.n_kv_from_start
        p = f"blk.{il}."
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
        # mixture of experts (26B-A4B): a router and stacked experts beside the dense MLP
        self.moe = ts.has(p + "ffn_gate_inp.weight")
        if self.moe:
            E, Fe = hp.n_expert, hp.n_ff_exp[il]
            if E == 0 or Fe == 0:
                raise GGQuantError(f"{ts.reader.path}: layer {il} has a router (ffn_gate_inp) but the file declares "
                                   f"{E} experts of width {Fe} (expert_count, expert_feed_forward_length)")
            self.gate_inp = ts.get(p + "ffn_gate_inp.weight", (E, H))
            self.gate_inp_s = ts.vector(p + "ffn_gate_inp.scale", (H,))
            self.pre_ffw_norm_2 = ts.vector(p + "pre_ffw_norm_2.weight", (H,))
            self.post_ffw_norm_1 = ts.vector(p + "post_ffw_norm_1.weight", (H,))
            self.post_ffw_norm_2 = ts.vector(p + "post_ffw_norm_2.weight", (H,))
            self.gate_up_exps = ts.get(p + "ffn_gate_up_exps.weight", (E, 2 * Fe, H), required=False)
            self.gate_exps_s = self.up_exps_s = None
            if self.gate_up_exps is None:  # llama.cpp also loads separate gate / up experts
                self.gate_exps = ts.get(p + "ffn_gate_exps.weight", (E, Fe, H))
                self.up_exps = ts.get(p + "ffn_up_exps.weight", (E, Fe, H))
                # per-expert factors of NVFP4 experts (llama_model::load_tensors' generic pass loads
                # them only beside separate gate / up experts)
                self.gate_exps_s = ts.vector(p + "ffn_gate_exps.scale", (E,), required=False)
                self.up_exps_s = ts.vector(p + "ffn_up_exps.scale", (E,), required=False)
            self.down_exps = ts.get(p + "ffn_down_exps.weight", (E, H, Fe))
            self.down_exps_s = ts.vector(p + "ffn_down_exps.scale", (E,), required=False)
        if P > 0:
            self.inp_gate = ts.get(p + "inp_gate.weight", (P, H))
            self.proj = ts.get(p + "proj.weight", (H, P))
            self.post_norm = ts.vector(p + "post_norm.weight", (H,))


class Gemma4Model(Model):
    arch = "gemma4"
    hparams_class = Gemma4Hparams
    hp: Gemma4Hparams

    def load_tensors(self, ts: TensorSet) -> None:
        hp, n_vocab = self.hp, self.n_vocab
        H, P, L = hp.n_embd, hp.n_embd_per_layer, hp.n_layer
        if P > 0:
            self.per_layer_tok_embd = ts.get("per_layer_token_embd.weight", (n_vocab, L * P))
            self.per_layer_model_proj = ts.get("per_layer_model_proj.weight", (L * P, H))
            self.per_layer_proj_norm = ts.vector("per_layer_proj_norm.weight", (P,))
        self.rope_freqs = None
        if not all(hp.is_swa):  # frequency factors of the full-attention layers' proportional RoPE
            self.rope_freqs = ts.vector("rope_freqs.weight", (hp.head_dim // 2,))
        self.layers = [Gemma4Layer(ts, il, hp) for il in range(L)]

    def new_cache(self, n_ctx: int) -> KVCache:
        hp = self.hp
        return KVCache(self.backend, n_ctx,
                       {il: (hp.n_head_kv[il], hp.layer_head_dim(il)) for il in range(hp.n_kv_from_start)})

    def per_layer_inputs(self, ids, x0):
        """[T, L, P]: llama_model_gemma4::graph build_inp_per_layer + project_per_layer_inputs."""
        be, hp = self.backend, self.hp
        T, L, P = len(ids), hp.n_layer, hp.n_embd_per_layer
        tok = be.rows(self.per_layer_tok_embd, ids).reshape(T, L, P) * sqrtf(P)
        proj_scale = f32(np.float32(1.0) / np.sqrt(np.float32(hp.n_embd)))  # per_layer_projection_scale
        proj = be.matmul(x0, self.per_layer_model_proj) * proj_scale
        proj = be.rms_norm(proj.reshape(T, L, P), self.per_layer_proj_norm, hp.eps)
        return (proj + tok) * PLE_INPUT_SCALE

    def forward(self, ids, pos0, cache, logits="last"):
        be, hp = self.backend, self.hp
        T, eps = len(ids), hp.eps
        pos = np.arange(pos0, pos0 + T)
        x = be.rows(self.tok_embd, ids) * sqrtf(hp.n_embd)  # [T, H]
        ple = self.per_layer_inputs(ids, x) if hp.n_embd_per_layer > 0 else None  # [T, L, P]
        for il, Ly in enumerate(self.layers):
            swa = hp.is_swa[il]
            d, n_rot, nh, nkv = hp.layer_head_dim(il), hp.layer_n_rot(il), hp.n_head[il], hp.n_head_kv[il]
            base = hp.rope_base_swa if swa else hp.rope_base
            scale = 1.0 if swa else hp.rope_freq_scale
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
            q = be.norm_rope(q.reshape(T, nh, d), Ly.q_norm, eps, pos, n_rot, base, scale, ff)
            if il < hp.n_kv_from_start:
                k = be.norm_rope(k.reshape(T, nkv, d), Ly.k_norm, eps, pos, n_rot, base, scale, ff)
                v = be.rms_norm(v.reshape(T, nkv, d), None, eps)
                cache.store(il, pos0, k, v)
            src = hp.kv_source[il]
            a = be.attention(q, cache.layers[src], pos0 + T, pos, hp.n_swa if swa else 0)  # [T, nh*d]
            x = be.add_rms_norm(x, be.matmul(a, Ly.wo), Ly.post_attn_norm, eps)

            m = be.rms_norm(x, Ly.ffn_norm, eps)
            gate, up = be.matmuls(m, [Ly.w_gate, Ly.w_up])
            mlp = be.matmul(be.geglu(gate, up), Ly.w_down)
            if Ly.moe:
                mlp = be.rms_norm(mlp, Ly.post_ffw_norm_1, eps) + self.experts(x, Ly, il)
            x = be.add_rms_norm(x, mlp, Ly.post_ffw_norm, eps)

            if ple is not None:
                g = be.geglu(be.matmul(x, Ly.inp_gate), ple[:, il, :])  # gelu(.) * ple [T, P]
                x = be.add_rms_norm(x, be.matmul(g, Ly.proj), Ly.post_norm, eps)
            if Ly.out_scale is not None:
                x = x * Ly.out_scale

        return self.head(x, logits)

    def experts(self, x, Ly: Gemma4Layer, il: int):
        """The mixture-of-experts branch of layer il on the attention output x [T, H]
        (llama_model_gemma4::graph, then llm_graph_context::build_moe_ffn with softmax gating,
        norm_w and the per-expert down scale), normed by post_ffw_norm_2."""
        be, hp = self.backend, self.hp
        eps, H, k = hp.eps, hp.n_embd, hp.n_expert_used[il]
        # router: logits = W_r ((rms(x) / sqrt(H)) * s); probabilities over all experts, top k,
        # renormalised to sum 1
        r = be.rms_norm(x, None, eps) * router_scale(H) * Ly.gate_inp_s
        ids, weights = be.moe_top_k(be.softmax(be.matmul(r, Ly.gate_inp)), k)
        h = be.rms_norm(x, Ly.pre_ffw_norm_2, eps)
        if Ly.gate_up_exps is not None:
            gu = be.mul_mat_id(h, Ly.gate_up_exps, ids)  # [T, k, 2F]: gate rows, then up rows
            Fe = gu.shape[-1] // 2
            gate, up = gu[..., :Fe], gu[..., Fe:]
        else:
            up = be.mul_mat_id(h, Ly.up_exps, ids)
            if Ly.up_exps_s is not None:  # NVFP4 experts' factors (build_lora_mm_id's w_s)
                up = up * Ly.up_exps_s[ids][..., None]
            gate = be.mul_mat_id(h, Ly.gate_exps, ids)
            if Ly.gate_exps_s is not None:
                gate = gate * Ly.gate_exps_s[ids][..., None]
        down = be.mul_mat_id(be.geglu(gate, up), Ly.down_exps, ids)  # [T, k, H]
        if Ly.down_exps_s is not None:  # router.per_expert_scale or NVFP4 factors (build_lora_mm_id's w_s)
            down = down * Ly.down_exps_s[ids][..., None]
        down = down * weights[..., None]
        out = down[:, 0]
        for j in range(1, k):  # the expert outputs are added one view after the other
            out = out + down[:, j]
        return be.rms_norm(out, Ly.post_ffw_norm_2, eps)


def router_scale(n_embd: int) -> float:
    """llama_model_gemma4::graph: the router input is scaled by 1.0f / sqrtf((float) n_embd)."""
    return f32(np.float32(1.0) / np.sqrt(np.float32(n_embd)))
