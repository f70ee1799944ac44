"""Llama-style decoders: LlamaForCausalLM (Llama 2/3/3.1/3.2/3.3, SmolLM2, TinyLlama...) and
MistralForCausalLM, both GGUF architecture `llama`; the shared base of the Qwen families
(arch/qwen2.py, arch/qwen3.py).

What llama.cpp's converter does for them (conversion/llama.py LlamaModel on conversion/base.py
TextModel, in the llama.cpp tree of llama-cpp-python 0.3.36):
- q_proj / k_proj weights (and biases) are permuted: within each head the rows
  [0, 2, 4, .., 1, 3, 5, ..] of the interleaved (GPT-J) RoPE layout become the two halves
  llama.cpp's "NORM" RoPE rotates as pairs (2i, 2i+1) — the converter *applies*
  LlamaModel.permute(w, n_head, n_head_kv) (undo_permute = True);
- rope_type "llama3" adds a generated `rope_freqs.weight` [head_dim/2] (generate_extra_tensors),
  computed with torch in float32 as the converter does; linear scaling writes rope.scaling.*;
- llama.vocab_size and rope.dimension_count are written; tied embeddings leave out output.weight;
- vocabulary: tokenizer.model (SentencePiece, Llama 2 / Mistral) when present, else a
  SentencePiece-style tokenizer.json (gguf-py LlamaHfVocab), else the GPT-2 byte-level BPE of
  tokenizer.json with the pre-tokenizer llama.cpp identifies by hash (Llama 3, SmolLM2); a
  tokenizer_config.json add_prefix_space goes first; a 49152-token vocabulary gets add_bos = false.

The config is read as transformers 5's AutoConfig(...).to_dict() gives it to the converter: the
class defaults (LlamaConfig / MistralConfig / Qwen2Config / Qwen3Config, by model_type) for
missing keys, head_dim filled in, legacy rope_theta / rope_scaling folded into rope_parameters.

Read back (runtime/models/llama.py, `convert --to hf`): LlamaHparams decodes the GGUF keys as
llama.cpp's src/models/llama.cpp loads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import MODEL_ARCH, MODEL_TENSOR, TENSOR_NAMES, Keys

from ggquant.arch import register
from ggquant.arch import vocab as V
from ggquant.arch.base import (FULL, TEXT, Arch, GGUFFacts, Rule, TextHparams, f32_value, fold_rope_parameters,
                               hf_token_ids, standard_rope_parameters)
from ggquant.arch.transforms import IDENTITY, SCALAR_TO_1D, Transform
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import KV
from ggquant.formats.hf_folder import read_json
from ggquant.tensor import Tensor

ROPE_FREQS = TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS] + ".weight"

# transformers 5.25 config defaults (what AutoConfig.to_dict() adds for a key config.json leaves out),
# by model_type; head_dim is filled in separately (HEAD_DIM_DEFAULT)
_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
CONFIG_DEFAULTS: dict[str, dict] = {
    "llama": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "mistral": dict(_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=None),
    "ministral3": dict(_COMMON, vocab_size=131072, hidden_size=4096, intermediate_size=14336, num_hidden_layers=34,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                       rms_norm_eps=1e-5, pad_token_id=11, bos_token_id=1, eos_token_id=2, sliding_window=None,
                       rope_parameters={"type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                        "original_max_position_embeddings": 16384, "max_position_embeddings": 262144,
                                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                                        "llama_4_scaling_beta": 0.1}),
    "qwen3": dict(_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=None),
}
HEAD_DIM_DEFAULT = {"qwen3": 128}  # else hidden_size // num_attention_heads; Qwen2Config has no head_dim
HAS_HEAD_DIM = ("llama", "mistral", "qwen3", "ministral3")  # config classes whose to_dict() carries head_dim

LLAMA_GLOBAL = (
    Rule("model.embed_tokens", MODEL_TENSOR.TOKEN_EMBD,
         "token embeddings [n_vocab, hidden]; the output matrix too when tied"),
    Rule("model.norm", MODEL_TENSOR.OUTPUT_NORM, "final RMSNorm gain [hidden]"),
    Rule("lm_head", MODEL_TENSOR.OUTPUT, "untied output matrix [n_vocab, hidden] (absent when tie_word_embeddings)"),
)
LLAMA_LAYER = (
    Rule("model.layers.{bid}.input_layernorm", MODEL_TENSOR.ATTN_NORM, "RMSNorm gain before attention [hidden]"),
    Rule("model.layers.{bid}.self_attn.q_proj", MODEL_TENSOR.ATTN_Q,
         "query projection [n_head*head_dim, hidden] (+ bias); rows permuted for NORM RoPE in the llama family"),
    Rule("model.layers.{bid}.self_attn.k_proj", MODEL_TENSOR.ATTN_K,
         "key projection [n_kv_head*head_dim, hidden] (+ bias); rows permuted for NORM RoPE in the llama family"),
    Rule("model.layers.{bid}.self_attn.v_proj", MODEL_TENSOR.ATTN_V, "value projection [n_kv_head*head_dim, hidden]"),
    Rule("model.layers.{bid}.self_attn.o_proj", MODEL_TENSOR.ATTN_OUT, "attention output [hidden, n_head*head_dim]"),
    Rule("model.layers.{bid}.post_attention_layernorm", MODEL_TENSOR.FFN_NORM, "RMSNorm gain before the MLP [hidden]"),
    Rule("model.layers.{bid}.mlp.gate_proj", MODEL_TENSOR.FFN_GATE, "MLP gate (SiLU) [ffn, hidden]"),
    Rule("model.layers.{bid}.mlp.up_proj", MODEL_TENSOR.FFN_UP, "MLP up [ffn, hidden]"),
    Rule("model.layers.{bid}.mlp.down_proj", MODEL_TENSOR.FFN_DOWN, "MLP down [hidden, ffn]"),
)
LLAMA_TENSORS = LLAMA_GLOBAL + LLAMA_LAYER + (
    Rule("rope_freqs", MODEL_TENSOR.ROPE_FREQS, "generated: llama3 RoPE frequency factors [head_dim/2] (no HF tensor)",
         (".weight",)),
)


# =============================================================================================
# Transforms
# =============================================================================================


class PermuteHeads(Transform):
    """LlamaModel.permute(w, n_head, n_head_kv): in every head of `rows_per_head` rows, the rows
    (0, 2, 4, .., 1, 3, 5, ..) of the interleaved RoPE layout are gathered into two halves; the
    transform works on chunks of whole heads (row_block). A 1-D bias is permuted the same way."""

    def __init__(self, rows_per_head: int, inverse: bool = False):
        if rows_per_head % 2:
            raise GGQuantError(f"a head of {rows_per_head} rows cannot be permuted for RoPE (odd size)")
        self.row_block = rows_per_head
        self.inv = inverse
        self.label = f"{'un' if inverse else ''}permute({rows_per_head})"

    def __call__(self, x, src_dtype):
        n, rest = x.shape[0], x.shape[1:]
        hp = self.row_block
        if n % hp:
            raise AssertionError(f"{self.label}: a chunk of {n} rows is not whole heads")
        if self.inv:  # the inverse: (h, half, 2) -> (h, 2, half)
            return np.ascontiguousarray(x.reshape(n // hp, hp // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape))
        return np.ascontiguousarray(x.reshape(n // hp, 2, hp // 2, *rest).swapaxes(1, 2).reshape(x.shape))

    def inverse(self, hf_shape):
        return PermuteHeads(self.row_block, not self.inv)

    def row_permutation(self, n_rows):
        return self(np.arange(n_rows), None)


# =============================================================================================
# GGUF metadata, read back (runtime and GGUF -> HF)
# =============================================================================================

ROPE_NORM, ROPE_NEOX = "norm", "neox"  # llama_model_rope_type: LLAMA_ROPE_TYPE_NORM / _NEOX
NEOX_ARCHS = ("qwen2", "qwen3")  # the others here (llama, mistral3) rotate adjacent pairs


@dataclass
class LlamaHparams(TextHparams):
    """A llama / qwen2 / qwen3 GGUF's hyperparameters (llama_model_llama::load_arch_hparams and
    the qwen ones: attention.layer_norm_rms_epsilon required, the rest is the generic loader)."""

    n_vocab: int = 0  # llama.vocab_size, else the token list's length
    rope_mode: str = ROPE_NORM

    @classmethod
    def decode(cls, g: GGUFFacts) -> dict:
        d = super().decode(g)
        a = g.arch
        if d["head_dim"] != d["head_dim_v"]:
            raise GGQuantError(f"{g.path}: {a} with key_length != value_length is not supported (llama.cpp asserts "
                               f"n_embd_head_k == n_embd_head_v)")
        if d["n_rot"] != d["head_dim"]:
            raise GGQuantError(f"{g.path}: {a}.rope.dimension_count = {d['n_rot']} but the head size is "
                               f"{d['head_dim']}; llama.cpp's {a} graph asserts they are equal")
        if d["rope_scaling"] not in cls.rope_scalings():
            raise GGQuantError(f"{g.path}: rope scaling type {d['rope_scaling']!r} is not supported by the ggquant "
                               f"runtime for {a} (supported: {', '.join(str(r) for r in cls.rope_scalings())}, llama3 "
                               f"frequency factors)")
        tokens = g.get(Keys.Tokenizer.LIST) or []
        d["n_vocab"] = g.need(Keys.LLM.VOCAB_SIZE.format(arch=a), default=len(tokens))
        d["rope_mode"] = ROPE_NEOX if a in NEOX_ARCHS else ROPE_NORM
        return d

    @classmethod
    def rope_scalings(cls) -> tuple:
        """rope.scaling.type values the family's graph (and the runtime) computes."""
        return (None, "none", "linear")

    @property
    def kq_scale(self) -> float:
        """1 / sqrtf(head_dim): build_attn's kq_scale (f_attention_scale is 0 for these families)."""
        return float(np.float32(1.0) / np.sqrt(np.float32(self.head_dim)))


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """conversion/llama.py LlamaModel.generate_extra_tensors for rope_type "llama3", run with torch
    in float32 exactly as the converter runs it (0-d float32 tensors mixed with Python floats)."""
    import torch

    base = rope.get("rope_theta", 10000.0)
    dim = head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low = rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


