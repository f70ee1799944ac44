"""The CPU graph operations other than the weight products, as ggml-cpu computes them for llama.cpp:
attention (llama.cpp's non-flash path with an F32 KV cache: KQ dots, softmax with ggml's expf, KQV),
RoPE (NeoX pairing), the final logit softcap, RMS norm and the fp16-table GELU. Each function names
the ggml function it ports; the float order is ggml's, so results are bit-identical to llama.cpp's.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ..common import JIT, bits_f32, f32_bits, fp32_to_fp16
from .simd import KV_STEP, dot_f32, fmaf

F32 = np.float32


# =============================================================================================
# Attention products (llama.cpp's non-flash path, F32 KV cache)
# =============================================================================================


# vec.h ggml_v_expf constants, written as in the C source (hex floats)
_EXP_R = np.float32(float.fromhex("0x1.8p23"))
_EXP_C3 = np.float32(float.fromhex("0x1.555e66p-3"))
_EXP_C2 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_EXP_C1 = np.float32(float.fromhex("0x1.ffffecp-1"))
_EXP_C5 = np.float32(float.fromhex("0x1.0e4020p-7"))
_EXP_C4 = np.float32(float.fromhex("0x1.573e2ep-5"))
_EXP_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_EXP_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_EXP_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_ONE_BITS = np.uint32(0x3F800000)


@nb.njit(inline="always", **JIT)
def ggml_expf(x):
    """vec.h ggml_v_expf (the AVX2 branch), one lane: what ggml_vec_soft_max_f32 exponentiates with."""
    z = fmaf(x, _EXP_LOG2E, _EXP_R)
    n = z - _EXP_R
    b = fmaf(-n, _EXP_LN2_LO, fmaf(-n, _EXP_LN2_HI, x))
    e = f32_bits(z) << np.uint32(23)
    k = bits_f32(e + _ONE_BITS)
    u = b * b
    j = fmaf(fmaf(fmaf(_EXP_C5, b, _EXP_C4), u, fmaf(_EXP_C3, b, _EXP_C2)), u, _EXP_C1 * b)
    if not abs(n) > F32(126.0):
        return fmaf(j, k, k)
    g = np.uint32(0x82000000) if n <= F32(0.0) else np.uint32(0)
    s1 = bits_f32(g + np.uint32(0x7F000000))
    if abs(n) > F32(192.0):
        return s1 * s1
    s2 = bits_f32(e - g)
    return fmaf(s2, j, s2) * s1


@nb.njit(inline="always", **JIT)
def ggml_expf16(x):
    """vec.h ggml_v_expf(__m512) (the AVX-512 branch), one lane: the polynomial keeps its constant
    term (fma(c1, b, 1)) and _mm512_scalef_ps scales by 2**n, rounded once (float64 product, exact,
    then one rounding to float32, denormals included); |n| > 192 gives 0 or inf."""
    z = fmaf(x, _EXP_LOG2E, _EXP_R)
    n = z - _EXP_R
    b = fmaf(-n, _EXP_LN2_LO, fmaf(-n, _EXP_LN2_HI, x))
    if abs(n) > F32(192.0):
        return F32(0.0) if n <= F32(0.0) else F32(np.inf)
    u = b * b
    j = fmaf(fmaf(fmaf(_EXP_C5, b, _EXP_C4), u, fmaf(_EXP_C3, b, _EXP_C2)), u, fmaf(_EXP_C1, b, F32(1.0)))
    return F32(np.float64(j) * math.ldexp(1.0, int(n)))


@nb.njit(**JIT)
def _softmax_row(w, n, lanes):
    """ggml_compute_forward_soft_max_f32 on w[:n] (scale and mask already applied), in place:
    max, then ggml_vec_soft_max_f32 — ggml_v_expf over chunks of `lanes` (8: AVX2, 16: AVX-512),
    each chunk summed in float in its hsum order (_mm256 movehl / _mm512_reduce_add_ps), chunk sums
    added in double — then scaled by (float)(1 / sum). w must be zero-padded to a multiple of
    `lanes` (llama.cpp pads n_kv to 256 with masked keys, whose exp is 0)."""
    mx = F32(-np.inf)
    for i in range(n):
        if w[i] > mx:
            mx = w[i]
    total = 0.0
    npad = (n + lanes - 1) // lanes * lanes
    for i in range(npad):
        if i >= n:
            w[i] = F32(0.0)
        elif lanes == 16:
            w[i] = ggml_expf16(w[i] - mx)
        else:
            w[i] = ggml_expf(w[i] - mx)
    for c in range(0, npad, lanes):
        total += np.float64(_hsum_lanes(w, c, lanes))
    inv = F32(1.0 / total)
    for i in range(n):
        w[i] = w[i] * inv


@nb.njit(inline="always", **JIT)
def _hsum_lanes(w, c, lanes):
    """The float sum of w[c:c + lanes] in ggml_vec_soft_max_f32's order: _mm512_reduce_add_ps
    (16 lanes) or the _mm256 extract / movehl / movehdup reduction (8 lanes)."""
    if lanes == 16:
        t0 = w[c + 8] + w[c]
        t1 = w[c + 9] + w[c + 1]
        t2 = w[c + 10] + w[c + 2]
        t3 = w[c + 11] + w[c + 3]
        t4 = w[c + 12] + w[c + 4]
        t5 = w[c + 13] + w[c + 5]
        t6 = w[c + 14] + w[c + 6]
        t7 = w[c + 15] + w[c + 7]
        h0, h1, h2, h3 = t4 + t0, t5 + t1, t6 + t2, t7 + t3
    else:
        h0 = w[c + 4] + w[c]
        h1 = w[c + 5] + w[c + 1]
        h2 = w[c + 6] + w[c + 2]
        h3 = w[c + 7] + w[c + 3]
    return (h0 + h2) + (h1 + h3)


@nb.njit(parallel=True, **JIT)
def attention(q, k, vt, q_pos, k_pos, window, scale, kq_mode, pv_mode, lanes, out):
    """out[t, h] = softmax(scale * q[t,h] . k[j, h/g] + mask) @ v, as ggml runs it on the CPU.

    q [T, H, D]; k [S, Hkv, D]; vt [Hkv, D, S_alloc] (V transposed, llama.cpp's v_trans layout,
    zero or finite beyond S); positions q_pos [T], k_pos [S]; window > 0: key j is masked when
    q_pos - k_pos >= window; out [T, H, D].
    KQ: ggml_vec_dot_f32 per (key, query) (src1 is a permuted view, so no sgemm): kq_mode;
    softmax over chunks of `lanes`; KQV: tinyBLAS over the keys for batches, ggml_vec_dot_f32 for
    one token: pv_mode (CpuIsa picks all three for the host).
    """
    T, H, D = q.shape
    S = k.shape[0]
    Hkv = k.shape[1]
    group = H // Hkv
    # keys padded with zeros (llama.cpp pads n_kv to 256) to a multiple of every mode's step (64):
    # the zero terms then leave the sums unchanged, as they do in llama.cpp
    npad = (S + KV_STEP - 1) // KV_STEP * KV_STEP
    for th in nb.prange(T * H):
        t = th // H
        h = th - t * H
        kvh = h // group
        w = np.zeros(npad, np.float32)
        pv = np.zeros(npad, np.float32)
        qt = q[t, h]
        for j in range(S):
            masked = k_pos[j] > q_pos[t] or (window > 0 and q_pos[t] - k_pos[j] >= window)
            if masked:
                w[j] = F32(-np.inf)
            else:
                w[j] = dot_f32(k[j, kvh], 0, qt, 0, D, kq_mode) * scale
        _softmax_row(w, S, lanes)
        for j in range(S):
            pv[j] = w[j]
        for d in range(D):
            row = vt[kvh, d]
            acc = F32(0.0)
            if S <= row.shape[0] and npad <= row.shape[0]:
                acc = dot_f32(row, 0, pv, 0, npad, pv_mode)
            else:  # cache not padded: copy the keys into a padded buffer
                tmp = np.zeros(npad, np.float32)
                for j in range(S):
                    tmp[j] = row[j]
                acc = dot_f32(tmp, 0, pv, 0, npad, pv_mode)
            out[t, h, d] = acc


# =============================================================================================
# RoPE (NeoX pairing), as ggml-cpu ops.cpp ggml_compute_forward_rope_flt computes it
# =============================================================================================


@nb.njit(**JIT)
def rope_theta_scale(base, n_dims):
    """powf(freq_base, -2.0f / n_dims) with the C library's powf (numba lowers math.pow on float32
    to it), as ggml_compute_forward_rope_flt."""
    return F32(math.pow(F32(base), F32(-2.0) / F32(n_dims)))


@nb.njit(**JIT)
def rope_cache(pos, half, theta_scale, freq_scale, freq_factors, ext_factor, mscale, corr_low, corr_high,
               cos_out, sin_out):
    """ggml_rope_cache_init / rope_yarn: theta starts at the position and is multiplied by
    theta_scale after each pair in float32; freq factors divide it (theta_extrap); theta_interp =
    freq_scale * theta_extrap. With ext_factor != 0 (YaRN) pair i mixes the two by
    rope_yarn_ramp(corr_low, corr_high, i) * ext_factor and the magnitude mscale grows by
    1 + 0.1 * logf(1 / freq_scale); cos/sin are the C library's cosf/sinf (what numba's math.cos on
    float32 calls) times mscale. As GCC contracts rope_yarn (the first product of each sum fused):
        theta = fma(theta_interp, 1 - ramp_mix, theta_extrap * ramp_mix)
        mscale *= fma(0.1f, logf(1 / freq_scale), 1).
    freq_factors: empty for none."""
    use_ff = freq_factors.shape[0] > 0
    theta_scale = F32(theta_scale)
    freq_scale = F32(freq_scale)
    ext = F32(ext_factor)
    ms = F32(mscale)
    low = F32(corr_low)
    span = max(F32(0.001), F32(corr_high) - low)
    if ext != F32(0.0):
        ms = ms * fmaf(F32(0.1), F32(math.log(F32(1.0) / freq_scale)), F32(1.0))
    for t in range(pos.shape[0]):
        theta = F32(pos[t])
        for i in range(half):
            th_e = theta / freq_factors[i] if use_ff else theta
            th = freq_scale * th_e
            if ext != F32(0.0):
                y = (F32(i) - low) / span  # rope_yarn_ramp: (i0 / 2 - low) / MAX(0.001f, high - low)
                mix = (F32(1.0) - min(F32(1.0), max(F32(0.0), y))) * ext
                th = fmaf(th, F32(1.0) - mix, th_e * mix)
            cos_out[t, i] = F32(math.cos(th)) * ms
            sin_out[t, i] = F32(math.sin(th)) * ms
            theta = theta * theta_scale


@nb.njit(**JIT)
def rope_yarn_corr_dims(n_dims, n_ctx_orig, base, beta_fast, beta_slow):
    """ggml.c ggml_rope_yarn_corr_dims: the first and last pair index of YaRN's ramp, from
    ggml_rope_yarn_corr_dim(n_dims, n_ctx_orig, beta, base) =
    n_dims * logf(n_ctx_orig / (beta * 2 * (float)M_PI)) / (2 * logf(base)), floored / ceiled and
    clamped to [0, n_dims - 1]; float32 throughout."""
    two_pi = F32(math.pi)
    b = F32(base)
    lo = F32(n_dims) * F32(math.log(F32(n_ctx_orig) / (F32(beta_fast) * F32(2.0) * two_pi))) / (
        F32(2.0) * F32(math.log(b)))
    hi = F32(n_dims) * F32(math.log(F32(n_ctx_orig) / (F32(beta_slow) * F32(2.0) * two_pi))) / (
        F32(2.0) * F32(math.log(b)))
    return max(F32(0.0), F32(math.floor(lo))), min(F32(n_dims - 1), F32(math.ceil(hi)))


@nb.njit(**JIT)
def _yarn_get_mscale(scale, mscale):
    """llama-context.cpp get_mscale: scale <= 1 ? 1 : 0.1f * mscale * logf(scale) + 1 (libllama is
    built without FMA: no contraction)."""
    if scale <= F32(1.0):
        return F32(1.0)
    return F32(F32(0.1) * F32(mscale)) * F32(math.log(F32(scale))) + F32(1.0)


@nb.njit(**JIT)
def yarn_attn_factor(freq_scale, log_mul, rope_attn_factor):
    """llama_context's cparams.yarn_attn_factor for YaRN (ext_factor != 0): with factor =
    1 / freq_scale, get_mscale(factor, 1) / get_mscale(factor, log_mul) when the GGUF has a
    yarn_log_multiplier (mscale assumed 1), else get_mscale(factor, 1); then times
    1 / (1 + 0.1f * logf(factor)) (rope_yarn multiplies that back in) and rope.scaling.attn_factor."""
    factor = F32(1.0) / F32(freq_scale)
    if F32(log_mul) != F32(0.0):
        a = _yarn_get_mscale(factor, F32(1.0)) / _yarn_get_mscale(factor, F32(log_mul))
    else:
        a = _yarn_get_mscale(factor, F32(1.0))
    a = a * (F32(1.0) / (F32(1.0) + F32(0.1) * F32(math.log(factor))))
    return a * F32(rope_attn_factor)


@nb.njit(parallel=True, **JIT)
def rope_neox(x, cos, sin, out):
    """ops.cpp rotate_pairs for GGML_ROPE_TYPE_NEOX on x [T, H, D]: pairs (i, i + n_dims/2) of the
    first n_dims = 2 * cos.shape[1] dims; the rest is copied. As GCC compiles it (fp-contract):
        y0 = fma(x0, cos, -(x1 * sin));  y1 = fma(x0, sin, x1 * cos)."""
    T, H, D = x.shape
    half = cos.shape[1]
    for th in nb.prange(T * H):
        t = th // H
        h = th - t * H
        for i in range(half):
            c = cos[t, i]
            s = sin[t, i]
            x0 = x[t, h, i]
            x1 = x[t, h, i + half]
            out[t, h, i] = fmaf(x0, c, -(x1 * s))
            out[t, h, i + half] = fmaf(x0, s, x1 * c)
        for i in range(2 * half, D):
            out[t, h, i] = x[t, h, i]


@nb.njit(parallel=True, **JIT)
def softcap(x, cap, out):
    """cap * tanh(x / cap) as llama.cpp's graph computes it: ggml_scale(1.0f/cap), ggml_tanh (the C
    library's tanhf, which numba's math.tanh on float32 calls), ggml_scale(cap)."""
    inv = F32(1.0) / F32(cap)
    c = F32(cap)
    flat = x.reshape(-1)
    o = out.reshape(-1)
    for i in nb.prange(flat.shape[0]):
        o[i] = F32(math.tanh(flat[i] * inv)) * c


# =============================================================================================
# Element-wise ops of the graph, as ggml-cpu computes them
# =============================================================================================


@nb.njit(**JIT)
def rms_norm(x, w, eps, use_w, out):
    """ops.cpp ggml_compute_forward_rms_norm_f32 (+ the fused ggml_mul by w), rows of x [R, n]:
    sum of float32 squares accumulated in double, mean cast to float, scale = 1 / sqrtf(mean + eps),
    y = x * scale * w."""
    R, n = x.shape
    eps = F32(eps)
    for r in range(R):
        acc = 0.0
        for i in range(n):
            v = x[r, i] * x[r, i]
            acc += np.float64(v)
        mean = F32(acc / n)
        scale = F32(1.0) / F32(math.sqrt(mean + eps))
        if use_w:
            for i in range(n):
                out[r, i] = (x[r, i] * scale) * w[i]
        else:
            for i in range(n):
                out[r, i] = x[r, i] * scale


@nb.njit(**JIT)
def gelu_table_f16(x, table, gate, use_gate, out):
    """vec.h ggml_vec_gelu_f32 / ggml_vec_geglu_f32 with GGML_GELU_FP16: x <= -10 -> 0, x >= 10 ->
    x, otherwise table[fp16(x)] (the table holds fp16(gelu) as float32); times gate if use_gate."""
    flat = x.reshape(-1)
    g = gate.reshape(-1)
    o = out.reshape(-1)
    for i in range(flat.shape[0]):
        v = flat[i]
        if v <= F32(-10.0):
            y = F32(0.0)
        elif v >= F32(10.0):
            y = v
        else:
            y = table[fp32_to_fp16(v)]
        o[i] = y * g[i] if use_gate else y


# =============================================================================================
# Mixture-of-experts routing (llama-graph.cpp build_moe_ffn with softmax gating and norm_w)
# =============================================================================================


@nb.njit(**JIT)
def softmax_rows(x, lanes, out):
    """ggml_soft_max of the router logits, rows of x [R, n] (no mask, scale 1):
    ggml_compute_forward_soft_max_f32 takes the row max (ggml_vec_max_f32), then
    ggml_vec_soft_max_f32 exponentiates full chunks of `lanes` with ggml_v_expf, adding each
    chunk's float hsum to a double, and the n % lanes values left with expf one by one (added
    in double too); the row is then scaled by (float)(1 / sum)."""
    R, n = x.shape
    nfull = n // lanes * lanes
    for r in range(R):
        xr = x[r]
        o = out[r]
        mx = F32(-np.inf)
        for i in range(n):
            if xr[i] > mx:
                mx = xr[i]
        total = 0.0
        for i in range(nfull):
            o[i] = ggml_expf16(xr[i] - mx) if lanes == 16 else ggml_expf(xr[i] - mx)
        for c in range(0, nfull, lanes):
            total += np.float64(_hsum_lanes(o, c, lanes))
        for i in range(nfull, n):
            v = F32(math.exp(xr[i] - mx))
            total += np.float64(v)
            o[i] = v
        inv = F32(1.0 / total)
        for i in range(n):
            o[i] = o[i] * inv


# build_moe_ffn: weights_sum clamped to the smallest normal F16 before the division
MOE_WEIGHTS_SUM_MIN = F32(6.103515625e-5)


@nb.njit(**JIT)
def moe_top_k(probs, k, ids, weights, norm):
    """Per row of probs [T, E]: ids [T, k] = ggml_argsort_top_k (descending; std::sort, so equal
    probabilities have no defined order: the lower index first here), weights [T, k] = the
    probabilities there (ggml_get_rows). norm (build_moe_ffn norm_w): weights divided by their
    sum (ggml_sum_rows: ggml_vec_sum_f32 in double, cast to float), clamped below at
    MOE_WEIGHTS_SUM_MIN (ggml_clamp), by ggml_div."""
    T, E = probs.shape
    taken = np.zeros(E, np.bool_)
    for t in range(T):
        taken[:] = False
        for j in range(k):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or probs[t, e] > probs[t, best]):
                    best = e
            taken[best] = True
            ids[t, j] = best
            weights[t, j] = probs[t, best]
        if norm:
            acc = 0.0
            for j in range(k):
                acc += np.float64(weights[t, j])
            s = F32(acc)
            if s < MOE_WEIGHTS_SUM_MIN:
                s = MOE_WEIGHTS_SUM_MIN
            for j in range(k):
                weights[t, j] = weights[t, j] / s


# =============================================================================================
# Llama-family ops: NORM (GPT-J pair) RoPE and SwiGLU
# =============================================================================================


@nb.njit(parallel=True, **JIT)
def rope_norm(x, cos, sin, out):
    """ops.cpp rotate_pairs for GGML_ROPE_TYPE_NORMAL on x [T, H, D]: adjacent pairs (2i, 2i + 1) of
    the first n_dims = 2 * cos.shape[1] dims, with cos/sin of pair i; the rest is copied. The same
    float expressions as the NeoX case (one template), as GCC contracts them:
        y0 = fma(x0, cos, -(x1 * sin));  y1 = fma(x0, sin, x1 * cos)."""
    T, H, D = x.shape
    half = cos.shape[1]
    for th in nb.prange(T * H):
        t = th // H
        h = th - t * H
        for i in range(half):
            c = cos[t, i]
            s = sin[t, i]
            x0 = x[t, h, 2 * i]
            x1 = x[t, h, 2 * i + 1]
            out[t, h, 2 * i] = fmaf(x0, c, -(x1 * s))
            out[t, h, 2 * i + 1] = fmaf(x0, s, x1 * c)
        for i in range(2 * half, D):
            out[t, h, i] = x[t, h, i]


@nb.njit(inline="always", **JIT)
def _silu_lane(x, lanes):
    """vec.h ggml_v_silu, one lane: x / (1 + ggml_v_expf(0 - x)) with the AVX2 (8 lanes) or the
    AVX-512 (16 lanes) ggml_v_expf."""
    nx = F32(0.0) - x
    e = ggml_expf16(nx) if lanes == 16 else ggml_expf(nx)
    return x / (F32(1.0) + e)


@nb.njit(parallel=True, **JIT)
def swiglu(gate, up, lanes, out):
    """vec.cpp ggml_vec_swiglu_f32 on rows of gate/up [R, n]: silu(gate) * up, where the first
    n - n % lanes values of each row take the vector path (ggml_v_silu) and the rest the scalar
    ggml_silu_f32, x / (1 + expf(-x)) with the C library's expf (numba's math.exp on float32)."""
    R, n = gate.shape
    nv = n - n % lanes
    for r in nb.prange(R):
        for i in range(nv):
            out[r, i] = _silu_lane(gate[r, i], lanes) * up[r, i]
        for i in range(nv, n):
            x = gate[r, i]
            out[r, i] = (x / (F32(1.0) + F32(math.exp(-x)))) * up[r, i]
