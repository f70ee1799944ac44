"""Fused dequantize-dot kernels: y[T, N] = x[T, K] @ W[N, K]^T with W kept in its GGML block format.

This is what ggml-cpu's ggml_compute_forward_mul_mat does, and how it does it:

- The activation x is first converted to the weight type's ``vec_dot_type`` (ggml-cpu.c
  type_traits_cpu): Q8_0 blocks for Q4_0 / Q5_0 / Q8_0 weights, Q8_K blocks for the k-quants,
  fp16 for F16, bf16 for BF16, unchanged for F32. The Q8 quantizers are ports of the x86 code
  that runs on AVX2 machines (arch/x86/quants.c quantize_row_q8_0, ggml-quants.c
  quantize_row_q8_K_ref), so the activation quants equal ggml's byte for byte. This matters:
  on a 4-bit model the activation rounding moves logits about as much as the weight rounding.
- Each weight block is then dotted with the matching activation block in integers (exact) and
  the integer sum is scaled in float32, as in ggml's ggml_vec_dot_<type>_q8_<0|K>. Integer
  parts are exact, so results differ from ggml only in the order of the float32 sums of the
  per-block terms (ggml's AVX2 paths keep 8 float lanes, tinyBLAS/repack use tiles).

Layout of the work: rows of W are processed in chunks of ROWS rows (prange over chunks, so
results do not depend on the thread count). A chunk's rows are unpacked once into int8
scratch (values in ggml's signed/unsigned quant range) plus per-block scales, then each of the
T activation rows is dotted with every row of the chunk while both sit in L1/L2. With T = 1
this is the matrix-vector product of token-by-token decoding.

Speed: LLVM does not vectorize numba's fixed-length 32-element dot loops (it unrolls them and
the SLP vectorizer gives up), which left the int8 dot at ~1 GMAC/s. The few hot primitives are
therefore written as LLVM vector IR through numba's @intrinsic: integer dots (sext, mul, add of
even/odd lanes, which the x86 backend turns into vpmaddwd), a block-scaled Q8 dot that keeps 8
float lanes like ggml's AVX2 code, the unpackers of 4/5/6-bit quants, and a float32 dot with
4 x 8 lanes of llvm.fma (the shape of ggml_vec_dot_f32 on AVX2). None of this is fastmath: every operation and its order is
spelled out, so results are deterministic.
"""

from __future__ import annotations

import math
import os

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import FP16_TO_FP32, fp32_to_fp16, get_u16
from .qsearch import get_scale_min_k4

_T = GGMLQuantizationType
F32 = np.float32
I32 = np.int32
JIT = dict(cache=True, error_model="numpy")

QK8_0 = GGML_QUANT_SIZES[_T.Q8_0][0]  # 32 values per Q8_0 / Q4_0 / Q5_0 block
QK_K = GGML_QUANT_SIZES[_T.Q8_K][0]  # 256 values per k-quant super-block
Q4_0_BYTES = GGML_QUANT_SIZES[_T.Q4_0][1]  # d fp16 | qs[16]
Q5_0_BYTES = GGML_QUANT_SIZES[_T.Q5_0][1]  # d fp16 | qh u32 | qs[16]
Q8_0_BYTES = GGML_QUANT_SIZES[_T.Q8_0][1]  # d fp16 | qs[32] int8
Q4_K_BYTES = GGML_QUANT_SIZES[_T.Q4_K][1]  # d | dmin | scales[12] | qs[128]
Q5_K_BYTES = GGML_QUANT_SIZES[_T.Q5_K][1]  # d | dmin | scales[12] | qh[32] | qs[128]
Q6_K_BYTES = GGML_QUANT_SIZES[_T.Q6_K][1]  # ql[128] | qh[64] | scales[16] int8 | d

ROWS = 16  # weight rows per parallel work item (unpacked together, reused for all T tokens)

# ggml-cpu.c type_traits_cpu[t].vec_dot_type: what the activation is converted to.
VEC_DOT_TYPE = {
    _T.F32: _T.F32,
    _T.F16: _T.F16,
    _T.BF16: _T.BF16,
    _T.Q4_0: _T.Q8_0,
    _T.Q5_0: _T.Q8_0,
    _T.Q8_0: _T.Q8_0,
    _T.Q4_K: _T.Q8_K,
    _T.Q5_K: _T.Q8_K,
    _T.Q6_K: _T.Q8_K,
}
SUPPORTED = frozenset(VEC_DOT_TYPE)


# =============================================================================================
# LLVM vector primitives
# =============================================================================================

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _elem_ptr(context, builder, arrty, arr, idx, elt, idxty=None):
    """Pointer to arr[idx] (idx in elements of the array), cast to elt*."""
    a = context.make_array(arrty)(context, builder, arr)
    if idxty is not None:
        idx = context.cast(builder, idx, idxty, types.intp)
    p = builder.gep(a.data, [idx])
    return builder.bitcast(p, elt.as_pointer())


def _load_vec(builder, ptr_elt, elt, n):
    vt = ir.VectorType(elt, n)
    return builder.load(builder.bitcast(ptr_elt, vt.as_pointer()), align=1)


def _splat(builder, value, n):
    vt = ir.VectorType(value.type, n)
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_I32, n), [0] * n))


def _reduce_add_i32(builder, v, n):
    fnty = ir.FunctionType(_I32, [ir.VectorType(_I32, n)])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.add.v{n}i32")
    return builder.call(fn, [v])


def _is_int8_array(t):
    return isinstance(t, types.Array) and t.dtype in (types.int8, types.uint8) and t.layout == "C"