# =============================================================================================
# The family
# =============================================================================================


class LlamaLike(Arch):
    """What LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM share:
    llama.cpp's TextModel plus their vocabulary paths. Subclasses set model_arch, the tables,
    PERMUTE_QK, and the model_type whose transformers defaults apply."""

    TEXT_TENSORS = LLAMA_TENSORS
    PERMUTE_QK = False  # LlamaModel.undo_permute
    DEFAULT_MODEL_TYPE = "llama"
    ROPE_TYPES = ("default", "linear", "llama3")  # what the runtime and llama.cpp's graph both do
    GENERATED = (ROPE_FREQS,)
    REQUIRED_HPARAMS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                        "num_key_value_heads", "vocab_size", "max_position_embeddings")

    def text_hparams(self, config: dict) -> dict:
        h = super().text_hparams(config)
        mt = h.get("model_type") if h.get("model_type") in CONFIG_DEFAULTS else self.DEFAULT_MODEL_TYPE
        self.model_type = mt
        out = dict(CONFIG_DEFAULTS[mt])
        out.update(h)
        if out.get("num_key_value_heads") is None:  # LlamaConfig / Qwen*Config: default to num_attention_heads
            out["num_key_value_heads"] = out.get("num_attention_heads")
        if mt in HAS_HEAD_DIM and out.get("head_dim") is None:
            hd = HEAD_DIM_DEFAULT.get(mt)
            if hd is None and isinstance(out.get("hidden_size"), int) and isinstance(out.get("num_attention_heads"), int) \
                    and out["num_attention_heads"]:
                hd = out["hidden_size"] // out["num_attention_heads"]
            out["head_dim"] = hd
        rp = standard_rope_parameters(out)
        for k in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
            out.pop(k, None)
        out["rope_parameters"] = rp
        out["rope_parameters"] = fold_rope_parameters(out)  # llama.cpp TextModel.__init__
        return out

    @property
    def head_dim(self) -> int:
        h = self.hparams
        return h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]

    @property
    def rope(self) -> dict:
        rp = self.hparams["rope_parameters"]
        return rp.get(FULL, rp)

    # --- checks ----------------------------------------------------------------------------
    def validate_hparams(self) -> None:
        h, where = self.hparams, self.config_path
        self.need("rms_norm_eps", (int, float))
        if h.get("hidden_act", "silu") != "silu":
            raise GGQuantError(f"{where}: hidden_act = {h.get('hidden_act')!r}; llama.cpp's {self.gguf_arch} graph "
                               f"uses SiLU")
        rt = self.rope.get("rope_type", "default")
        if str(rt).lower() not in self.ROPE_TYPES:
            raise GGQuantError(
                f"{where}: rope_parameters.rope_type = {rt!r} ({'rope_scaling' if 'rope_scaling' in self.raw else 'rope_parameters'}"
                f"); ggquant converts {', '.join(self.ROPE_TYPES)} RoPE for {self.hf_arch} (others need attention "
                f"factors llama.cpp's {self.gguf_arch} graph and the ggquant runtime do not apply here)")
        if self.rope.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise GGQuantError(f"{where}: partial_rotary_factor = {self.rope['partial_rotary_factor']}; llama.cpp's "
                               f"{self.gguf_arch} graph rotates every head dimension")
        if self.PERMUTE_QK and self.head_dim % 2:
            raise GGQuantError(f"{where}: head_dim {self.head_dim} is odd; RoPE pairs need an even head size")
        if h.get("mlp_bias"):
            raise GGQuantError(f"{where}: mlp_bias = true; ggquant does not convert MLP biases for {self.hf_arch}")
        if (self.dir / "modules.json").is_file() or h.get("classifier_pooling") is not None:
            raise GGQuantError(f"{self.dir / 'modules.json'}: a sentence-transformers embedding model (pooling "
                               f"layers); ggquant converts the causal LM only")
        if "quantization_config" in self.raw and not getattr(self, "_quantized_ok", False):
            pass  # quantized checkpoints are handled by convert.quantized (attach_quantized)

    # fused projections of other families (Phi-3, GPT-NeoX, Baichuan, GPT-2...)
    FUSED_MARKERS = ("qkv_proj", "gate_up_proj", "query_key_value", "W_pack", "c_attn", "Wqkv")

    def check_text_tensors(self) -> None:
        assert self.ckpt is not None
        for name, t in self.ckpt.tensors.items():
            if any(f".{m}." in name for m in self.FUSED_MARKERS):
                raise GGQuantError(f"{t.file}: tensor '{name}' is a fused projection; {self.hf_arch} stores q/k/v "
                                   f"(and gate/up) separately and llama.cpp's {self.gguf_arch} graph reads them so; "
                                   f"this checkpoint belongs to another architecture than config.json says")
        super().check_text_tensors()

    def expected_layer_shapes(self, il: int) -> dict[str, tuple[tuple[int, ...], bool]]:
        exp = super().expected_layer_shapes(il)
        if self.hparams.get("attention_bias"):
            h, hd, p = self.hparams, self.head_dim, f"model.layers.{il}.self_attn."
            exp[p + "q_proj.bias"] = ((h["num_attention_heads"] * hd,), True)
            exp[p + "k_proj.bias"] = ((h["num_key_value_heads"] * hd,), True)
            exp[p + "v_proj.bias"] = ((h["num_key_value_heads"] * hd,), True)
            exp[p + "o_proj.bias"] = ((h["hidden_size"],), False)
        return exp

    # --- tensors ----------------------------------------------------------------------------
    def transform(self, hf_name: str, gguf_name: str, src: Tensor, part: str) -> Transform:
        if self.PERMUTE_QK and part == TEXT and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight",
                                                                  "k_proj.bias")):
            h = self.hparams
            n_head = h["num_attention_heads"]
            if ".k_proj." in hf_name and h["num_key_value_heads"] != n_head:
                n_head = h["num_key_value_heads"]
            rows = src.shape[0] if src.shape else 1
            if rows % n_head or (rows // n_head) % 2:
                raise GGQuantError(f"{src.file}: tensor '{src.name}' has {rows} rows, not {n_head} heads of an even "
                                   f"size; cannot permute it for RoPE")
            return PermuteHeads(rows // n_head)
        return SCALAR_TO_1D if not src.shape else IDENTITY

    def extra_tensors(self, part: str) -> list[tuple[str, np.ndarray]]:
        if part != TEXT or str(self.rope.get("rope_type", "")).lower() != "llama3":
            return []
        return [(ROPE_FREQS, llama3_rope_factors(self.rope, self.head_dim))]

    # --- metadata ---------------------------------------------------------------------------
    def text_metadata(self, kv: KV, file_type: int) -> None:
        """TextModel.set_gguf_parameters (base), then the family's own keys."""
        super().text_metadata(kv, file_type)

    # --- vocabulary --------------------------------------------------------------------------
    def vocab_kind(self) -> str:
        """Which tokenizer path llama.cpp's converter takes: spm, llama_hf or gpt2."""
        if (self.dir / "tokenizer.model").is_file():
            return "spm"
        if V.is_llama_hf_bpe(self.dir):
            return "llama_hf"
        return "gpt2"

    def read_tokens(self):
        kind = self.vocab_kind()
        if kind == "spm":
            return V.sentencepiece_tokens(self.dir, self.hparams.get("vocab_size"))
        if kind == "llama_hf":
            return V.hf_bpe_tokens(self.dir)
        if not (self.dir / "tokenizer.json").is_file():
            raise GGQuantError(f"{self.dir}: no tokenizer.model and no tokenizer.json; llama.cpp's converter needs one "
                               f"of them for the vocabulary")
        tokens, types, self._pre = V.gpt2_tokens(self.dir, self.hparams.get("vocab_size"))
        return tokens, [], types

    def write_vocab(self, kv: KV) -> None:
        tokens, scores, types = self.tokens()
        kind = self.vocab_kind()
        if kind == "gpt2":
            kv.string(Keys.Tokenizer.MODEL, "gpt2")
            kv.string(Keys.Tokenizer.PRE, self._pre)
            kv.array(Keys.Tokenizer.LIST, tokens)
            kv.array(Keys.Tokenizer.TOKEN_TYPE, types)
            sv = V.SpecialVocab(self.dir, load_merges=True)
            if not sv.merges:
                raise GGQuantError(f"{self.dir / 'tokenizer.json'}: no BPE merges found; llama.cpp cannot tokenize "
                                   f"a GPT-2 BPE vocabulary without tokenizer.ggml.merges")
            sv.write(kv)
        else:
            kv.string(Keys.Tokenizer.MODEL, "llama")
            kv.string(Keys.Tokenizer.PRE, "default")
            kv.array(Keys.Tokenizer.LIST, tokens)
            kv.array(Keys.Tokenizer.SCORES, scores)
            kv.array(Keys.Tokenizer.TOKEN_TYPE, types)
            V.SpecialVocab(self.dir, load_merges=False, n_vocab=len(tokens)).write(kv)

    def vocab(self, kv: KV) -> None:
        self.write_vocab(kv)

    def check_vocab_sizes(self) -> None:
        super().check_vocab_sizes()

    # --- GGUF -> HF -------------------------------------------------------------------------
    HF_CLASS = "LlamaForCausalLM"
    HF_MODEL_TYPE = "llama"

    @classmethod
    def hf_config(cls, g: GGUFFacts, mm) -> dict:
        if mm is not None:
            raise GGQuantError(f"{mm.path}: {g.arch} has no vision tower; --mmproj does not apply")
        hp = LlamaHparams.from_gguf(g)
        L, A = Keys.LLM, Keys.Attention
        emb = g.shapes.get("token_embd.weight")
        if emb is None:
            raise GGQuantError(f"{g.path}: tensor 'token_embd.weight' is missing; a {hp.arch} GGUF needs it")
        rope = {"rope_type": "default", "rope_theta": f32_value(hp.rope_base)}
        if hp.rope_scaling == "linear" and hp.rope_factor:
            rope = {"rope_type": "linear", "factor": f32_value(hp.rope_factor), "rope_theta": f32_value(hp.rope_base)}
        if ROPE_FREQS in g.shapes:
            rope = llama3_rope_from_factors(g.values(ROPE_FREQS), hp)
        cfg = dict(
            architectures=[cls.HF_CLASS], model_type=cls.HF_MODEL_TYPE,
            vocab_size=emb[0], hidden_size=hp.n_embd, intermediate_size=hp.single(hp.n_ff, L.FEED_FORWARD_LENGTH),
            num_hidden_layers=hp.n_layer, num_attention_heads=hp.single(hp.n_head, A.HEAD_COUNT),
            num_key_value_heads=hp.single(hp.n_head_kv, A.HEAD_COUNT_KV), head_dim=hp.head_dim,
            max_position_embeddings=hp.n_ctx_train, rms_norm_eps=f32_value(hp.eps), hidden_act="silu",
            rope_parameters=rope, tie_word_embeddings="output.weight" not in g.shapes,
        )
        cfg.update(cls.hf_extra_config(g, hp))
        cfg.update(hf_token_ids(g))
        return cfg

    @classmethod
    def hf_extra_config(cls, g: GGUFFacts, hp: LlamaHparams) -> dict:
        bias = any(n.endswith("attn_q.bias") for n in g.shapes)
        return dict(attention_bias=bias, mlp_bias=False)

    @classmethod
    def hf_named_tokens(cls) -> dict[str, str]:
        return {}


def llama3_rope_from_factors(factors: np.ndarray, hp: LlamaHparams) -> dict:
    """rope_parameters of rope_type llama3 whose generated rope_freqs equal `factors`.

    The factors are 1 (short wavelengths), `factor` (long) and a smooth ramp between; only the
    ratios of original_max_position_embeddings and the low/high frequency factors are fixed by them,
    so low_freq_factor is taken as 1 (Llama 3.1-3.3's value) and the usual values of the other two
    are tried until the recomputed table equals the stored one bit for bit."""
    dim = hp.head_dim
    factor = float(np.asarray(factors, np.float32).max())
    candidates = [dict(factor=factor, low_freq_factor=1.0, high_freq_factor=high, original_max_position_embeddings=old)
                  for old in (8192, 4096, 2048, 16384, 32768, 65536, 1024, 512, 256, 128, 64)
                  for high in (4.0, 2.0, 8.0, 16.0, 1.5, 3.0)]
    for c in candidates:
        rp = dict(c, rope_type="llama3", rope_theta=f32_value(hp.rope_base))
        if np.array_equal(llama3_rope_factors(rp, dim), np.asarray(factors, np.float32)):
            return rp
    raise GGQuantError(f"{hp.path}: rope_freqs.weight is not a llama3 frequency table ggquant can express as "
                       f"Hugging Face rope_parameters")


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(LlamaLike):
    model_arch = MODEL_ARCH.LLAMA
    PERMUTE_QK = True

    def text_hparams(self, config: dict) -> dict:
        if hf_arch_of(config) == "MistralForCausalLM":
            self.DEFAULT_MODEL_TYPE = "mistral"
        return super().text_hparams(config)

    def validate_hparams(self) -> None:
        super().validate_hparams()
        h = self.hparams
        if h.get("hf_arch_native_mistral") or (self.dir / "params.json").is_file() and not self.config_path.is_file():
            raise GGQuantError(f"{self.dir}: a Mistral native checkpoint (params.json); ggquant converts the Hugging "
                               f"Face layout (config.json + safetensors)")
        if (self.dir / "tekken.json").is_file() and not (self.dir / "tokenizer.json").is_file():
            raise GGQuantError(f"{self.dir / 'tekken.json'}: a Mistral tekken tokenizer without tokenizer.json; "
                               f"llama.cpp converts it through mistral-common, which ggquant does not")
        if h.get("vocab_size") == 32016:
            raise GGQuantError(f"{self.config_path}: vocab_size 32016 (CodeLlama infill tokens); not supported")
        sw = h.get("sliding_window")
        if self.hf_arch == "MistralForCausalLM" and isinstance(sw, int) and sw < h["max_position_embeddings"]:
            raise GGQuantError(f"{self.config_path}: sliding_window = {sw} (< max_position_embeddings "
                               f"{h['max_position_embeddings']}); llama.cpp's llama graph attends to every position, "
                               f"so the GGUF would not compute what this Mistral computes beyond {sw} tokens")
        if h.get("attention_bias") and not self.raw.get("attention_bias"):
            pass

    def text_metadata(self, kv: KV, file_type: int) -> None:
        """TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters (vocab_size, rope dims)."""
        super().text_metadata(kv, file_type)
        a = self.gguf_arch
        kv.u32(Keys.LLM.VOCAB_SIZE.format(arch=a), self.hparams["vocab_size"])
        kv.u32(Keys.Rope.DIMENSION_COUNT.format(arch=a), self.head_dim)

    def vocab(self, kv: KV) -> None:
        """LlamaModel.set_vocab."""
        tc = read_json(self.dir / "tokenizer_config.json", "", required=False)
        if isinstance(tc, dict):
            if tc.get("add_prefix_space") is not None:
                kv.bool(Keys.Tokenizer.ADD_PREFIX, bool(tc["add_prefix_space"]))
            if tc.get("tokenizer_class") == "HybridDNATokenizer":
                raise GGQuantError(f"{self.dir / 'tokenizer_config.json'}: HybridDNATokenizer is not supported")
        self.write_vocab(kv)
        if self.hparams.get("vocab_size") == 49152:  # "granite small models" (and SmolLM): no BOS
            kv.bool(Keys.Tokenizer.ADD_BOS, False)

    HF_CLASS = "LlamaForCausalLM"
    HF_MODEL_TYPE = "llama"


def hf_arch_of(config: dict) -> str | None:
    a = config.get("architectures")
    return a[0] if isinstance(a, list) and a and isinstance(a[0], str) else None


__all__ = ["CONFIG_DEFAULTS", "LLAMA_GLOBAL", "LLAMA_LAYER", "Llama", "LlamaHparams", "LlamaLike", "PermuteHeads",
           "ROPE_NEOX", "ROPE_NORM", "llama3_rope_factors"]
