"""Toy F32 GGUFs for whole-file quantization tests, written with gguf-py (an independent writer).

llama_model_quantize only loads hparams and the tensor list, so a "llama" GGUF may carry any
tensor names: these toys exercise the mixture rules (tied/untied output, layers without attn_v,
per-layer embedding tables, rows whose width forces a fallback type).
"""

import gguf
import numpy as np


def _llama_writer(path, *, n_layer, n_embd, n_ff, n_head, n_head_kv, n_expert=0):
    """A "llama" GGUFWriter with the hparams llama_model_quantize reads (and an expert count for MoE)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    return w


def _finish(w, path):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def build_toy_llama(path, *, n_layer=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=1, n_vocab=320,
                    tied=True, skip_attn_v=(5, 6), extras=True, seed=0):
    rng = np.random.default_rng(seed)
    w = _llama_writer(path, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv)

    def mat(rows, cols, scale=0.02):
        x = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(scale)
        x[rng.integers(0, rows), rng.integers(0, cols)] = np.float32(scale * 40)  # an outlier
        return x

    kv = n_embd // n_head * n_head_kv
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", mat(n_vocab, n_embd))
    if extras:
        w.add_tensor("per_layer_token_embd.weight", mat(n_vocab, 32 * n_layer))
        w.add_tensor("per_layer_model_proj.weight", mat(32 * n_layer, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(kv, n_embd))
        if i not in skip_attn_v:
            w.add_tensor(p + "attn_v.weight", mat(kv, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
        if extras:
            w.add_tensor(p + "inp_gate.weight", mat(32, n_embd))
            w.add_tensor(p + "proj.weight", mat(n_embd, 32))  # 32 columns: k-quants fall back
            if i == 0:
                w.add_tensor(p + "odd.weight", mat(8, 48))  # 48 columns: every quant falls back to F16
    return _finish(w, path)


def build_toy_moe(path, *, n_expert=4, n_layer=4, n_embd=256, n_ff=256, n_head=4, n_head_kv=1, n_vocab=320,
                  seed=2):
    """A llama-architecture MoE toy: 3-D expert tensors [n_expert, rows, cols], a router, and the
    attention tensors (the IQ and MXFP4_MOE rules look at n_expert and at 3-D shapes)."""
    rng = np.random.default_rng(seed)
    w = _llama_writer(path, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                      n_expert=n_expert)

    def mat(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    kv = n_embd // n_head * n_head_kv
    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", mat(n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(kv, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(kv, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate_inp.weight", mat(n_expert, n_embd))
        w.add_tensor(p + "ffn_gate_exps.weight", mat(n_expert, n_ff, n_embd))
        w.add_tensor(p + "ffn_up_exps.weight", mat(n_expert, n_ff, n_embd))
        w.add_tensor(p + "ffn_down_exps.weight", mat(n_expert, n_embd, n_ff))
    return _finish(w, path)