@intrinsic
def unpack32_kq(typingctx, w, ilo, lo_shift, ihi, hi_shift, hi_mask, dst, idst):
    """32 quants of a k-quant sub-block, unsigned, into uint8 dst[idst:idst+32]:

        q[l] = (w[ilo+l] >> lo_shift) & 0xF | ((w[ihi+l] >> hi_shift) & hi_mask) << 4

    Q4_K: hi_mask 0 (dequantize_row_q4_K); Q5_K: hi_mask 1 (dequantize_row_q5_K: +16 where the qh
    bit is set); Q6_K: hi_mask 3 (dequantize_row_q6_K, before its -32).
    """
    if not (_is_int8_array(w) and _is_int8_array(dst)):
        return None
    u = types.unliteral
    sig = types.void(w, u(ilo), u(lo_shift), u(ihi), u(hi_shift), u(hi_mask), dst, u(idst))

    def codegen(context, builder, signature, args):
        st = signature.args
        tw = st[0]
        vt = ir.VectorType(_I8, 32)

        def narrow(i):  # shifts and masks are < 256
            return builder.trunc(args[i], _I8) if args[i].type.width > 8 else args[i]

        lo = _load_vec(builder, _elem_ptr(context, builder, tw, args[0], args[1], _I8, st[1]), _I8, 32)
        hi = _load_vec(builder, _elem_ptr(context, builder, tw, args[0], args[3], _I8, st[3]), _I8, 32)
        lo = builder.and_(builder.lshr(lo, _splat(builder, narrow(2), 32)), ir.Constant(vt, [0xF] * 32))
        hi = builder.and_(builder.lshr(hi, _splat(builder, narrow(4), 32)), _splat(builder, narrow(5), 32))
        q = builder.or_(lo, builder.shl(hi, ir.Constant(vt, [4] * 32)))
        pd = _elem_ptr(context, builder, st[6], args[6], args[7], _I8, st[7])
        builder.store(q, builder.bitcast(pd, vt.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


def _pair_sum(builder, p, n):
    """<n x i32> -> <n/2 x i32> of p[2i] + p[2i+1] (on sext'd i16 products this is vpmaddwd)."""
    und = ir.Constant(p.type, ir.Undefined)
    ev = builder.shuffle_vector(p, und, ir.Constant(ir.VectorType(_I32, n // 2), list(range(0, n, 2))))
    od = builder.shuffle_vector(p, und, ir.Constant(ir.VectorType(_I32, n // 2), list(range(1, n, 2))))
    return builder.add(ev, od)


def _madd16(builder, pa, ea, pb, off):
    """8 x i32 partial sums of 16 products a[off+k] * int8 b[off+k] (a of element type ea)."""
    v16 = ir.VectorType(_I32, 16)
    va = builder.sext(_load_vec(builder, builder.gep(pa, [off]), ea, 16), v16)
    vb = builder.sext(_load_vec(builder, builder.gep(pb, [off]), _I8, 16), v16)
    return _pair_sum(builder, builder.mul(va, vb), 16)


def _host_has(feature: str) -> bool:
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get(feature, False))
    except Exception:  # pragma: no cover - exotic llvmlite builds
        return False


# With AVX2 the byte products go through the instructions ggml itself uses (vpsignb, vpmaddubsw,
# vpmaddwd): twice the work per instruction of widening to 16 bits first. The results are the same
# integers either way (|products| stay far from the 16-bit saturation of vpmaddubsw here).
HAS_AVX2 = _host_has("avx2")


def _x86(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _maddubs_lanes(builder, u8, s8):
    """_mm256_madd_epi16(_mm256_maddubs_epi16(u8, s8), 1): <8 x i32>, lane m = products 4m .. 4m+3."""
    v16 = ir.VectorType(ir.IntType(16), 16)
    p16 = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [u8, s8])
    return _x86(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8), [p16, ir.Constant(v16, [1] * 16)])


def _madd32_lanes(builder, pa, ea, pb, off):
    """8 x i32 lanes of 32 products a[off+k] * int8 b[off+k]: lane m = products 4m .. 4m+3.

    This is the lane layout of ggml's AVX2 integer dots (_mm256_maddubs_epi16 on byte pairs, then
    _mm256_madd_epi16 on i16 pairs), which matters because ggml converts the 8 lanes to float
    separately. With AVX2 and int8 a: ggml's own sign trick (|a| times b with a's sign); otherwise
    two vpmaddwd on widened values and one horizontal add of neighbouring pairs."""
    intp = off.type
    if HAS_AVX2 and ea.width == 8:
        v32 = ir.VectorType(_I8, 32)
        x = _load_vec(builder, builder.gep(pa, [off]), _I8, 32)
        y = _load_vec(builder, builder.gep(pb, [off]), _I8, 32)
        ax = _x86(builder, "llvm.x86.avx2.psign.b", v32, [x, x])
        sy = _x86(builder, "llvm.x86.avx2.psign.b", v32, [y, x])
        return _maddubs_lanes(builder, ax, sy)
    lo = _madd16(builder, pa, ea, pb, off)  # pairs of elements 0..15
    hi = _madd16(builder, pa, ea, pb, builder.add(off, ir.Constant(intp, 16)))  # pairs of 16..31
    v8 = ir.VectorType(_I32, 8)
    ev = builder.shuffle_vector(lo, hi, ir.Constant(v8, list(range(0, 16, 2))))
    od = builder.shuffle_vector(lo, hi, ir.Constant(v8, list(range(1, 16, 2))))
    return builder.add(ev, od)


def _kq_chunk_lanes(builder, pq, px, off, scales, signed=False):
    """8 x i32 lanes of 32 products of unsigned quants q (0..63) and int8 activations x, times the
    sub-block scales (an <16 x i16> vector: one scale per i16 lane, i.e. per byte pair):
    ggml's _mm256_madd_epi16(scales, _mm256_maddubs_epi16(q, x)) lane layout."""
    i16 = ir.IntType(16)
    v16 = ir.VectorType(i16, 16)
    m16 = ir.VectorType(_I32, 16)
    if HAS_AVX2 and not signed:
        q = _load_vec(builder, builder.gep(pq, [off]), _I8, 32)
        x = _load_vec(builder, builder.gep(px, [off]), _I8, 32)
        p16 = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [q, x])
        return _x86(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(_I32, 8), [p16, scales])
    v32 = ir.VectorType(_I32, 32)
    ext = builder.sext if signed else builder.zext
    q = ext(_load_vec(builder, builder.gep(pq, [off]), _I8, 32), v32)
    x = builder.sext(_load_vec(builder, builder.gep(px, [off]), _I8, 32), v32)
    p16 = _pair_sum(builder, builder.mul(q, x), 32)  # byte pairs, as vpmaddubsw
    return _pair_sum(builder, builder.mul(p16, builder.sext(scales, m16)), 16)  # times scales, as vpmaddwd


@intrinsic
def store_splat16(typingctx, dst, idst, value):
    """dst[idst:idst+16] = value (int16 dst): one vector store instead of 16 scalar ones."""
    if not (isinstance(dst, types.Array) and dst.dtype == types.int16):
        return None
    u = types.unliteral
    sig = types.void(dst, u(idst), u(value))

    def codegen(context, builder, signature, args):
        st = signature.args
        i16 = ir.IntType(16)
        v = args[2]
        v = builder.trunc(v, i16) if v.type.width > 16 else (builder.sext(v, i16) if v.type.width < 16 else v)
        pd = _elem_ptr(context, builder, st[0], args[0], args[1], i16, st[1])
        builder.store(_splat(builder, v, 16), builder.bitcast(pd, ir.VectorType(i16, 16).as_pointer()), align=2)
        return context.get_dummy_value()

    return sig, codegen


def _make_dot_kqv(signed: bool):
    @intrinsic
    def dot_kqv(typingctx, q, iq, x, ix, sv, isv, nchunks):
        if not (_is_int8_array(q) and _is_int8_array(x) and isinstance(sv, types.Array) and sv.dtype == types.int16):
            return None
        u = types.unliteral
        sig = types.int32(q, u(iq), x, u(ix), sv, u(isv), u(nchunks))

        def codegen(context, builder, signature, args):
            st = signature.args
            i16 = ir.IntType(16)
            v32 = ir.VectorType(_I8, 32)
            pq = _elem_ptr(context, builder, st[0], args[0], args[1], _I8, st[1])
            px = _elem_ptr(context, builder, st[2], args[2], args[3], _I8, st[3])
            ps = _elem_ptr(context, builder, st[4], args[4], args[5], i16, st[5])
            n = context.cast(builder, args[6], st[6], types.intp)
            intp = n.type
            v8 = ir.VectorType(_I32, 8)
            acc = cgutils.alloca_once_value(builder, ir.Constant(v8, [0] * 8))
            with cgutils.for_range(builder, n) as loop:
                c = loop.index
                off = builder.mul(c, ir.Constant(intp, 32))
                sv = _load_vec(builder, builder.gep(ps, [builder.mul(c, ir.Constant(intp, 16))]), i16, 16)
                if signed and HAS_AVX2:  # ggml's sign trick: |q| times x with q's sign
                    qv = _load_vec(builder, builder.gep(pq, [off]), _I8, 32)
                    xv = _load_vec(builder, builder.gep(px, [off]), _I8, 32)
                    aq = _x86(builder, "llvm.x86.avx2.psign.b", v32, [qv, qv])
                    sx = _x86(builder, "llvm.x86.avx2.psign.b", v32, [xv, qv])
                    p16 = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(i16, 16), [aq, sx])
                    lanes = _x86(builder, "llvm.x86.avx2.pmadd.wd", v8, [p16, sv])
                else:
                    lanes = _kq_chunk_lanes(builder, pq, px, off, sv, signed)
                builder.store(builder.add(builder.load(acc), lanes), acc)
            return _reduce_add_i32(builder, builder.load(acc), 8)

        return sig, codegen

    dot_kqv.__doc__ = (
        "Exact int32 sum over nchunks chunks of 32 quants of scale(k) * q[iq+k] * int8(x[ix+k]) with "
        + ("signed (int8) quants" if signed else "unsigned quants (0..63)")
        + "; sv holds 16 int16 scales per chunk (one per byte pair, sv[isv + 16c ..]): "
        "the integer ggml's k-quant kernels form before converting to float.")
    return dot_kqv


dot_kqv_u = _make_dot_kqv(False)
dot_kqv_s = _make_dot_kqv(True)


@intrinsic
def dot_i16_i8(typingctx, a, ia, b, ib, n):
    """sum_{k<n} a[ia+k] * int8(b[ib+k]) as int32, for int16 or int8 a; n a multiple of 16."""
    if not (isinstance(a, types.Array) and a.dtype in (types.int16, types.int8, types.uint8)
            and _is_int8_array(b)):
        return None
    u = types.unliteral
    sig = types.int32(a, u(ia), b, u(ib), u(n))

    def codegen(context, builder, signature, args):
        ta, tia, tb, tib, tn = signature.args
        ea = ir.IntType(ta.dtype.bitwidth)
        pa = _elem_ptr(context, builder, ta, args[0], args[1], ea, tia)
        pb = _elem_ptr(context, builder, tb, args[2], args[3], _I8, tib)
        nn = context.cast(builder, args[4], tn, types.intp)
        intp = nn.type
        v8 = ir.VectorType(_I32, 8)
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8, [0] * 8))
        with cgutils.for_range(builder, builder.sdiv(nn, ir.Constant(intp, 16))) as loop:
            off = builder.mul(loop.index, ir.Constant(intp, 16))
            builder.store(builder.add(builder.load(acc), _madd16(builder, pa, ea, pb, off)), acc)
        return _reduce_add_i32(builder, builder.load(acc), 8)

    return sig, codegen


def _lanes(builder, s, idx):
    return [builder.extract_element(s, ir.Constant(_I32, i)) for i in idx]


def _hsum_movehl(builder, s):
    """sgemm.cpp hsum(__m256) / quants.c hsum_float_8: h = lo + hi; (h0 + h2) + (h1 + h3)."""
    a = _lanes(builder, s, range(8))
    h = [builder.fadd(a[i + 4], a[i]) for i in range(4)]
    return builder.fadd(builder.fadd(h[0], h[2]), builder.fadd(h[1], h[3]))


def _hsum_hadd(builder, s):
    """simd-mappings.h GGML_F32x8_REDUCE's last step: t = lo + hi; (t0 + t1) + (t2 + t3)."""
    a = _lanes(builder, s, range(8))
    t = [builder.fadd(a[i], a[i + 4]) for i in range(4)]
    return builder.fadd(builder.fadd(t[0], t[1]), builder.fadd(t[2], t[3]))


def _fma_fn(builder, ty, name):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)


@intrinsic
def fmaf(typingctx, a, b, c):
    """float32 fused multiply-add a * b + c with one rounding (llvm.fma.f32), as ggml's
    _mm256_fmadd_ps does lane by lane."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.call(_fma_fn(builder, _F32, "llvm.fma.f32"), list(args))

    return sig, codegen


@intrinsic
def dot_blocks_q8(typingctx, w, iw, wstride, x, ix, dw, idw, dx, idx, nblocks):
    """sum_b (dw[idw+b] * dx[idx+b]) * sum_{k<32} int8(w[iw+b*wstride+k]) * int8(x[ix+32b+k]).

    In the float order of ggml's ggml_vec_dot_q8_0_q8_0 / q5_0 / q4_0 on AVX2 and of sgemm.cpp
    tinyBLAS_Q0_AVX (prompt batches): per block, 8 int32 lanes of 4 consecutive products each are
    converted to float and fused-multiply-added by the block scale d_w * d_x into 8 float lanes,
    reduced once at the end by hsum. wstride is the byte distance between blocks of w (34 reading
    Q8_0 rows in place, 32 for unpacked quants).
    """
    if not (_is_int8_array(w) and _is_int8_array(x) and isinstance(dw, types.Array)
            and dw.dtype == types.float32 and isinstance(dx, types.Array) and dx.dtype == types.float32):
        return None
    u = types.unliteral
    sig = types.float32(w, u(iw), u(wstride), x, u(ix), dw, u(idw), dx, u(idx), u(nblocks))

    def codegen(context, builder, signature, args):
        st = signature.args
        pw = _elem_ptr(context, builder, st[0], args[0], args[1], _I8, st[1])
        px = _elem_ptr(context, builder, st[3], args[3], args[4], _I8, st[4])
        pdw = _elem_ptr(context, builder, st[5], args[5], args[6], _F32, st[6])
        pdx = _elem_ptr(context, builder, st[7], args[7], args[8], _F32, st[8])
        stride = context.cast(builder, args[2], st[2], types.intp)
        nb_ = context.cast(builder, args[9], st[9], types.intp)
        intp = nb_.type
        v8f = ir.VectorType(_F32, 8)
        fma8 = _fma_fn(builder, v8f, "llvm.fma.v8f32")
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
        with cgutils.for_range(builder, nb_) as loop:
            b = loop.index
            pwb = builder.gep(pw, [builder.mul(b, stride)])
            pxb = builder.gep(px, [builder.mul(b, ir.Constant(intp, QK8_0))])
            p = _madd32_lanes(builder, pwb, _I8, pxb, ir.Constant(intp, 0))
            scale = builder.fmul(builder.load(builder.gep(pdw, [b])), builder.load(builder.gep(pdx, [b])))
            builder.store(builder.call(fma8, [_splat(builder, scale, 8), builder.sitofp(p, v8f),
                                              builder.load(acc)]), acc)
        return _hsum_movehl(builder, builder.load(acc))

    return sig, codegen


@intrinsic
def dot_q6k_lanes(typingctx, q, iq, x, ix, sv, isv, corr, ic, dsc, ids, nsb):
    """A Q6_K row (unsigned 6-bit quants, uint8) times a Q8_K row, in the order of
    ggml_vec_dot_q6_K_q8_K on AVX2: per super-block, 8 int32 lanes (lane m = scale times the
    products 4m .. 4m+3 of each 32-quant chunk; sv: 16 int16 scales per 32-chunk) minus
    corr[8 s + m] = 32 * (bsum[2m] sc[2m] + bsum[2m+1] sc[2m+1]), converted to float and
    fused-multiply-added by d = d_x * d_w into 8 float lanes; hsum_float_8 at the end."""
    if not (_is_int8_array(q) and _is_int8_array(x)):
        return None
    u = types.unliteral
    sig = types.float32(q, u(iq), x, u(ix), sv, u(isv), corr, u(ic), dsc, u(ids), u(nsb))

    def codegen(context, builder, signature, args):
        st = signature.args
        pq = _elem_ptr(context, builder, st[0], args[0], args[1], _I8, st[1])
        px = _elem_ptr(context, builder, st[2], args[2], args[3], _I8, st[3])
        i16 = ir.IntType(16)
        ps = _elem_ptr(context, builder, st[4], args[4], args[5], i16, st[5])
        pc = _elem_ptr(context, builder, st[6], args[6], args[7], _I32, st[7])
        pd = _elem_ptr(context, builder, st[8], args[8], args[9], _F32, st[9])
        n = context.cast(builder, args[10], st[10], types.intp)
        intp = n.type
        i16 = ir.IntType(16)
        v8 = ir.VectorType(_I32, 8)
        v8f = ir.VectorType(_F32, 8)
        fma8 = _fma_fn(builder, v8f, "llvm.fma.v8f32")
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
        with cgutils.for_range(builder, n) as loop:
            s = loop.index
            base = builder.mul(s, ir.Constant(intp, QK_K))
            lanes = ir.Constant(v8, [0] * 8)
            for c in range(QK_K // 32):
                off = builder.add(base, ir.Constant(intp, 32 * c))
                sv = _load_vec(builder, builder.gep(ps, [builder.add(builder.mul(s, ir.Constant(intp, 128)),
                                                                      ir.Constant(intp, 16 * c))]), i16, 16)
                lanes = builder.add(lanes, _kq_chunk_lanes(builder, pq, px, off, sv))
            cv = _load_vec(builder, builder.gep(pc, [builder.mul(s, ir.Constant(intp, 8))]), _I32, 8)
            lanes = builder.sub(lanes, cv)
            d = _splat(builder, builder.load(builder.gep(pd, [s])), 8)
            builder.store(builder.call(fma8, [d, builder.sitofp(lanes, v8f), builder.load(acc)]), acc)
        return _hsum_movehl(builder, builder.load(acc))

    return sig, codegen


def _q0_block_quants(builder, pb, kind):
    """The 32 signed quants of the block at pb (i8*) as <32 x i8>, and the pointer to its fp16 d.

    kind 8: Q8_0 (d | qs[32]); 5: Q5_0 (d | qh u32 | qs[16], (nibble | qh bit << 4) - 16);
    4: Q4_0 (d | qs[16], nibble - 8). Nibbles: element j low, element j + 16 high."""
    vt8 = ir.VectorType(_I8, 32)
    if kind == 8:
        return _load_vec(builder, builder.gep(pb, [ir.Constant(_I32, 2)]), _I8, 32)
    qoff = 6 if kind == 5 else 2
    qs = _load_vec(builder, builder.gep(pb, [ir.Constant(_I32, qoff)]), _I8, 16)
    both = builder.shuffle_vector(qs, qs, ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))
    nib = builder.and_(builder.lshr(both, ir.Constant(vt8, [0] * 16 + [4] * 16)), ir.Constant(vt8, [0xF] * 32))
    if kind == 4:
        return builder.sub(nib, ir.Constant(vt8, [8] * 32))
    qh = builder.load(builder.bitcast(builder.gep(pb, [ir.Constant(_I32, 2)]), _I32.as_pointer()), align=1)
    vt32 = ir.VectorType(_I32, 32)
    bits = builder.and_(builder.lshr(_splat(builder, qh, 32), ir.Constant(vt32, list(range(32)))), ir.Constant(vt32, [1] * 32))
    hb = builder.shl(builder.trunc(bits, vt8), ir.Constant(vt8, [4] * 32))
    return builder.sub(builder.or_(nib, hb), ir.Constant(vt8, [16] * 32))


def _make_dot_row_q0(kind: int, block_bytes: int):
    @intrinsic
    def dot_row(typingctx, w, iw, x, ix, dx, idx, nblocks):
        if not (_is_int8_array(w) and _is_int8_array(x) and isinstance(dx, types.Array) and dx.dtype == types.float32):
            return None
        u = types.unliteral
        sig = types.float32(w, u(iw), x, u(ix), dx, u(idx), u(nblocks))

        def codegen(context, builder, signature, args):
            st = signature.args
            pw = _elem_ptr(context, builder, st[0], args[0], args[1], _I8, st[1])
            px = _elem_ptr(context, builder, st[2], args[2], args[3], _I8, st[3])
            pdx = _elem_ptr(context, builder, st[4], args[4], args[5], _F32, st[5])
            n = context.cast(builder, args[6], st[6], types.intp)
            intp = n.type
            v32 = ir.VectorType(_I8, 32)
            v8f = ir.VectorType(_F32, 8)
            fma8 = _fma_fn(builder, v8f, "llvm.fma.v8f32")
            acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
            with cgutils.for_range(builder, n) as loop:
                b = loop.index
                pb = builder.gep(pw, [builder.mul(b, ir.Constant(intp, block_bytes))])
                q = _q0_block_quants(builder, pb, kind)
                xv = _load_vec(builder, builder.gep(px, [builder.mul(b, ir.Constant(intp, QK8_0))]), _I8, 32)
                if HAS_AVX2:
                    aq = _x86(builder, "llvm.x86.avx2.psign.b", v32, [q, q])
                    sx = _x86(builder, "llvm.x86.avx2.psign.b", v32, [xv, q])
                    lanes = _maddubs_lanes(builder, aq, sx)
                else:
                    v32i = ir.VectorType(_I32, 32)
                    prod = builder.mul(builder.sext(q, v32i), builder.sext(xv, v32i))
                    lanes = _pair_sum(builder, _pair_sum(builder, prod, 32), 16)
                half = builder.load(builder.bitcast(pb, ir.HalfType().as_pointer()), align=1)
                dw = builder.fpext(half, _F32)  # GGML_CPU_FP16_TO_FP32 is exact
                scale = builder.fmul(dw, builder.load(builder.gep(pdx, [b])))
                builder.store(builder.call(fma8, [_splat(builder, scale, 8), builder.sitofp(lanes, v8f),
                                                  builder.load(acc)]), acc)
            return _hsum_movehl(builder, builder.load(acc))

        return sig, codegen

    dot_row.__doc__ = (f"A whole row of {block_bytes}-byte blocks read in place (kind {kind}) times a Q8_0 row, in "
                       "the order of dot_blocks_q8 (ggml_vec_dot_q*_0_q8_0 on AVX2), fp16 scales converted inline.")
    return dot_row


dot_row_q8_0 = _make_dot_row_q0(8, Q8_0_BYTES)
dot_row_q5_0 = _make_dot_row_q0(5, Q5_0_BYTES)
dot_row_q4_0 = _make_dot_row_q0(4, Q4_0_BYTES)


@intrinsic
def unpack32_q0(typingctx, w, iqs, qh, offset, dst, idst):
    """The 32 quants of a Q4_0 / Q5_0 block into int8 dst[idst:idst+32].

    qs[16] holds element j in its low nibble and element j+16 in its high nibble; bit j of
    the 32-bit qh is bit 4 of element j (Q5_0; pass qh = 0 for Q4_0). offset is 8 (Q4_0) or
    16 (Q5_0): ggml dequantize_row_q4_0 / dequantize_row_q5_0.
    """
    if not (_is_int8_array(w) and _is_int8_array(dst)):
        return None
    u = types.unliteral
    sig = types.void(w, u(iqs), u(qh), u(offset), dst, u(idst))

    def codegen(context, builder, signature, args):
        tw, tiqs, tqh, _, tdst, tidst = signature.args
        vt8 = ir.VectorType(_I8, 32)
        vt32 = ir.VectorType(_I32, 32)
        qs = _load_vec(builder, _elem_ptr(context, builder, tw, args[0], args[1], _I8, tiqs), _I8, 16)
        both = builder.shuffle_vector(qs, qs, ir.Constant(ir.VectorType(_I32, 32), list(range(16)) * 2))
        shifts = ir.Constant(vt8, [0] * 16 + [4] * 16)
        nib = builder.and_(builder.lshr(both, shifts), ir.Constant(vt8, [0xF] * 32))
        qh32 = args[2]
        if qh32.type.width > 32:
            qh32 = builder.trunc(qh32, _I32)
        elif qh32.type.width < 32:
            qh32 = builder.zext(qh32, _I32)
        bits = builder.lshr(_splat(builder, qh32, 32), ir.Constant(vt32, list(range(32))))
        bits = builder.and_(bits, ir.Constant(vt32, [1] * 32))
        hb = builder.shl(builder.trunc(bits, vt8), ir.Constant(vt8, [4] * 32))
        off = builder.trunc(args[3], _I8) if args[3].type.width > 8 else args[3]
        q = builder.sub(builder.or_(nib, hb), _splat(builder, off, 32))
        pd = _elem_ptr(context, builder, tdst, args[4], args[5], _I8, tidst)
        builder.store(q, builder.bitcast(pd, vt8.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


# ggml's float32 dot products: one mode per kernel llama.cpp runs for a product and per ISA it
# was built for (ggml-cpu compiles for the host: GGML_NATIVE). A mode fixes the vector width, the
# number of accumulators, how a step multiplies and adds, how the accumulators are combined and
# summed horizontally, and how the n % step leftovers are added:
#   (lanes, accumulators, madd, combine, hsum, leftovers)
DOT_VEC = 0          # vec.cpp ggml_vec_dot_f32, AVX2 (GGML_F32_STEP 32, EPR 8)
DOT_GEMM = 1         # llamafile/sgemm.cpp tinyBLAS<8, __m256> (batches; n a multiple of 8)
DOT_VEC_F16 = 2      # ggml_vec_dot_f16, AVX2: DOT_VEC with sumf a double (ggml_float)
DOT_VEC16 = 3        # ggml_vec_dot_f32, AVX-512 (GGML_F32_STEP 64, EPR 16)
DOT_GEMM16 = 4       # tinyBLAS<16, __m512> (F32 and F16 weights; n a multiple of 16)
DOT_VEC16_F16 = 5    # ggml_vec_dot_f16, AVX-512 without FP16 arithmetic (GGML_F32Cx16)
DOT_BF16_VEC8 = 6    # ggml_vec_dot_bf16, AVX2: c1..c4 over steps of 32, (c1+c3)+(c2+c4), double sum
DOT_BF16_VEC16 = 7   # ggml_vec_dot_bf16, AVX-512F: c1, c2 over steps of 32, each reduced into a double
DOT_BF16_DP = 8      # ggml_vec_dot_bf16, AVX512_BF16: _mm512_dpbf16_ps into c1, c2 over steps of 64
DOT_GEMM_DP = 9      # tinyBLAS<32, __m512, __m512bh> (BF16 weights on AVX512_BF16; n a multiple of 32)

FMA, DPBF16 = 0, 1   # madd: llvm.fma per lane | vdpbf16ps: acc += a[2i+1] b[2i+1]; acc += a[2i] b[2i]
TREE, EACH = 0, 1    # combine: GGML_F32xN_REDUCE's pairwise tree into one vector | each reduced alone
HADD8, MOVEHL8, REDUCE16 = 0, 1, 2   # hsum (see the helpers above)
NONE, F32_SUM, F64_SUM = 0, 1, 2     # leftovers: none (n is a multiple) | sumf float | sumf double
_DOT_MODES = {
    DOT_VEC: (8, 4, FMA, TREE, HADD8, F32_SUM),
    DOT_GEMM: (8, 1, FMA, TREE, MOVEHL8, NONE),
    DOT_VEC_F16: (8, 4, FMA, TREE, HADD8, F64_SUM),
    DOT_VEC16: (16, 4, FMA, TREE, REDUCE16, F32_SUM),
    DOT_GEMM16: (16, 1, FMA, TREE, REDUCE16, NONE),
    DOT_VEC16_F16: (16, 4, FMA, TREE, REDUCE16, F64_SUM),
    DOT_BF16_VEC8: (8, 4, FMA, TREE, MOVEHL8, F64_SUM),
    DOT_BF16_VEC16: (16, 2, FMA, EACH, REDUCE16, F64_SUM),
    DOT_BF16_DP: (16, 2, DPBF16, EACH, REDUCE16, F64_SUM),
    DOT_GEMM_DP: (16, 1, DPBF16, TREE, REDUCE16, NONE),
}


def _hsum16(builder, s):
    """GCC's _mm512_reduce_add_ps: t = hi256 + lo256; u = hi128(t) + lo128(t); (u0+u2) + (u1+u3)."""
    a = _lanes(builder, s, range(16))
    t = [builder.fadd(a[i + 8], a[i]) for i in range(8)]
    u = [builder.fadd(t[i + 4], t[i]) for i in range(4)]
    return builder.fadd(builder.fadd(u[0], u[2]), builder.fadd(u[1], u[3]))


_HSUM = {HADD8: _hsum_hadd, MOVEHL8: _hsum_movehl, REDUCE16: _hsum16}


def _dot_mode(builder, pa, pb, nn, mode):
    """The float32 dot of pa[0:nn] and pb[0:nn] in mode `mode` (a Python int), as an LLVM value."""
    lanes, n_acc, madd, combine, hsum, leftovers = _DOT_MODES[mode]
    intp = nn.type
    f64 = ir.DoubleType()
    width = 2 * lanes if madd == DPBF16 else lanes  # elements a step of one accumulator reads
    vt = ir.VectorType(_F32, lanes)
    fma = _fma_fn(builder, vt, f"llvm.fma.v{lanes}f32")

    def load(p, off, n):
        return builder.load(builder.bitcast(builder.gep(p, [off]), ir.VectorType(_F32, n).as_pointer()), align=4)

    def step(acc, off):
        a, b = load(pa, off, width), load(pb, off, width)
        if madd == FMA:
            return builder.call(fma, [a, b, acc])
        # vdpbf16ps: the products of bf16 values are exact in float32; odd element first (Intel SDM)
        und = ir.Constant(a.type, ir.Undefined)
        ev = ir.Constant(ir.VectorType(_I32, lanes), list(range(0, width, 2)))
        od = ir.Constant(ir.VectorType(_I32, lanes), list(range(1, width, 2)))
        p_od = builder.fmul(builder.shuffle_vector(a, und, od), builder.shuffle_vector(b, und, od))
        p_ev = builder.fmul(builder.shuffle_vector(a, und, ev), builder.shuffle_vector(b, und, ev))
        return builder.fadd(builder.fadd(acc, p_od), p_ev)

    stride = width * n_acc
    accs = [cgutils.alloca_once_value(builder, ir.Constant(vt, [0.0] * lanes)) for _ in range(n_acc)]
    nsteps = builder.sdiv(nn, ir.Constant(intp, stride))
    with cgutils.for_range(builder, nsteps) as loop:
        base = builder.mul(loop.index, ir.Constant(intp, stride))
        for j in range(n_acc):
            off = builder.add(base, ir.Constant(intp, width * j))
            builder.store(step(builder.load(accs[j]), off), accs[j])
    vals = [builder.load(a) for a in accs]
    if combine == TREE:  # x[i] += x[i + n/2] while n > 1
        while len(vals) > 1:
            h = len(vals) // 2
            vals = [builder.fadd(vals[i], vals[i + h]) for i in range(h)]
        total = _HSUM[hsum](builder, vals[0])
        total = builder.fpext(total, f64) if leftovers == F64_SUM else total
    else:  # sumf (a double) += hsum of each accumulator in turn
        total = ir.Constant(f64, 0.0)
        for v in vals:
            total = builder.fadd(total, builder.fpext(_HSUM[hsum](builder, v), f64))
    if leftovers != NONE:
        res = cgutils.alloca_once_value(builder, total)
        start = builder.mul(nsteps, ir.Constant(intp, stride))
        m = builder.sub(nn, start)
        # `sumf += x[i]*y[i]` as GCC builds it: float sumf: an in-order reduction vectorized 8 wide
        # (products rounded, then added one by one) and a scalar tail contracted into fma (measured
        # against ggml for every n % 64); double sumf: the float product widened, then added
        n_mul = builder.mul(builder.sdiv(m, ir.Constant(intp, 8)), ir.Constant(intp, 8))
        fma1 = _fma_fn(builder, _F32, "llvm.fma.f32")
        with cgutils.for_range(builder, m) as loop:
            k = builder.add(start, loop.index)
            xa, xb = builder.load(builder.gep(pa, [k])), builder.load(builder.gep(pb, [k]))
            prod = builder.fmul(xa, xb)
            if leftovers == F64_SUM:
                builder.store(builder.fadd(builder.load(res), builder.fpext(prod, f64)), res)
            else:
                fused = builder.call(fma1, [xa, xb, builder.load(res)])
                unfused = builder.fadd(builder.load(res), prod)
                builder.store(builder.select(builder.icmp_signed("<", loop.index, n_mul), unfused, fused), res)
        total = builder.load(res)
    return builder.fptrunc(total, _F32) if total.type == f64 else total


@intrinsic
def dot_f32(typingctx, a, ia, b, ib, n, mode):
    """float32 dot of a[ia:ia+n] and b[ib:ib+n] in the order of ggml's kernel `mode` (_DOT_MODES):
    e.g. DOT_VEC, ggml_vec_dot_f32 on AVX2: 4 accumulators of 8 lanes fused-multiply-added over
    steps of 32, reduced (acc0+acc2)+(acc1+acc3), then GGML_F32x8_REDUCE's hadd order, the n % 32
    leftovers added one by one in float. BF16 modes take bf16 values widened to float32."""
    if not (isinstance(a, types.Array) and a.dtype == types.float32 and
            isinstance(b, types.Array) and b.dtype == types.float32):
        return None
    u = types.unliteral
    sig = types.float32(a, u(ia), b, u(ib), u(n), u(mode))

    def codegen(context, builder, signature, args):
        ta, tia, tb, tib, tn, tm = signature.args
        pa = _elem_ptr(context, builder, ta, args[0], args[1], _F32, tia)
        pb = _elem_ptr(context, builder, tb, args[2], args[3], _F32, tib)
        nn = context.cast(builder, args[4], tn, types.intp)
        mode_ = context.cast(builder, args[5], tm, types.intp)
        res = cgutils.alloca_once(builder, _F32)
        for m in _DOT_MODES:  # a chain of branches; constant-folded when the caller's mode is
            with builder.if_then(builder.icmp_signed("==", mode_, ir.Constant(nn.type, m))):
                builder.store(_dot_mode(builder, pa, pb, nn, m), res)
        return builder.load(res)

    return sig, codegen


FLOAT_KIND = {_T.F32: 0, _T.F16: 1, _T.BF16: 2}  # _mm_float's kind argument
KV_STEP = 64  # the largest step of a dot mode over keys (DOT_VEC16: 4 x 16 lanes)


class CpuIsa:
    """Which of ggml-cpu's x86 kernels llama.cpp runs, by the ISA its CPU backend was compiled for.

    llama-cpp-python builds ggml for the machine it is installed on (GGML_NATIVE), so the host's
    features decide: AVX-512F switches ggml_vec_dot_f32/f16 to 4 x 16 lanes (simd-mappings.h),
    tinyBLAS to __m512 (llamafile/sgemm.cpp) and the softmax to 16-lane ggml_v_expf (vec.cpp);
    AVX512_BF16 switches BF16 products to vdpbf16ps. The quantized kernels give the same results on
    AVX2 and AVX-512 hosts (their integer parts are exact and their float order is per lane:
    quants.c, arch/x86/repack.cpp, tiled/tiled-kernel.cpp, checked by tests/runtime/test_matmul.py
    against ggml's own graph). Not emulated: AVX512_FP16 hosts (native fp16 F16 products) and AMX
    hosts (the AMX buffer type takes Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS products); see `unmatched`.
    """

    def __init__(self, avx512: bool, avx512_bf16: bool = False, avx512_fp16: bool = False, amx: bool = False):
        self.avx512 = avx512
        self.avx512_bf16 = avx512_bf16 and avx512
        self.lanes = 16 if avx512 else 8  # softmax chunks (AVX-512F with AVX-512DQ, which every AVX-512 x86 has)
        self.kq_mode = DOT_VEC16 if avx512 else DOT_VEC
        self.unmatched = ([] if not avx512_fp16 else ["F16 products (AVX512_FP16 arithmetic)"]) + (
            [] if not amx else ["Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS products (AMX tiles)"])

    @classmethod
    def host(cls) -> "CpuIsa":
        """This host's kernels, or those named by $GGQUANT_CPU_ISA (avx2 | avx512 | avx512-bf16):
        to check the emulation of another build of llama.cpp (e.g. an AVX2 libggml-cpu) here."""
        forced = os.environ.get("GGQUANT_CPU_ISA", "").lower()
        if forced:
            if forced not in ("avx2", "avx512", "avx512-bf16"):
                raise ValueError(f"GGQUANT_CPU_ISA={forced!r}: expected avx2, avx512 or avx512-bf16")
            return cls(forced != "avx2", forced == "avx512-bf16")
        return cls(_host_has("avx512f"), _host_has("avx512bf16"), _host_has("avx512fp16"), _host_has("amx-int8"))

    @property
    def name(self) -> str:
        return "AVX-512" + (" + BF16" if self.avx512_bf16 else "") if self.avx512 else "AVX2"

    def float_mode(self, qtype, T: int, N: int, K: int) -> int:
        """The dot mode of a float product (weights [N, K] of qtype, T tokens): ggml_vec_dot, or
        tinyBLAS where llamafile_sgemm takes it (T >= 2, K a multiple of its vector step, N of 4:
        tinyBLAS::matmul)."""
        if qtype == _T.BF16 and self.avx512_bf16:
            vec, gemm, step = DOT_BF16_DP, DOT_GEMM_DP, 32
        elif self.avx512:
            vec = {_T.F32: DOT_VEC16, _T.F16: DOT_VEC16_F16, _T.BF16: DOT_BF16_VEC16}[qtype]
            gemm, step = DOT_GEMM16, 16
        else:
            vec = {_T.F32: DOT_VEC, _T.F16: DOT_VEC_F16, _T.BF16: DOT_BF16_VEC8}[qtype]
            gemm, step = DOT_GEMM, 8
        return gemm if T >= 2 and K % step == 0 and N % 4 == 0 else vec


ISA = CpuIsa.host()


# =============================================================================================
# Activation conversion (the vec_dot_type of the weight)
# =============================================================================================


_ROUND_MAGIC = F32(12582912.0)  # 1.5 * 2**23, the constant of ggml-quants.c nearest_int


@nb.njit(inline="always", **JIT)
def _round_small(v):
    """ggml nearest_int (round half to even) for |v| < 2**22, without its bit cast: adding and
    subtracting 1.5 * 2**23 in float32 leaves exactly the integer nearest_int reads back."""
    return np.int32((v + _ROUND_MAGIC) - _ROUND_MAGIC)


@nb.njit(**JIT)
def _quantize_q8_0(x, qs, d):
    """arch/x86/quants.c quantize_row_q8_0 (AVX2 branch), per 32-block of each row.

    d = amax / 127 stored as fp16; the multiplier is 127 / amax (not 1/d); products are
    rounded half to even (_mm256_round_ps _MM_ROUND_NEAREST) and saturated by the packs.
    d here is the fp16 value read back as float32, as ggml's dot products read it.
    """
    T, K = x.shape
    for t in range(T):
        for b in range(K // QK8_0):
            o = b * QK8_0
            amax = F32(0.0)
            for j in range(QK8_0):
                v = abs(x[t, o + j])
                if v > amax:  # _mm256_max_ps: the order of equal maxima does not matter
                    amax = v
            dd = amax / F32(127.0)
            d[t, b] = FP16_TO_FP32[fp32_to_fp16(dd)]  # GGML_CPU_FP32_TO_FP16: round to nearest even
            idd = F32(127.0) / amax if amax != F32(0.0) else F32(0.0)
            for j in range(QK8_0):
                q = _round_small(x[t, o + j] * idd)
                qs[t, o + j] = max(-128, min(127, q))


@nb.njit(**JIT)
def _quantize_q8_K(x, qs, d, bsums):
    """ggml-quants.c quantize_row_q8_K_ref (what x86 runs): per 256-block of each row.

    max = the first element of largest |x|; iscale = -127 / max; q = min(127, nearest_int(iscale
    * x)); d = 1 / iscale in float32; bsums[j] = sum of quants j*16 .. j*16+15.
    """
    T, K = x.shape
    for t in range(T):
        for b in range(K // QK_K):
            o = b * QK_K
            amax = F32(0.0)
            mx = F32(0.0)
            for j in range(QK_K):
                ax = abs(x[t, o + j])
                if ax > amax:
                    amax = ax
                    mx = x[t, o + j]
            if amax == F32(0.0):
                d[t, b] = F32(0.0)
                for j in range(QK_K):
                    qs[t, o + j] = 0
                for j in range(QK_K // 16):
                    bsums[t, b * 16 + j] = 0
                continue
            iscale = F32(-127.0) / mx
            for j in range(QK_K):
                v = _round_small(iscale * x[t, o + j])
                qs[t, o + j] = min(127, v)
            for j in range(QK_K // 16):
                s = 0
                for i in range(16):
                    s += np.int64(qs[t, o + j * 16 + i])
                bsums[t, b * 16 + j] = s
            d[t, b] = F32(1.0) / iscale


def quantize_q8_0(x: np.ndarray):
    """float32 [T, K] -> (qs int8 [T, K], d float32 [T, K/32])."""
    T, K = x.shape
    qs = np.empty((T, K), np.int8)
    d = np.empty((T, K // QK8_0), np.float32)
    _quantize_q8_0(x, qs, d)
    return qs, d


def quantize_q8_K(x: np.ndarray):
    """float32 [T, K] -> (qs int8 [T, K], d float32 [T, K/256], bsums int32 [T, K/16])."""
    T, K = x.shape
    qs = np.empty((T, K), np.int8)
    d = np.empty((T, K // QK_K), np.float32)
    bs = np.empty((T, K // 16), np.int32)
    _quantize_q8_K(x, qs, d, bs)
    return qs, d, bs


def round_f16(x: np.ndarray) -> np.ndarray:
    """Activation as ggml_cpu_fp32_to_fp16 leaves it (round to nearest even), read back."""
    with np.errstate(over="ignore"):  # beyond fp16 range -> inf, as ggml
        return x.astype(np.float16).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16 (round to nearest even; NaN kept quiet), read back as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    r = np.where(nan, (u >> np.uint32(16)) | np.uint32(64), r)
    return (r.astype(np.uint32) << np.uint32(16)).view(np.float32)


def convert_activation(qtype, x: np.ndarray):
    """x converted to the vec_dot_type of weights of type qtype (a tuple the kernels take)."""
    vt = VEC_DOT_TYPE[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if vt == _T.Q8_0:
        return quantize_q8_0(x)
    if vt == _T.Q8_K:
        return quantize_q8_K(x)
    if vt == _T.F16:
        return (round_f16(x),)
    if vt == _T.BF16:
        return (round_bf16(x),)
    return (x,)


# =============================================================================================
# Matrix products per weight type. w: uint8 [N, row_bytes] (GGUF rows); out: float32 [T, N].
# =============================================================================================


@nb.njit(parallel=True, **JIT)
def _mm_float(w, x, out, kind, mode):
    """Float weights times float activations, one ggml_vec_dot / tinyBLAS order (`mode`) for all.

    kind 0: F32 weights (w float32 [N, K]); 1: F16 (w uint16, x already rounded to fp16);
    2: BF16 (w uint16, x already rounded to bf16). Rows are widened to float32 per chunk."""
    N, K = w.shape
    T = x.shape[0]
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        wf = np.empty((ROWS if kind != 0 else 0, K), np.float32)
        wb = wf.view(np.uint32)
        for r in range(r0, r1):
            for k in range(K if kind != 0 else 0):
                if kind == 1:
                    wf[r - r0, k] = FP16_TO_FP32[w[r, k]]
                else:
                    wb[r - r0, k] = np.uint32(w[r, k]) << np.uint32(16)
        for t in range(T):
            xt = x[t]
            for r in range(r0, r1):
                row = w[r].view(np.float32) if kind == 0 else wf[r - r0]
                out[t, r] = dot_f32(row, 0, xt, 0, K, mode)


@nb.njit(parallel=True, **JIT)
def _mm_q8_0(w, xq, xd, out):
    """Q8_0 x Q8_0 (ggml_vec_dot_q8_0_q8_0), dotted in place: no unpacking."""
    N = w.shape[0]
    T, K = xq.shape
    nb_ = K // QK8_0
    if T == 1:  # decode: every weight byte is used once, read the blocks in place
        for c in nb.prange((N + ROWS - 1) // ROWS):
            for r in range(c * ROWS, min(N, c * ROWS + ROWS)):
                out[0, r] = dot_row_q8_0(w[r], 0, xq[0], 0, xd[0], 0, nb_)
        return
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        dw = np.empty((ROWS, nb_), np.float32)
        for r in range(r0, r1):
            for b in range(nb_):
                dw[r - r0, b] = FP16_TO_FP32[get_u16(w[r], b * Q8_0_BYTES)]
        for t in range(T):
            xt = xq[t]
            xdt = xd[t]
            for r in range(r0, r1):
                out[t, r] = dot_blocks_q8(w[r], 2, Q8_0_BYTES, xt, 0, dw[r - r0], 0, xdt, 0, nb_)


@nb.njit(**JIT)
def _dot_q0_rows(q, dw, xq, xd, out, r0, r1):
    """Shared tail of Q4_0 / Q5_0: unpacked int8 quants q [ROWS, K] x Q8_0 activations."""
    T, K = xq.shape
    nb_ = K // QK8_0
    for t in range(T):
        xt = xq[t]
        xdt = xd[t]
        for r in range(r0, r1):
            out[t, r] = dot_blocks_q8(q[r - r0], 0, QK8_0, xt, 0, dw[r - r0], 0, xdt, 0, nb_)


@nb.njit(parallel=True, **JIT)
def _mm_q4_0(w, xq, xd, out):
    """Q4_0 x Q8_0: quants (nibble - 8).

    With a multiple of 8 rows llama.cpp repacks the weights (CPU_REPACK, q4_0_8x8:
    arch/x86/repack.cpp gemv/gemm_q4_b32_8x8_q8_0_lut_avx): each output is one float lane,
    acc = fma(float(sum of a block's 32 products), d_w * d_x, acc) block after block. Otherwise
    ggml_vec_dot_q4_0_q8_0 (8 lanes per block, dot_blocks_q8)."""
    N = w.shape[0]
    T, K = xq.shape
    nb_ = K // QK8_0
    repacked = N % 8 == 0
    if T == 1 and not repacked:
        for c in nb.prange((N + ROWS - 1) // ROWS):
            for r in range(c * ROWS, min(N, c * ROWS + ROWS)):
                out[0, r] = dot_row_q4_0(w[r], 0, xq[0], 0, xd[0], 0, nb_)
        return
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.int8)
        dw = np.empty((ROWS, nb_), np.float32)
        for r in range(r0, r1):
            wr = w[r]
            for b in range(nb_):
                o = b * Q4_0_BYTES
                dw[r - r0, b] = FP16_TO_FP32[get_u16(wr, o)]
                unpack32_q0(wr, o + 2, 0, 8, q[r - r0], b * QK8_0)
        if not repacked:
            _dot_q0_rows(q, dw, xq, xd, out, r0, r1)
            continue
        for t in range(T):
            for r in range(r0, r1):
                acc = F32(0.0)
                for b in range(nb_):
                    isum = dot_i16_i8(q[r - r0], b * QK8_0, xq[t], b * QK8_0, QK8_0)
                    acc = fmaf(F32(isum), dw[r - r0, b] * xd[t, b], acc)
                out[t, r] = acc


@nb.njit(parallel=True, **JIT)
def _mm_q5_0(w, xq, xd, out):
    """Q5_0 x Q8_0 (ggml_vec_dot_q5_0_q8_0): quants (nibble | qh bit << 4) - 16."""
    N = w.shape[0]
    T, K = xq.shape
    nb_ = K // QK8_0
    if T == 1:
        for c in nb.prange((N + ROWS - 1) // ROWS):
            for r in range(c * ROWS, min(N, c * ROWS + ROWS)):
                out[0, r] = dot_row_q5_0(w[r], 0, xq[0], 0, xd[0], 0, nb_)
        return
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.int8)
        dw = np.empty((ROWS, nb_), np.float32)
        for r in range(r0, r1):
            wr = w[r]
            for b in range(nb_):
                o = b * Q5_0_BYTES
                dw[r - r0, b] = FP16_TO_FP32[get_u16(wr, o)]
                qh = (np.uint32(wr[o + 2]) | (np.uint32(wr[o + 3]) << np.uint32(8)) |
                      (np.uint32(wr[o + 4]) << np.uint32(16)) | (np.uint32(wr[o + 5]) << np.uint32(24)))
                unpack32_q0(wr, o + 6, qh, 16, q[r - r0], b * QK8_0)
        _dot_q0_rows(q, dw, xq, xd, out, r0, r1)


TILED_MIN_BATCH = 8  # tiled/tiled.cpp ggml_tiled_min_batch: the tiled k-quant kernel takes batches >= 8


@nb.njit(**JIT)
def _dot_k_rows(q, sv, mn, dw, dmw, xq, xd, xbs, out, r0, r1, repacked, is_q5):
    """Q4_K / Q5_K rows (unsigned quants q, scales expanded to 16 int16 per 32 quants in sv, 6-bit
    mins mn per 32) x Q8_K activations.

    Integers are exact: S1 = sum_k sc(k) q_k x_k, S2 = sum_j m_j (bsum_2j + bsum_2j+1) over a
    super-block, or over one pair of sub-blocks (64 quants). The float combination follows the
    kernel llama.cpp runs (xbs: the 16 bsums of each super-block of token t):

    repacked (Q4_K with a multiple of 8 rows, arch/x86/repack.cpp): tokens in groups of four go
        through ggml_gemm_q4_K_8x8_q8_K, which accumulates per pair of sub-blocks,
            acc = fma(float(S1_pair), d_w * d_x, acc);  acc_m = fma(float(S2_pair), dmin_w * d_x, acc_m)
        and the T % 4 last tokens through ggml_gemv_q4_K_8x8_q8_K, the same per super-block;
        the result is acc - acc_m.
    batches of >= 8 tokens (tiled/tiled-kernel.cpp, AVX2 and AVX512-VNNI microtiles alike):
        res = fnmadd(dmin_w, float(S2), d_w * float(S1));  acc = fma(res, d_x, acc)
    smaller batches (arch/x86/quants.c ggml_vec_dot_q4_K_q8_K / q5_K_q8_K): S1 in 8 int32 lanes per
        super-block, fused-multiply-added by d = d_x * d_w into 8 float lanes (hsum_float_8 at the
        end); the mins term -d_x * dmin_w * S2 in 4 float lanes (Q4_K: products of pairs of mins,
        movehl-summed) or in one float added per super-block (Q5_K).
    """
    T, K = xq.shape
    nsb = K // QK_K
    n_gemm = T - T % 4
    tiled = T >= TILED_MIN_BATCH
    zero_corr = np.zeros(nsb * 8, np.int32)
    dsc = np.empty(nsb, np.float32)
    for t in range(T):
        xt = xq[t]
        for r in range(r0, r1):
            i = r - r0
            qr = q[i]
            sr = sv[i]
            if not repacked and not tiled:
                acc_m = np.zeros(4, np.float32)
                summs = F32(0.0)
                for s in range(nsb):
                    dsc[s] = xd[t, s] * dw[i, s]
                    dmin = -xd[t, s] * dmw[i, s]
                    isum = 0
                    for l in range(4):
                        p = 0
                        for j in range(2 * l, 2 * l + 2):
                            p += np.int32(mn[i, s * 8 + j]) * (xbs[t, s * 16 + 2 * j] + xbs[t, s * 16 + 2 * j + 1])
                        acc_m[l] = fmaf(dmin, F32(p), acc_m[l])
                        isum += p
                    summs = fmaf(dmin, F32(isum), summs)
                mins = summs if is_q5 else (acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3])
                out[t, r] = dot_q6k_lanes(qr, 0, xt, 0, sr, 0, zero_corr, 0, dsc, 0, nsb) + mins
                continue
            acc = F32(0.0)
            acc_m = F32(0.0)
            for s in range(nsb):
                o = s * QK_K
                if repacked and t < n_gemm:
                    for p in range(4):
                        sumi = dot_kqv_u(qr, o + 64 * p, xt, o + 64 * p, sr, (s * 8 + 2 * p) * 16, 2)
                        summs = 0
                        for j in range(2 * p, 2 * p + 2):
                            bsum = np.int64(xbs[t, s * 16 + 2 * j]) + np.int64(xbs[t, s * 16 + 2 * j + 1])
                            summs += np.int64(mn[i, s * 8 + j]) * bsum
                        acc = fmaf(F32(sumi), dw[i, s] * xd[t, s], acc)
                        acc_m = fmaf(F32(summs), dmw[i, s] * xd[t, s], acc_m)
                    continue
                sumi = dot_kqv_u(qr, o, xt, o, sr, s * 128, 8)
                summs = 0
                for j in range(8):
                    bsum = np.int64(xbs[t, s * 16 + 2 * j]) + np.int64(xbs[t, s * 16 + 2 * j + 1])
                    summs += np.int64(mn[i, s * 8 + j]) * bsum
                if repacked:
                    acc = fmaf(F32(sumi), dw[i, s] * xd[t, s], acc)
                    acc_m = fmaf(F32(summs), dmw[i, s] * xd[t, s], acc_m)
                else:
                    res = fmaf(-dmw[i, s], F32(summs), dw[i, s] * F32(sumi))
                    acc = fmaf(res, xd[t, s], acc)
            out[t, r] = acc - acc_m


@nb.njit(**JIT)
def _unpack_k45(wr, q, sv, mn, dw, dmw, i, nsb, qs_off, has_qh, block_bytes):
    """One Q4_K / Q5_K row into unsigned quants, expanded scales and mins (get_scale_min_k4)."""
    for s in range(nsb):
        o = s * block_bytes
        dw[i, s] = FP16_TO_FP32[get_u16(wr, o)]
        dmw[i, s] = FP16_TO_FP32[get_u16(wr, o + 2)]
        for j in range(8):
            sc, m = get_scale_min_k4(j, wr, o + 4)
            store_splat16(sv[i], s * 128 + 16 * j, sc)
            mn[i, s * 8 + j] = m
        qh = o + 16
        for j in range(4):  # 32 bytes of qs: low nibbles -> sub-block 2j, high -> 2j+1 (+ qh bits 2j, 2j+1)
            src = o + qs_off + 32 * j
            if has_qh:
                unpack32_kq(wr, src, 0, qh, 2 * j, 1, q[i], s * QK_K + 64 * j)
                unpack32_kq(wr, src, 4, qh, 2 * j + 1, 1, q[i], s * QK_K + 64 * j + 32)
            else:
                unpack32_kq(wr, src, 0, src, 0, 0, q[i], s * QK_K + 64 * j)
                unpack32_kq(wr, src, 4, src, 0, 0, q[i], s * QK_K + 64 * j + 32)


@nb.njit(parallel=True, **JIT)
def _mm_q45_K(w, xq, xd, xbs, out, is_q5):
    N = w.shape[0]
    K = xq.shape[1]
    nsb = K // QK_K
    block_bytes = Q5_K_BYTES if is_q5 else Q4_K_BYTES
    qs_off = 48 if is_q5 else 16
    repacked = (not is_q5) and N % 8 == 0  # llama.cpp repacks Q4_K (q4_K_8x8) on AVX2, not Q5_K
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.uint8)
        sv = np.empty((ROWS, K // 2), np.int16)
        mn = np.empty((ROWS, nsb * 8), np.int32)
        dw = np.empty((ROWS, nsb), np.float32)
        dmw = np.empty((ROWS, nsb), np.float32)
        for r in range(r0, r1):
            _unpack_k45(w[r], q, sv, mn, dw, dmw, r - r0, nsb, qs_off, is_q5, block_bytes)
        _dot_k_rows(q, sv, mn, dw, dmw, xq, xd, xbs, out, r0, r1, repacked, is_q5)


@nb.njit(parallel=True, **JIT)
def _mm_q6_K(w, xq, xd, xbs, out):
    """Q6_K x Q8_K. Batches of fewer than 8 tokens: the lane order of ggml_vec_dot_q6_K_q8_K (AVX2),
    unsigned quants (0..63) times their int8 scales and the -32 offset subtracted through the bsums
    per lane; larger batches: the tiled kernel's order (tiled_run_microtile_avx2 without mins,
    acc = fma(d_w * float(S1), d_x, acc), S1 exact over the super-block with signed quants)."""
    N = w.shape[0]
    T, K = xq.shape
    nsb = K // QK_K
    tiled = T >= TILED_MIN_BATCH
    for c in nb.prange((N + ROWS - 1) // ROWS):
        r0 = c * ROWS
        r1 = min(N, r0 + ROWS)
        q = np.empty((ROWS, K), np.uint8)
        sv = np.empty((ROWS, K // 2), np.int16)
        scl = np.empty((ROWS, nsb * 16), np.int64)
        dw = np.empty((ROWS, nsb), np.float32)
        corr = np.empty(nsb * 8, np.int32)
        dsc = np.empty(nsb, np.float32)
        for r in range(r0, r1):
            i = r - r0
            wr = w[r]
            for s in range(nsb):
                o = s * Q6_K_BYTES
                dw[i, s] = FP16_TO_FP32[get_u16(wr, o + 208)]
                for g in range(16):
                    v = np.int8(wr[o + 192 + g])
                    scl[i, s * 16 + g] = v
                    # chunk g // 2 holds scales g (bytes 0..15) and g + 1 (16..31): 8 int16 lanes each
                    for k in range(8):
                        sv[i, s * 128 + 8 * g + k] = v
                for h in range(2):  # two halves of 128 values: ql[64], qh[32] each
                    ql = o + 64 * h
                    qh = o + 128 + 32 * h
                    for g in range(4):  # ql byte half g // 2, qh bits 2g..2g+1
                        unpack32_kq(wr, ql + 32 * (g % 2), 4 * (g // 2), qh, 2 * g, 3, q[i], s * QK_K + 128 * h + 32 * g)
            if tiled:
                for k in range(K):  # signed quants (q - 32), as bytes
                    q[i, k] = q[i, k] - np.uint8(32)
        for t in range(T):
            xt = xq[t]
            for r in range(r0, r1):
                i = r - r0
                if tiled:
                    acc = F32(0.0)
                    for s in range(nsb):
                        sumi = dot_kqv_s(q[i], s * QK_K, xt, s * QK_K, sv[i], s * 128, 8)
                        acc = fmaf(dw[i, s] * F32(sumi), xd[t, s], acc)
                    out[t, r] = acc
                    continue
                for s in range(nsb):
                    dsc[s] = xd[t, s] * dw[i, s]  # y.d * GGML_CPU_FP16_TO_FP32(x.d)
                    for m in range(8):
                        v = (np.int64(xbs[t, s * 16 + 2 * m]) * scl[i, s * 16 + 2 * m] +
                             np.int64(xbs[t, s * 16 + 2 * m + 1]) * scl[i, s * 16 + 2 * m + 1])
                        corr[s * 8 + m] = v * 32
                out[t, r] = dot_q6k_lanes(q[i], 0, xt, 0, sv[i], 0, corr, 0, dsc, 0, nsb)


# =============================================================================================
# Entry points
# =============================================================================================


def _check(w: np.ndarray, qtype, K: int, N: int | None = None):
    if qtype not in SUPPORTED:
        raise ValueError(f"matmul: weights of type {qtype.name} are not supported "
                         f"(supported: {', '.join(t.name for t in SUPPORTED)})")
    block, size = GGML_QUANT_SIZES[qtype]
    if K % block:
        raise ValueError(f"matmul: row length {K} is not a multiple of the {qtype.name} block size {block}")
    if w.dtype != np.uint8 or w.ndim != 2 or w.shape[1] != K // block * size:
        raise ValueError(f"matmul: expected {qtype.name} weights as uint8 [N, {K // block * size}], "
                         f"got {w.dtype} {w.shape}")


def matmul_converted(w: np.ndarray, qtype, xc: tuple, out: np.ndarray | None = None,
                     check: bool = True) -> np.ndarray:
    """y = x @ W^T where xc = convert_activation(qtype, x) (share it between weights with one input).

    check=False skips the shape checks (for callers that validated w once, e.g. at model load)."""
    K = xc[0].shape[1]
    T = xc[0].shape[0]
    if check:
        _check(w, qtype, K)
    N = w.shape[0]
    if out is None:
        out = np.empty((T, N), np.float32)
    if qtype in FLOAT_KIND:
        kind = FLOAT_KIND[qtype]
        _mm_float(w.view(np.uint32 if kind == 0 else np.uint16), xc[0], out, kind, ISA.float_mode(qtype, T, N, K))
    elif qtype == _T.Q8_0:
        _mm_q8_0(w, xc[0], xc[1], out)
    elif qtype == _T.Q4_0:
        _mm_q4_0(w, xc[0], xc[1], out)
    elif qtype == _T.Q5_0:
        _mm_q5_0(w, xc[0], xc[1], out)
    elif qtype == _T.Q4_K:
        _mm_q45_K(w, xc[0], xc[1], xc[2], out, False)
    elif qtype == _T.Q5_K:
        _mm_q45_K(w, xc[0], xc[1], xc[2], out, True)
    elif qtype == _T.Q6_K:
        _mm_q6_K(w, xc[0], xc[1], xc[2], out)
    return out


def matmul(w: np.ndarray, qtype, x: np.ndarray, out: np.ndarray | None = None, check: bool = True) -> np.ndarray:
    """float32 x [T, K] times GGML weights w (uint8 [N, row_bytes] of type qtype), transposed: [T, N]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if check:
        if x.ndim != 2:
            raise ValueError(f"matmul: x must be [T, K], got shape {x.shape}")
        _check(w, qtype, x.shape[1])
    return matmul_converted(w, qtype, convert_activation(qtype, x), out, check=False)


# =============================================================================================
# Attention products (llama.cpp's non-flash path, F32 KV cache)
# =============================================================================================


@intrinsic
def _f32_as_u32(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _I32)

    return sig, codegen


@intrinsic
def _u32_as_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _F32)

    return sig, codegen


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
    e = _f32_as_u32(z) << np.uint32(23)
    k = _u32_as_f32(e + _ONE_BITS)
    u = b * b
    j = fmaf(fmaf(fmaf(_EXP_C5, b, _EXP_C4), u, fmaf(_EXP_C3, b, _EXP_C2)), u, _EXP_C1 * b)
    if not abs(n) > F32(126.0):
        return fmaf(j, k, k)
    g = np.uint32(0x82000000) if n <= F32(0.0) else np.uint32(0)
    s1 = _u32_as_f32(g + np.uint32(0x7F000000))
    if abs(n) > F32(192.0):
        return s1 * s1
    s2 = _u32_as_f32(e - g)
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
        total += np.float64((h0 + h2) + (h1 + h3))
    inv = F32(1.0 / total)
    for i in range(n):
        w[i] = w[i] * inv


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
def rope_cache(pos, half, theta_scale, freq_scale, freq_factors, cos_out, sin_out):
    """ggml_rope_cache_init with ext_factor 0 and mscale 1: theta starts at the position and is
    multiplied by theta_scale after each pair in float32; freq factors divide it; cos/sin are the
    C library's cosf/sinf (what numba's math.cos on float32 calls). freq_factors: empty for none."""
    use_ff = freq_factors.shape[0] > 0
    theta_scale = F32(theta_scale)
    freq_scale = F32(freq_scale)
    for t in range(pos.shape[0]):
        theta = F32(pos[t])
        for i in range(half):
            th = theta / freq_factors[i] if use_ff else theta
            th = freq_scale * th
            cos_out[t, i] = F32(math.cos(th))
            sin_out[t, i] = F32(math.sin(th))
            theta = theta * theta_scale


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
