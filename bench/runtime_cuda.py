"""Decode speed of ggquant's CUDA (torch) backend on a random-weight Gemma 4 with E4B's full config,
and the fraction of the HBM roofline it reaches (issue 4, "Speed"; anchor: research note
anchor-cuda-h100.md, llama.cpp CUDA F16 tg128 = 174 tok/s = 0.538 of roofline on the H100).

    python bench/runtime_cuda.py --weights bf16            # build (cached) + decode bench on CUDA
    python bench/runtime_cuda.py --weights bf16,q8_0,q4_k --imatrix --json out.json
                                                           # all three, + imatrix collection tok/s (issue 6)
    python bench/runtime_cuda.py --tiny --weights bf16,q8_0,q4_k   # same code path, tiny dims, torch on CPU

Needs numpy, numba (the builder's kernels and ggquant's runtime), torch, and the gguf package.

Steps:
1. Build the GGUF with ggquant's own streaming GGUFWriter: the metadata keys and tensor names
   `ggquant convert` writes for Gemma 4 (E4B: 42 layers, 5 sliding + 1 full, 18 KV-shared, hidden
   2560, FFN 10240, PLE 256, vocab 262144; research note gemma4-architecture-and-parity.md §1),
   an SPM vocabulary of 262144 dummy pieces (decode never tokenizes text), F32 norms with the
   damped gains of fixtures/gemma4.py so activations stay finite, and random 2-D weights:
     bf16  N(0, 1/fan_in)-like values (a sum of four uniforms) rounded to BF16;
     q8_0  the same values quantized with ggquant's bit-exact Q8_0 quantizer;
     q4_k  random Q4_K blocks written directly (random 4-bit quants and 6-bit scales/mins, one
           bounded fp16 d per tensor): ggquant's Q4_K quantizer runs at ~2 Melem/s/core, far too
           slow for 7.5 G elements in the time limit, and dequantize/matmul speed does not depend
           on the values. The output says so.
   Values come from a counter-based hash (splitmix64) in parallel numba kernels, chunk by chunk:
   peak memory is one chunk, never the model. The file is cached in --workdir.
2. Load with load_model(path, device="cuda"), warm up, time prompt (--prompt tokens, one batch)
   and greedy decode (--decode tokens, batch 1) through Session.eval, torch.cuda.synchronize()
   around every timing; median of --repeat runs.
3. Roofline: the weight bytes one decode step reads are counted by hooking the backend's
   matmul/matmuls/rows during a real decode step (every matrix it multiplies with, the tied
   output = the whole token_embd, one row of token_embd and of per_layer_token_embd). The
   roofline is those bytes / the measured device-to-device copy bandwidth (read + write bytes,
   as in the anchor note), so the fraction is comparable with llama.cpp's. Separately the
   traffic the backend really causes is estimated (it dequantizes whole matrices to float32
   before multiplying, or multiplies with a cached dense copy) and shown as achieved GB/s.
   Below 50 % of roofline, a torch-profiler summary of one decode step says where time goes.
4. --imatrix: tokens/s of ggquant's imatrix collection (Collector attached to the backend, as
   collect_imatrix does) over 2 chunks of 512 random tokens, beside the same chunks without it.

KV-cache reads are not counted (a few MB per token at these context lengths, < 1 % of weights).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numba as nb
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402
from gguf import LlamaFileType  # noqa: E402

FORMAT_VERSION = 1  # bump when the generated file changes, so cached files are rebuilt
CHUNK_ELEMS = 1 << 25  # elements generated per chunk (128 MiB of float32)

# fixtures/gemma4.py random-weight rules (note §7): damped gains keep a random net finite
GAIN_RANGE = (0.5, 1.5)
POST_NORM_DAMPING = 0.2
FINAL_NORM_SCALE = 2.0
LAYER_SCALAR_RANGE = (0.7, 1.3)
PROPORTIONAL_ROPE_OFF = 1e30  # rope_freqs factor that switches a pair off (proportional RoPE)


@dataclass(frozen=True)
class Config:
    name: str
    vocab: int
    hidden: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_swa: int
    head_dim_full: int
    ffn: int
    ple: int  # per-layer input width
    n_shared_kv: int
    window: int
    swa_per_full: int  # layer pattern: this many sliding layers, then one full
    rope_base: float
    rope_base_swa: float
    partial_rotary_full: float  # proportional RoPE on full layers
    softcap: float
    eps: float
    ctx_train: int
    # the large models: fewer KV heads on full layers, which use K as V (attention_k_eq_v: no
    # attn_v there), and a mixture of experts beside the dense MLP (26B-A4B)
    n_head_kv_full: int = 0  # 0: n_head_kv
    k_eq_v_full: bool = False
    n_expert: int = 0
    n_expert_used: int = 0
    ffn_exp: int = 0

    def is_swa(self, il: int) -> bool:
        return (il + 1) % (self.swa_per_full + 1) != 0

    def head_dim(self, il: int) -> int:
        return self.head_dim_swa if self.is_swa(il) else self.head_dim_full

    def head_kv(self, il: int) -> int:
        return self.n_head_kv if self.is_swa(il) or not self.n_head_kv_full else self.n_head_kv_full


# research note gemma4-architecture-and-parity.md §1 (E4B column)
E4B = Config("e4b", vocab=262144, hidden=2560, n_layer=42, n_head=8, n_head_kv=2, head_dim_swa=256,
             head_dim_full=512, ffn=10240, ple=256, n_shared_kv=18, window=512, swa_per_full=5,
             rope_base=1e6, rope_base_swa=1e4, partial_rotary_full=0.25, softcap=30.0, eps=1e-6,
             ctx_train=131072)
# google/gemma-4-31B and -26B-A4B dimensions as bench/convert.py's MOE_DIMS and the fixtures'
# variant notes give them (fixtures/ggquant_fixtures/gemma4.py): 5 sliding + 1 full layers
# repeated, no PLE, no KV sharing, K = V on full layers with fewer KV heads
G31B = Config("31b", vocab=262144, hidden=5376, n_layer=60, n_head=32, n_head_kv=16, head_dim_swa=256,
              head_dim_full=512, ffn=21504, ple=0, n_shared_kv=0, window=1024, swa_per_full=5,
              rope_base=1e6, rope_base_swa=1e4, partial_rotary_full=0.25, softcap=30.0, eps=1e-6,
              ctx_train=262144, n_head_kv_full=4, k_eq_v_full=True)
A4B = Config("a4b", vocab=262144, hidden=2816, n_layer=30, n_head=16, n_head_kv=8, head_dim_swa=256,
             head_dim_full=512, ffn=2112, ple=0, n_shared_kv=0, window=1024, swa_per_full=5,
             rope_base=1e6, rope_base_swa=1e4, partial_rotary_full=0.25, softcap=30.0, eps=1e-6,
             ctx_train=262144, n_head_kv_full=2, k_eq_v_full=True, n_expert=128, n_expert_used=8, ffn_exp=704)
# same structure (pattern, sharing rule, two head dims, PLE, proportional RoPE), tiny dims
# (row lengths are multiples of 256, the Q4_K block)
TINY = Config("tiny", vocab=4096, hidden=256, n_layer=12, n_head=8, n_head_kv=2, head_dim_swa=32,
              head_dim_full=64, ffn=512, ple=256, n_shared_kv=6, window=16, swa_per_full=5,
              rope_base=1e6, rope_base_swa=1e4, partial_rotary_full=0.25, softcap=30.0, eps=1e-6,
              ctx_train=4096)

CONFIGS = {"e4b": E4B, "31b": G31B, "a4b": A4B}
_TINY_LARGE = dict(vocab=4096, hidden=256, n_layer=6, n_head=8, n_head_kv=4, n_head_kv_full=2, head_dim_swa=32,
                   head_dim_full=64, ffn=512, window=16, ctx_train=4096)
TINY_CONFIGS = {"e4b": TINY, "31b": replace(G31B, name="tiny-31b", **_TINY_LARGE),
                "a4b": replace(A4B, name="tiny-a4b", **{**_TINY_LARGE, "ffn": 320}, n_expert=8, n_expert_used=2,
                               ffn_exp=192)}  # widths the Q4_K block can't hold, as the real model's

WEIGHTS = {"bf16": (T.BF16, LlamaFileType.MOSTLY_BF16), "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
           "q4_k": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M)}


# --- random values (parallel numba, counter-based so any chunking gives the same file) ---------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_SQRT3 = math.sqrt(3.0)


@nb.njit(cache=True, inline="always")
def _mix64(z):
    # splitmix64 finalizer: a well-mixed 64-bit hash of the counter
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@nb.njit(parallel=True, cache=True)
def _fill_normal(out, seed, start, std):
    """out[i] ~ approximately N(0, std^2): Irwin-Hall sum of four 16-bit uniforms of hash(seed, start + i)."""
    s0 = np.uint64(seed) * _GOLDEN
    k = np.float64(std) * _SQRT3 / 65536.0
    for i in nb.prange(out.size):
        h = _mix64(s0 + np.uint64(start + i) * _GOLDEN)
        a = np.float64(h & np.uint64(0xFFFF)) + np.float64((h >> np.uint64(16)) & np.uint64(0xFFFF)) \
            + np.float64((h >> np.uint64(32)) & np.uint64(0xFFFF)) + np.float64(h >> np.uint64(48))
        out[i] = np.float32((a - 131070.0) * k)  # mean 4 * 65535 / 2, variance 4 * 65536^2 / 12


@nb.njit(parallel=True, cache=True)
def _f32_bits_to_bf16(bits, out):
    # float32 -> bf16, round to nearest even (ggml_compute_fp32_to_bf16; values here are finite)
    for i in nb.prange(bits.size):
        b = bits[i]
        out[i] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


Q4K_BLOCK, Q4K_BYTES = 256, 144
Q4K_SC_LO = 8  # sub-block scales uniform in 8..15, mins ~ 3.75 * scale (with dmin = 2 d) so a
Q4K_DMIN_PER_D = 2.0  # sub-block's values d * sc * (q - m * 2 / sc) ~ d * sc * (q - 7.5) have mean ~0
Q4K_RMS_SC = math.sqrt(11.5 ** 2 + (8 * 8 - 1) / 12)  # rms of uniform 8..15
Q4K_RMS_Q = math.sqrt((16 * 16 - 1) / 12)  # rms of q - 7.5, q uniform 0..15


@nb.njit(parallel=True, cache=True)
def _fill_q4_k(out, seed, start, d_bits, dmin_bits):
    """out uint8 [n_blocks, 144]: random block_q4_K (ggml-common.h: d, dmin fp16 | scales[12] | qs[128])."""
    s0 = np.uint64(seed) * _GOLDEN
    sc = np.empty((out.shape[0], 8), np.int64)
    mn = np.empty((out.shape[0], 8), np.int64)
    for b in nb.prange(out.shape[0]):
        blk = out[b]
        blk[0] = d_bits & 0xFF
        blk[1] = d_bits >> 8
        blk[2] = dmin_bits & 0xFF
        blk[3] = dmin_bits >> 8
        c = (s0 + np.uint64(start + b) * np.uint64(17)) * _GOLDEN
        h = _mix64(c)
        for j in range(8):
            sc[b, j] = Q4K_SC_LO + np.int64((h >> np.uint64(3 * j)) & np.uint64(7))
            mn[b, j] = (sc[b, j] * 15 + 2) // 4  # round(3.75 sc): 30..56, fits 6 bits
        # inverse of get_scale_min_k4 (ggml-quants.c): 6-bit scales/mins of sub-blocks 0..7
        for j in range(4):
            blk[4 + j] = sc[b, j] | ((sc[b, j + 4] >> 4) << 6)
            blk[8 + j] = mn[b, j] | ((mn[b, j + 4] >> 4) << 6)
            blk[12 + j] = (sc[b, j + 4] & 0xF) | ((mn[b, j + 4] & 0xF) << 4)
        for w in range(16):  # 128 bytes of 4-bit quants, 8 bytes per hash
            h = _mix64(c + np.uint64(w + 1))
            for t in range(8):
                blk[16 + 8 * w + t] = np.uint8((h >> np.uint64(8 * t)) & np.uint64(0xFF))


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def matrix_producer(name: str, shape: tuple[int, int], qtype, std: float):
    """produce() for the writer: the tensor's bytes in row chunks of about CHUNK_ELEMS elements."""
    from ggquant.quant import types as qt

    rows, cols = shape
    step = max(1, CHUNK_ELEMS // cols)
    seed = _seed(name)

    def produce():
        buf = np.empty(step * cols, np.float32)
        for r0 in range(0, rows, step):
            n = min(step, rows - r0) * cols
            if qtype == T.Q4_K:
                nblk = n // Q4K_BLOCK
                d = np.float16(std / (Q4K_RMS_SC * Q4K_RMS_Q))
                dmin = np.float16(float(d) * Q4K_DMIN_PER_D)
                out = np.empty((nblk, Q4K_BYTES), np.uint8)
                _fill_q4_k(out, seed, r0 * cols // Q4K_BLOCK, int(d.view(np.uint16)), int(dmin.view(np.uint16)))
                yield out
                continue
            x = buf[:n]
            _fill_normal(x, seed, r0 * cols, std)
            if qtype == T.F32:
                yield x
            elif qtype == T.BF16:
                out = np.empty(n, np.uint16)
                _f32_bits_to_bf16(x.view(np.uint32), out)
                yield out
            else:
                yield qt.get(qtype).quantize(x.reshape(-1, cols), what=name)

    return produce


def vector_producer(values: np.ndarray):
    v = np.ascontiguousarray(values, dtype=np.float32)
    return lambda: [v]


# --- the GGUF ----------------------------------------------------------------------------------
def add_metadata(w, cfg: Config, ftype) -> None:
    """The keys `ggquant convert` writes for Gemma 4 (same names, types, order), E4B's values."""
    a = "gemma4"
    kv = [
        ("general.architecture", a, V.STRING),
        ("general.type", "model", V.STRING),
        ("general.name", f"ggquant bench random Gemma4 {cfg.name.upper()}", V.STRING),
        (f"{a}.block_count", cfg.n_layer, V.UINT32),
        (f"{a}.context_length", cfg.ctx_train, V.UINT32),
        (f"{a}.embedding_length", cfg.hidden, V.UINT32),
        (f"{a}.feed_forward_length", cfg.ffn, V.UINT32),
        (f"{a}.attention.head_count", cfg.n_head, V.UINT32),
    ]
    if cfg.n_head_kv_full:
        kv.append((f"{a}.attention.head_count_kv", [cfg.head_kv(il) for il in range(cfg.n_layer)], V.ARRAY, V.UINT32))
    else:
        kv.append((f"{a}.attention.head_count_kv", cfg.n_head_kv, V.UINT32))
    kv += [
        (f"{a}.rope.freq_base", cfg.rope_base, V.FLOAT32),
        (f"{a}.rope.freq_base_swa", cfg.rope_base_swa, V.FLOAT32),
        (f"{a}.attention.layer_norm_rms_epsilon", cfg.eps, V.FLOAT32),
    ]
    if cfg.n_expert:
        kv += [(f"{a}.expert_count", cfg.n_expert, V.UINT32), (f"{a}.expert_used_count", cfg.n_expert_used, V.UINT32),
               (f"{a}.expert_feed_forward_length", cfg.ffn_exp, V.UINT32)]
    kv += [
        (f"{a}.attention.key_length", cfg.head_dim_full, V.UINT32),
        (f"{a}.attention.value_length", cfg.head_dim_full, V.UINT32),
        ("general.file_type", int(ftype), V.UINT32),
        (f"{a}.final_logit_softcapping", cfg.softcap, V.FLOAT32),
        (f"{a}.attention.sliding_window", cfg.window, V.UINT32),
        (f"{a}.attention.shared_kv_layers", cfg.n_shared_kv, V.UINT32),
        (f"{a}.embedding_length_per_layer_input", cfg.ple, V.UINT32),
    ]
    for k, v, *t in kv:
        w.add_field(k, v, *t)
    w.add_field(f"{a}.attention.sliding_window_pattern", [cfg.is_swa(il) for il in range(cfg.n_layer)],
                V.ARRAY, V.BOOL)
    for k, v in [(f"{a}.attention.key_length_swa", cfg.head_dim_swa), (f"{a}.attention.value_length_swa", cfg.head_dim_swa),
                 (f"{a}.rope.dimension_count", cfg.head_dim_full), (f"{a}.rope.dimension_count_swa", cfg.head_dim_swa),
                 ("general.quantization_version", 2)]:
        w.add_field(k, v, V.UINT32)
    # SentencePiece-style vocabulary as in the anchor's file: 5 specials, 256 byte pieces, dummies
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tokens = specials + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(cfg.vocab - len(tokens))]
    types = np.full(cfg.vocab, 1, np.int32)  # NORMAL
    types[:len(specials)] = 3  # CONTROL
    types[3] = 2  # UNKNOWN
    types[len(specials):len(specials) + 256] = 6  # BYTE
    w.add_field("tokenizer.ggml.model", "llama", V.STRING)
    w.add_field("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING)
    w.add_field("tokenizer.ggml.scores", -np.arange(cfg.vocab, dtype=np.float32), V.ARRAY, V.FLOAT32)
    w.add_field("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)
    for k, v in [("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0)]:
        w.add_field(f"tokenizer.ggml.{k}_token_id", v, V.UINT32)
    w.add_field("tokenizer.ggml.add_bos_token", True, V.BOOL)
    w.add_field("tokenizer.ggml.add_eos_token", False, V.BOOL)


def add_tensors(w, cfg: Config, qtype) -> None:
    from ggquant.quant import types as qtypes

    H, P, L = cfg.hidden, cfg.ple, cfg.n_layer
    rng = np.random.default_rng(0)
    gains = lambda n, k=1.0: rng.uniform(*GAIN_RANGE, n) * k  # noqa: E731

    def mat(name, rows, cols, std=None, n=0, qt=None):  # n > 0: n stacked matrices (experts)
        t = qtype if qt is None else qt  # (T.F32 is 0: not `qt or qtype`)
        if cols % GGML_QUANT_SIZES[t][0]:  # rows the block can't hold: llama.cpp's fallback type
            t = qtypes.get(t).row_fallback  # (26B-A4B: FFN 2112, experts 704 are not multiples of 256)
        shape = (n, rows, cols) if n else (rows, cols)
        w.add_tensor(name, shape, t, matrix_producer(name, (max(n, 1) * rows, cols), t, std or cols ** -0.5))

    def vec(name, values):
        w.add_tensor(name, (len(values),), T.F32, vector_producer(values))

    n_rot = int(cfg.head_dim_full * cfg.partial_rotary_full) // 2  # pairs rotated on full layers
    vec("rope_freqs.weight", [1.0] * n_rot + [PROPORTIONAL_ROPE_OFF] * (cfg.head_dim_full // 2 - n_rot))
    mat("token_embd.weight", cfg.vocab, H, H ** -0.5)
    if P:
        mat("per_layer_token_embd.weight", cfg.vocab, L * P, P ** -0.5)
    n_kv = L - cfg.n_shared_kv
    E, Fe = cfg.n_expert, cfg.ffn_exp
    for il in range(L):
        p, d, hkv = f"blk.{il}.", cfg.head_dim(il), cfg.head_kv(il)
        vec(p + "attn_norm.weight", gains(H))
        vec(p + "layer_output_scale.weight", rng.uniform(*LAYER_SCALAR_RANGE, 1))
        mat(p + "ffn_down.weight", H, cfg.ffn)
        mat(p + "ffn_gate.weight", cfg.ffn, H)
        mat(p + "ffn_up.weight", cfg.ffn, H)
        if P:
            mat(p + "inp_gate.weight", P, H)
            mat(p + "proj.weight", H, P)
        for n in ("post_attention_norm", "post_ffw_norm") + (("post_norm",) if P else ()):
            vec(p + n + ".weight", gains(H, POST_NORM_DAMPING))
        vec(p + "ffn_norm.weight", gains(H))
        if E:  # the router stays F32 as the converter writes it (ffn_gate_inp), experts in `qtype`
            mat(p + "ffn_gate_inp.weight", E, H, qt=T.F32)
            vec(p + "ffn_gate_inp.scale", gains(H))
            mat(p + "ffn_gate_up_exps.weight", 2 * Fe, H, n=E)
            mat(p + "ffn_down_exps.weight", H, Fe, n=E)
            vec(p + "ffn_down_exps.scale", gains(E))
            vec(p + "pre_ffw_norm_2.weight", gains(H))
            for n in ("post_ffw_norm_1", "post_ffw_norm_2"):
                vec(p + n + ".weight", gains(H, POST_NORM_DAMPING))
        if il < n_kv:
            vec(p + "attn_k_norm.weight", gains(d, d ** -0.25))
            mat(p + "attn_k.weight", hkv * d, H)
        mat(p + "attn_output.weight", H, cfg.n_head * d)
        vec(p + "attn_q_norm.weight", gains(d, d ** -0.25))
        mat(p + "attn_q.weight", cfg.n_head * d, H)
        if il < n_kv and not (cfg.k_eq_v_full and not cfg.is_swa(il)):
            mat(p + "attn_v.weight", hkv * d, H)
    vec("output_norm.weight", gains(H, FINAL_NORM_SCALE))
    if P:
        mat("per_layer_model_proj.weight", L * P, H)
        vec("per_layer_proj_norm.weight", gains(P))


def build(cfg: Config, weights: str, workdir: Path, rebuild: bool, log) -> tuple[Path, float | None]:
    """The cached GGUF, built if missing; returns (path, build seconds or None when reused)."""
    from ggquant.formats.gguf import GGUFWriter

    qtype, ftype = WEIGHTS[weights]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"gemma4-{cfg.name}-{weights}-v{FORMAT_VERSION}.gguf"
    if path.exists() and not rebuild:
        log(f"reusing {path} ({path.stat().st_size / 1e9:.2f} GB)")
        return path, None
    w = GGUFWriter(path, force=True)
    add_metadata(w, cfg, ftype)
    add_tensors(w, cfg, qtype)
    total = w.total_bytes
    log(f"building {path} ({total / 1e9:.2f} GB of tensors, {nb.get_num_threads()} numba threads)")
    t0 = time.perf_counter()
    done = [0, t0]

    def progress(_name, n):
        done[0] += n
        now = time.perf_counter()
        if now - done[1] > 10:
            done[1] = now
            log(f"  {done[0] / total:6.1%}  {done[0] / 1e9:.2f} GB  {now - t0:.0f} s")

    w.write(progress)
    dt = time.perf_counter() - t0
    log(f"built in {dt:.1f} s ({total / dt / 1e9:.2f} GB/s)")
    return path, dt


def check_q4_k_blocks() -> None:
    """The random Q4_K blocks dequantize (ggquant's bit-exact dequantizer) to mean ~0, std ~ target."""
    from ggquant.quant import types as qt

    std = 2560 ** -0.5
    rows, cols = 64, 2560
    raw = b"".join(bytes(c) for c in matrix_producer("check", (rows, cols), T.Q4_K, std)())
    x = qt.dequantize(np.frombuffer(raw, np.uint8).reshape(rows, -1), T.Q4_K, (rows, cols))
    if not (np.isfinite(x).all() and abs(x.mean()) < 0.05 * std and abs(x.std() / std - 1) < 0.1):
        raise RuntimeError(f"random Q4_K blocks are off: mean {x.mean():.3g}, std {x.std():.3g} (target {std:.3g})")


# --- measuring ---------------------------------------------------------------------------------
def copy_bandwidth(torch, device, gib: float = 2.0, repeat: int = 20) -> float:
    """Device-to-device copy GB/s, read + write bytes counted (anchor note: 3011.8 GB/s on the H100)."""
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(3 + repeat):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            torch.cuda.synchronize()
            dt = e0.elapsed_time(e1) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    del src, dst
    return 2 * n * 2 / statistics.median(times) / 1e9


class TrafficMeter:
    """Hooks a backend's matmul/matmuls/rows and counts the weight bytes each call reads."""

    def __init__(self, backend):
        self.be = backend
        self.on = False
        self.file_bytes = 0  # GGUF-encoded bytes of the weights read (the roofline's numerator)
        self.traffic = 0  # estimated device traffic the backend causes for them
        self.calls = []
        mm, mms, rows = backend.matmul, backend.matmuls, backend.rows
        self._depth = 0  # a backend's matmuls may call its (hooked) matmul: count each weight once

        def matmul(x, w):
            self._depth += 1
            try:
                y = mm(x, w)
            finally:
                self._depth -= 1
            if self._depth == 0:
                self._count(w, None, _one_row(x))
            return y

        def matmuls(x, ws):
            self._depth += 1
            try:
                ys = mms(x, ws)
            finally:
                self._depth -= 1
            if self._depth == 0:
                for w in ws:
                    self._count(w, None, _one_row(x))
            return ys

        def rows_(w, ids):
            y = rows(w, ids)
            self._count(w, len(np.asarray(ids).reshape(-1)))
            return y

        backend.matmul, backend.matmuls, backend.rows = matmul, matmuls, rows_
        if hasattr(backend, "mul_mat_id"):
            mmid = backend.mul_mat_id

            def mul_mat_id(x, w, ids):  # the experts the tokens were routed to (a host sync: metering only)
                y = mmid(x, w, ids)
                self._count(w, None, experts=len(np.unique(backend.to_numpy(ids))))
                return y

            backend.mul_mat_id = mul_mat_id

    def remove(self):
        """Back to the class's methods (a hooked backend decodes eagerly, without its CUDA graph)."""
        for m in ("matmul", "matmuls", "rows", "mul_mat_id"):
            self.be.__dict__.pop(m, None)

    def _count(self, w, n_rows, one_row=False, experts=None):
        if not self.on:
            return
        n_el = math.prod(w.shape)
        block, size = GGML_QUANT_SIZES[w.qtype]
        raw_bytes = n_el // block * size  # the GGUF's bytes (w.raw is None once repacked)
        dense = getattr(w, "_dense", None)
        if experts is not None:  # stacked experts [E, N, K]: the selected ones
            fb = raw_bytes // w.shape[0] * experts
            self.file_bytes += fb
            if getattr(w, "kind", None) is not None:  # Triton matvec / grouped product: the repacked blocks once
                self.traffic += sum(int(p.numel() * p.element_size()) for p in w.parts) // w.shape[0] * experts
                how = f"experts ({w.kind} blocks)"
            else:  # gathered and dequantized to float32
                self.traffic += fb + 8 * n_el // w.shape[0] * experts
                how = "experts (dequant->f32)"
            self.calls.append((w.name, how, fb))
            return
        if n_rows is not None:  # a gather: n_rows rows of the raw blocks, dequantized to float32
            fb = raw_bytes // w.shape[0] * n_rows
            self.file_bytes += fb
            self.traffic += fb + 4 * n_rows * w.shape[-1]
            self.calls.append((w.name, "rows", fb))
            return
        self.file_bytes += raw_bytes
        if one_row and getattr(w, "kind", None) is not None:  # Triton matvec: reads the (repacked) blocks once
            self.traffic += sum(int(p.numel() * p.element_size()) for p in w.parts)
            how = f"blocks ({w.kind} matvec)"
        elif dense is not None:  # multiplies with a cached dense copy
            self.traffic += int(dense.numel() * dense.element_size())
            how = f"dense {str(dense.dtype).replace('torch.', '')}"
        elif w.qtype == T.F32:
            self.traffic += raw_bytes
            how = "f32"
        else:  # dequantized to float32 (write), then read by the matmul: at least raw + 8 B/element
            self.traffic += raw_bytes + 8 * n_el
            how = "dequant->f32 per call"
        self.calls.append((w.name, how, raw_bytes))


def _one_row(x) -> bool:
    return math.prod(x.shape[:-1]) == 1


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(path: Path, device: str):
    from ggquant.runtime.model import ARCHITECTURES, load_model

    if device == "cuda":
        return load_model(path, device="cuda")  # prefill: PREFILL_MODE (set per run by bench_one)
    # torch backend on CPU tensors (how CI checks it), built like tests/runtime/test_cuda.py
    from ggquant.formats.gguf import GGUFReader
    from ggquant.runtime.cuda import CUDABackend

    r = GGUFReader(path)
    return ARCHITECTURES[r.get("general.architecture")](r, CUDABackend(device="cpu"))


def decode_bench(model, torch, device, n_prompt, n_decode, repeat, seed=0):
    """(prompt tok/s list, decode tok/s list, last token) with greedy decoding at batch 1."""
    from ggquant.runtime.model import Session

    rng = np.random.default_rng(seed)
    ids = [2] + [int(t) for t in rng.integers(261, model.n_vocab, n_prompt - 1)]
    sess = Session(model, n_ctx=n_prompt + n_decode + 8, n_batch=512)
    pp, tg = [], []
    for r in range(repeat + WARMUP):  # warm-ups: cuBLAS handles, allocator, numba, graph captures
        sess.reset()
        sync(torch, device)
        t0 = time.perf_counter()
        tok = int(np.argmax(sess.eval(ids, "last")[-1]))
        sync(torch, device)
        t1 = time.perf_counter()
        for _ in range(n_decode if r >= WARMUP else 4):
            logits = sess.eval([tok], "last")[-1]
            tok = int(np.argmax(logits))
        sync(torch, device)
        t2 = time.perf_counter()
        if r >= WARMUP:
            pp.append(n_prompt / (t1 - t0))
            tg.append(n_decode / (t2 - t1))
    if not np.isfinite(logits).all():
        raise RuntimeError("decode produced non-finite logits: the random weights are not sane")
    return pp, tg, sess


# untimed runs before each timing: the first prefill of a shape runs eagerly, the second captures
# its CUDA graph (CUDABackend.graph_step), later ones replay it, as llama-bench's warm-up run
WARMUP = 2


def prompt_bench(model, torch, device, n_prompt, repeat, seed=0, graphs=True):
    """prompt tok/s list: one batch of n_prompt random ids from an empty cache, logits of the last
    token only (as llama-bench's pp does), after WARMUP runs; graphs=False: every run eager (a
    prompt shape seen for the first time)."""
    from ggquant.runtime.model import Session

    rng = np.random.default_rng(seed)
    ids = [2] + [int(t) for t in rng.integers(261, model.n_vocab, n_prompt - 1)]
    sess = Session(model, n_ctx=n_prompt + 8, n_batch=n_prompt)
    be = model.backend
    had = getattr(be, "graphs", False)
    if hasattr(be, "graphs"):
        be.graphs = had and graphs
    out = []
    try:
        for r in range(repeat + WARMUP):
            sess.reset()
            sync(torch, device)
            t0 = time.perf_counter()
            logits = sess.eval(ids, "last")
            sync(torch, device)
            if r >= WARMUP:
                out.append(n_prompt / (time.perf_counter() - t0))
    finally:
        if hasattr(be, "graphs"):
            be.graphs = had
    if not np.isfinite(logits).all():
        raise RuntimeError("prefill produced non-finite logits")
    return out


def _weights_of(model):
    """Every TorchWeight the model holds (its attributes and its layers' attributes)."""
    from ggquant.runtime.cuda import TorchWeight

    seen = []
    for obj in [model] + list(getattr(model, "layers", [])):
        for v in vars(obj).values():
            if isinstance(v, TorchWeight):
                seen.append(v)
    return seen


def llama_bench(binary: str, path: Path, n_prompt: int, n_decode: int, repeat: int, log) -> dict:
    """llama.cpp's llama-bench on the same GGUF (-fa 1, all layers on the GPU): pp and tg tok/s."""
    import subprocess

    cmd = [binary, "-m", str(path), "-ngl", "99", "-fa", "1", "-p", str(n_prompt), "-n", str(n_decode),
           "-r", str(repeat), "-o", "json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = {"cmd": " ".join(cmd), "rc": p.returncode, "wall_s": time.perf_counter() - t0}
    if p.returncode != 0:
        out["stderr_tail"] = p.stderr[-2000:]
        log(f"  llama-bench failed ({p.returncode}): {p.stderr[-500:]}")
        return out
    for r in json.loads(p.stdout):
        key = "pp" if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 else "tg"
        out[key + "_tok_s"] = r.get("avg_ts")
        out[key + "_samples"] = r.get("samples_ts")
    log(f"  llama.cpp llama-bench -fa 1: pp{n_prompt} {out.get('pp_tok_s', float('nan')):.1f} tok/s, "
        f"tg{n_decode} {out.get('tg_tok_s', float('nan')):.2f} tok/s")
    return out


def imatrix_vs_llama(binary: str, path: Path, workdir: Path, chunks: int, ctx: int, log) -> dict:
    """llama-imatrix and ggquant's collect_imatrix (device cuda) on the same GGUF and text, chunks of
    ctx tokens: tokens/s of each and the agreement of the statistics (sum x^2 / count per column)."""
    import re
    import subprocess

    from ggquant.imatrix.collect import collect_imatrix
    from ggquant.imatrix.files import load as load_imatrix

    rng = np.random.default_rng(5)
    text = workdir / "imatrix-text.txt"
    text.write_text(" ".join(f"t{i}" for i in rng.integers(0, 200000, chunks * ctx + 200)) + "\n")
    out_file = workdir / f"{path.stem}-llama-imatrix.gguf"
    cmd = [binary, "-m", str(path), "-f", str(text), "-o", str(out_file), "--chunks", str(chunks), "-c", str(ctx),
           "-ngl", "99", "--no-ppl"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    res: dict = {"cmd": " ".join(cmd), "rc": p.returncode, "llama_wall_s": time.perf_counter() - t0}
    log_text = p.stdout + p.stderr
    res["llama_log_tail"] = log_text[-3000:]
    m = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log_text)
    if m:
        res["llama_tok_s"] = int(m.group(2)) / (float(m.group(1)) / 1e3)
    m = re.search(r"([\d.]+) seconds per pass", log_text)
    if m:
        res["llama_first_pass_s"] = float(m.group(1))
    im, stats = collect_imatrix(path, text, ctx=ctx, chunks=chunks, device="cuda", progress=False)
    res["ggquant_tok_s"] = stats["tokens_per_s"]
    res["ggquant_chunks"] = stats["chunks"]
    if p.returncode == 0 and out_file.exists():
        ref = load_imatrix(out_file)
        rel = []
        for name, e in im.entries.items():
            r = ref.entries.get(name)
            if r is None:
                continue
            a = e.sums.reshape(-1) / max(1, int(e.counts.reshape(-1)[0]))
            b = r.sums.reshape(-1) / max(1, int(r.counts.reshape(-1)[0]))
            rel.append(float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30))))
        res.update(entries_compared=len(rel), entries_ggquant=len(im.entries), entries_llama=len(ref.entries),
                   max_rel_diff=max(rel) if rel else None, median_rel_diff=float(np.median(rel)) if rel else None)
    log(f"  imatrix vs llama-imatrix ({chunks} chunks of {ctx}): ggquant {res['ggquant_tok_s']:.1f} tok/s, llama.cpp "
        f"{res.get('llama_tok_s', float('nan')):.1f} tok/s; statistics max rel diff {res.get('max_rel_diff')}, "
        f"median {res.get('median_rel_diff')} over {res.get('entries_compared')} weights (rc {p.returncode})")
    return res


def profile_step(sess, torch, device, rows: int = 15, ids=None) -> dict:
    """torch profiler over one decode step (or, with ids, one prefill of those ids from an empty
    cache): top ops by device (and CPU) self time, launch counts. Device busy time much below the
    wall time means the step is bound by the host (Python, op dispatch, kernel launches,
    synchronizations), not by the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if ids is None:
        ids = [6]
        sess.eval([5], "last")  # the step before is the same kind of step
    else:
        sess.reset()
        sess.eval(ids, "last")  # the same prefill once before, unprofiled
        sess.reset()
    sync(torch, device)
    be = sess.model.backend
    saved = {m: getattr(be, m) for m in BACKEND_OPS if hasattr(be, m)}
    for m, f in saved.items():  # label each backend call, so the host time splits by model operation
        setattr(be, m, _labelled(torch, f"backend.{m}", f))
    try:
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            sess.eval(ids, "last")
            sync(torch, device)
            wall = time.perf_counter() - t0
    finally:
        for m, f in saved.items():
            setattr(be, m, f)
    ka = prof.key_averages()
    by_op = {e.key[len("backend."):]: (e.count, e.cpu_time_total / 1e3) for e in ka
             if e.key.startswith("backend.") and e.device_type == DeviceType.CPU}
    dev = [e for e in ka if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    tables = []
    if cuda:
        tables.append(("device", ka.table(sort_by="self_device_time_total", row_limit=rows)))
    tables.append(("cpu", ka.table(sort_by="self_cpu_time_total", row_limit=10 if cuda else rows)))
    return {"wall_ms": wall * 1e3,
            "device_busy_ms": sum(e.self_device_time_total for e in dev) / 1e3,
            "kernels": sum(e.count for e in dev),
            "aten_ops": sum(e.count for e in ka if e.key.startswith("aten::")),
            "kernel_launches": sum(e.count for e in ka if "LaunchKernel" in e.key),
            "syncs": sum(e.count for e in ka if "Synchronize" in e.key),
            "memcpy_calls": sum(e.count for e in ka if e.key.startswith(("cudaMemcpy", "cuMemcpy"))),
            "backend_ops": by_op, "tables": tables}


BACKEND_OPS = ("matmul", "matmuls", "rows", "rms_norm", "gelu", "geglu", "rope", "attention", "softcap")


def _labelled(torch, label, f):
    def g(*a, **k):
        with torch.profiler.record_function(label):
            return f(*a, **k)
    return g


def imatrix_bench(model, torch, device, ctx=512, chunks=2):
    """imatrix collection tokens/s (Collector hooked into the backend, as collect_imatrix does)."""
    from ggquant.imatrix.collect import Collector
    from ggquant.runtime.model import Session

    rng = np.random.default_rng(1)
    data = rng.integers(261, model.n_vocab, (chunks + 1, ctx))
    data[:, 0] = 2  # BOS first, as compute_imatrix does
    sess = Session(model, n_ctx=ctx, n_batch=ctx)

    def run(rows):
        sync(torch, device)
        t0 = time.perf_counter()
        for c in rows:
            sess.reset()
            sess.eval(data[c], logits="none")
        sync(torch, device)
        return len(rows) * ctx / (time.perf_counter() - t0)

    run([chunks])  # warm-up chunk
    plain = run(range(chunks))
    be = model.backend
    saved = be.matmul, be.matmuls
    col = Collector(ctx)
    col.attach(be)
    collected = run(range(chunks))
    be.matmul, be.matmuls = saved
    bad = [n for n, s in col.sums.items() if not np.isfinite(s).all()]
    if bad:
        raise RuntimeError(f"imatrix statistics not finite for {bad[:3]}")
    return {"ctx": ctx, "chunks": chunks, "entries": len(col.sums), "collect_tok_s": collected,
            "plain_prompt_tok_s": plain}


def bench_one(cfg, weights, path, build_s, args, torch, device, device_name, bw, log) -> dict:
    """Load one GGUF, time prompt/decode, count bytes, profile (below target), imatrix; print and return."""
    res: dict = {"weights": weights, "gguf": str(path), "gguf_bytes": path.stat().st_size, "build_s": build_s}
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load(path, device_name)
    sync(torch, device)
    res["load_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        res["gpu_mem_after_load_gib"] = torch.cuda.memory_allocated() / 2 ** 30
    log(f"{weights}: loaded in {res['load_s']:.1f} s" + (f", {res['gpu_mem_after_load_gib']:.1f} GiB on the GPU"
                                                         if device.type == "cuda" else ""))

    pp, tg, sess = decode_bench(model, torch, device, args.prompt, args.decode, args.repeat)
    be = model.backend
    res["prefill_mode"] = getattr(be, "prefill", None)
    res["prefill_modes"] = {}
    for mode in args.prefill_modes:  # prompt tok/s of each way of computing the batched products
        if not hasattr(be, "prefill"):
            break
        old_mode, old_cache = be.prefill, be.half_cache
        be.prefill, be.half_cache = mode.split("+")[0], mode.endswith("+cache")
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ppm = prompt_bench(model, torch, device, args.prompt, args.repeat)
            eager = prompt_bench(model, torch, device, args.prompt, args.repeat, graphs=False)
            res["prefill_modes"][mode] = {"prompt_tok_s": statistics.median(ppm), "runs": ppm,
                                          "eager_tok_s": statistics.median(eager), "eager_runs": eager}
            if device.type == "cuda":
                res["prefill_modes"][mode]["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            log(f"  prefill {mode:13}: {statistics.median(ppm):9.1f} tok/s (runs: {', '.join(f'{t:.0f}' for t in ppm)}), "
                f"eager {statistics.median(eager):.1f} tok/s"
                + (f", peak {res['prefill_modes'][mode]['gpu_mem_peak_gib']:.1f} GiB" if device.type == "cuda" else ""))
            if args.profile_prefill:  # where a prefill's time goes in this mode
                rng = np.random.default_rng(0)
                ids = [2] + [int(t) for t in rng.integers(261, model.n_vocab, args.prompt - 1)]
                from ggquant.runtime.model import Session

                psess = Session(model, n_ctx=args.prompt + 8, n_batch=args.prompt)
                pp_prof = profile_step(psess, torch, device, rows=25, ids=ids)
                res["prefill_modes"][mode]["profile"] = {k: v for k, v in pp_prof.items() if k != "tables"}
                log(f"  prefill {mode} under the profiler: wall {pp_prof['wall_ms']:.1f} ms, device busy "
                    f"{pp_prof['device_busy_ms']:.1f} ms, {pp_prof['kernel_launches']} launches, "
                    f"{pp_prof['syncs']} syncs, {pp_prof['memcpy_calls']} memcpy calls; host ms by backend call: "
                    + ", ".join(f"{k} {v[1]:.1f} ({v[0]})" for k, v in sorted(pp_prof["backend_ops"].items(),
                                                                           key=lambda kv: -kv[1][1])))
                for _, table in pp_prof["tables"]:
                    log(table)
        finally:
            be.prefill, be.half_cache = old_mode, old_cache
            for w in _weights_of(model):  # the copies a mode kept (half_cache; f32's float32 cache)
                w._half = None
                if w.qtype != T.F32:
                    w._dense = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meter = TrafficMeter(model.backend)  # after timing: a hooked backend decodes without its CUDA graph
    meter.on = True
    sess.eval([7], "last")
    sync(torch, device)
    meter.remove()
    tok_s = statistics.median(tg)
    roof = bw * 1e9 / meter.file_bytes
    res.update(prompt_tok_s=statistics.median(pp), decode_tok_s=tok_s, decode_tok_s_all=tg,
               weight_bytes_per_token=meter.file_bytes, backend_bytes_per_token=meter.traffic,
               matmuls_per_token=sum(1 for c in meter.calls if c[1] != "rows"),
               weight_read_modes=sorted({c[1] for c in meter.calls}),
               roofline_tok_s=roof, roofline_fraction=tok_s / roof,
               achieved_weight_gb_s=meter.file_bytes * tok_s / 1e9,
               achieved_backend_gb_s=meter.traffic * tok_s / 1e9, ms_per_token=1e3 / tok_s,
               ms_per_token_floor=1e3 / roof)
    if device.type == "cuda":
        res["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30

    prof = None
    if args.profile == "always" or (args.profile == "auto" and res["roofline_fraction"] < 0.5):
        prof = profile_step(sess, torch, device)
        res["profile"] = {k: v for k, v in prof.items() if k != "tables"}
    if args.imatrix:
        res["imatrix"] = imatrix_bench(model, torch, device)
    res["bench_s"] = time.perf_counter() - t0

    log("")
    log(f"ggquant torch backend, random Gemma 4 {cfg.name.upper()}, {weights} weights, {args.device_label}")
    log(f"  GGUF {res['gguf_bytes'] / 1e9:.2f} GB, build {'cached' if build_s is None else f'{build_s:.1f} s'}, "
        f"load {res['load_s']:.1f} s" + (f", GPU memory peak {res['gpu_mem_peak_gib']:.1f} GiB" if device.type == "cuda" else ""))
    log(f"  prompt {args.prompt} tok: {res['prompt_tok_s']:.1f} tok/s;  decode {args.decode} tok at batch 1: "
        f"{tok_s:.2f} tok/s (runs: {', '.join(f'{t:.2f}' for t in tg)})")
    log(f"  weight bytes read per token: {meter.file_bytes / 1e9:.3f} GB in the file's encoding "
        f"({res['matmuls_per_token']} matmuls incl. the tied output, + one row of token_embd and "
        f"per_layer_token_embd); weight read modes: {', '.join(res['weight_read_modes'])}")
    log(f"  backend's own weight traffic per token (estimate): {meter.traffic / 1e9:.3f} GB")
    log(f"  roofline at {bw:.1f} GB/s copy bandwidth: {roof:.1f} tok/s "
        f"({res['ms_per_token_floor']:.2f} ms/token floor vs {res['ms_per_token']:.2f} measured)")
    log(f"  achieved: {res['achieved_weight_gb_s']:.1f} GB/s of file weights, "
        f"{res['achieved_backend_gb_s']:.1f} GB/s of backend traffic")
    log(f"  fraction of roofline: {res['roofline_fraction']:.3f} (target >= 0.5; llama.cpp CUDA F16 0.538, "
        f"Q8_0 0.309, Q4_K_M 0.207 in anchor-cuda-h100.md)")
    if prof is not None:
        p = res["profile"]
        log(f"\n  one decode step under the profiler: wall {p['wall_ms']:.1f} ms, device busy {p['device_busy_ms']:.1f} ms "
            f"({p['kernels']} kernels), {p['aten_ops']} aten ops, {p['kernel_launches']} kernel launches, "
            f"{p['syncs']} synchronizations, {p['memcpy_calls']} memcpy calls")
        ops = sorted(p["backend_ops"].items(), key=lambda kv: -kv[1][1])
        log("  host time by backend call (inclusive, under the profiler): "
            + ", ".join(f"{k} {n}x {ms:.1f} ms" for k, (n, ms) in ops))
        for what, table in prof["tables"]:
            log(f"  top ops by self {what} time:")
            log(table)
    if args.imatrix:
        im = res["imatrix"]
        log(f"  imatrix collection ({im['chunks']} chunks of {im['ctx']}, {im['entries']} weights): "
            f"{im['collect_tok_s']:.1f} tok/s (same chunks without the collector: {im['plain_prompt_tok_s']:.1f} tok/s)")
    log("")
    del meter, sess, model, be
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.llama_imatrix and weights in args.imatrix_weights:
        try:
            res["imatrix_vs_llama"] = imatrix_vs_llama(args.llama_imatrix, path, args.workdir, 4, 512, log)
        except Exception as e:  # reported, the rest of the bench goes on
            res["imatrix_vs_llama"] = {"error": repr(e)[:500]}
            log(f"  imatrix vs llama-imatrix failed: {e!r}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.llama_bench:
        lb = res["llama_bench"] = llama_bench(args.llama_bench, path, args.prompt, args.decode, args.repeat, log)
        if lb.get("pp_tok_s"):
            res["pp_ratio"] = res["prompt_tok_s"] / lb["pp_tok_s"]
        if lb.get("tg_tok_s"):
            res["tg_ratio"] = res["decode_tok_s"] / lb["tg_tok_s"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="bf16",
                    help=f"comma-separated list of {', '.join(WEIGHTS)} (each built, cached and benchmarked in turn)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ggq_bench"))
    ap.add_argument("--rebuild", action="store_true", help="rebuild the GGUF even when cached")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--config", choices=list(CONFIGS), default="e4b",
                    help="model shape: Gemma 4 E4B, 31B (dense) or 26B-A4B (mixture of experts)")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, torch backend on CPU (a local check)")
    ap.add_argument("--device", choices=["cuda", "torch-cpu"], default=None,
                    help="cuda (default), torch-cpu (default with --tiny)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=None, help="decode tokens (128; 8 with --tiny)")
    ap.add_argument("--prefill", default="",
                    help="also time the prompt with each of these batched-product modes (comma-separated: "
                         "cublas, cublas+cache, triton, f32; see runtime/cuda.py PREFILL_MODE); the first "
                         "one is also the mode of the other timings")
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary: run it on the same GGUFs (-fa 1)")
    ap.add_argument("--llama-imatrix", default=None,
                    help="llama-imatrix binary: compare tok/s and statistics with ggquant's collect_imatrix")
    ap.add_argument("--imatrix-weights", default="bf16", help="weights on which --llama-imatrix runs")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs, median reported (3; 1 with --tiny)")
    ap.add_argument("--imatrix", action="store_true", help="also time imatrix collection (2 chunks of 512)")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="with --prefill: a torch-profiler summary of one prefill in each mode")
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                    help="torch profiler summary of one decode step (auto: when below 50%% of roofline)")
    ap.add_argument("--copy-gib", type=float, default=None, help="copy-bandwidth buffer (2 GiB; 0.25 with --tiny)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)

    log = lambda s: print(s, flush=True)  # noqa: E731
    variants = [w.strip() for w in args.weights.split(",") if w.strip()]
    bad = [w for w in variants if w not in WEIGHTS]
    if bad or not variants:
        ap.error(f"--weights: unknown {bad}; choose from {', '.join(WEIGHTS)}")
    cfg = (TINY_CONFIGS if args.tiny else CONFIGS)[args.config]
    args.decode = args.decode or (8 if args.tiny else 128)
    args.prefill_modes = [m.strip() for m in args.prefill.split(",") if m.strip()]
    if args.prefill_modes:  # the first mode is the backend's for every other timing too (decode's prompt, imatrix)
        import ggquant.runtime.cuda as cuda_backend

        cuda_backend.PREFILL_MODE = args.prefill_modes[0].split("+")[0]
    args.repeat = args.repeat or (1 if args.tiny else 3)
    args.copy_gib = args.copy_gib or (0.25 if args.tiny else 2.0)
    device_name = args.device or ("torch-cpu" if args.tiny else "cuda")
    nb.set_num_threads(nb.config.NUMBA_NUM_THREADS)
    t0 = time.perf_counter()
    out: dict = {"config": asdict(cfg), "results": []}

    if "q4_k" in variants:
        check_q4_k_blocks()
        log("note: q4_k weights are random Q4_K blocks (random quants, 6-bit scales/mins, bounded fp16 d), "
            "not quantized floats; decode speed does not depend on the values")
    built = [(w, *build(cfg, w, args.workdir, args.rebuild, log)) for w in variants]
    if args.build_only:
        return 0

    import torch

    device = torch.device("cuda" if device_name == "cuda" else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to torch; use --device torch-cpu (with --tiny) to check locally")
        args.device_label = torch.cuda.get_device_name()
    else:
        args.device_label = f"cpu (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    bw = copy_bandwidth(torch, device, args.copy_gib)
    out.update(device=args.device_label, torch=torch.__version__, copy_gb_s=bw)
    log(f"device: {args.device_label}; torch {torch.__version__}; device-to-device copy {bw:.1f} GB/s "
        f"(read + write bytes, {args.copy_gib:g} GiB buffer, median of 20)")

    for weights, path, build_s in built:
        try:
            out["results"].append(bench_one(cfg, weights, path, build_s, args, torch, device, device_name, bw, log))
        except Exception as e:  # one weight type failing leaves the others' figures
            import traceback

            traceback.print_exc()
            out.setdefault("errors", {})[weights] = repr(e)[:1000]
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))

    log(f"summary ({args.device_label}, copy {bw:.0f} GB/s, config {cfg.name}):")
    log(f"  {'weights':8} {'GB/token':>9} {'pp t/s':>9} {'llama pp':>9} {'ratio':>6} {'tg t/s':>8} {'llama tg':>9} "
        f"{'ratio':>6} {'roofline':>9} {'fraction':>9} {'peak GiB':>8}" + ("  imatrix t/s" if args.imatrix else ""))
    for r in out["results"]:
        lb = r.get("llama_bench", {})
        iv = r.get("imatrix_vs_llama")
        if iv:
            log(f"      imatrix: ggquant {iv.get('ggquant_tok_s', float('nan')):.1f} tok/s vs llama-imatrix "
                f"{iv.get('llama_tok_s', float('nan')):.1f} tok/s; stats max rel diff {iv.get('max_rel_diff')}")
        log(f"  {r['weights']:8} {r['weight_bytes_per_token'] / 1e9:9.3f} {r['prompt_tok_s']:9.1f} "
            f"{lb.get('pp_tok_s') or float('nan'):9.1f} {r.get('pp_ratio', float('nan')):6.2f} "
            f"{r['decode_tok_s']:8.2f} {lb.get('tg_tok_s') or float('nan'):9.2f} {r.get('tg_ratio', float('nan')):6.2f} "
            f"{r['roofline_tok_s']:9.1f} {r['roofline_fraction']:9.3f} {r.get('gpu_mem_peak_gib', float('nan')):8.1f}"
            + (f"  {r['imatrix']['collect_tok_s']:11.1f}" if args.imatrix else ""))
        for mode, v in r.get("prefill_modes", {}).items():
            for what, tok_s in (("graph", v["prompt_tok_s"]), ("eager", v.get("eager_tok_s"))):
                if tok_s:
                    log(f"      prefill {mode} {what}: {tok_s:.1f} tok/s"
                        + (f" ({tok_s / lb['pp_tok_s']:.2f}x llama.cpp)" if lb.get("pp_tok_s") else ""))
    out["total_s"] = time.perf_counter() - t0
    log(f"total {out['total_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
