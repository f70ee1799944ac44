"""LLVM vector primitives of the CPU kernels (numba @intrinsic), in the operation order of ggml's.

Speed: LLVM does not vectorize numba's fixed-length 32-element dot loops (it unrolls them and
the SLP vectorizer gives up), which left the int8 dot at ~1 GMAC/s. The few hot primitives are
therefore written as LLVM vector IR through numba's @intrinsic: integer dots (sext, mul, add of
even/odd lanes, which the x86 backend turns into vpmaddwd), a block-scaled Q8 dot that keeps 8
float lanes like ggml's AVX2 code, the unpackers of 4/5/6-bit quants, and a float32 dot with
4 x 8 lanes of llvm.fma (the shape of ggml_vec_dot_f32 on AVX2). None of this is fastmath: every operation and its order is
spelled out, so results are deterministic.

The float32 dot (dot_f32) follows one of ggml's float kernels per call, its *mode* (DOT_VEC,
DOT_GEMM, ...); matmul.CpuIsa picks the mode llama.cpp runs on this host.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_T = GGMLQuantizationType
QK8_0 = GGML_QUANT_SIZES[_T.Q8_0][0]  # 32 values per Q8_0 / Q4_0 / Q5_0 block
QK_K = GGML_QUANT_SIZES[_T.Q8_K][0]  # 256 values per k-quant super-block
Q4_0_BYTES = GGML_QUANT_SIZES[_T.Q4_0][1]  # d fp16 | qs[16]
Q5_0_BYTES = GGML_QUANT_SIZES[_T.Q5_0][1]  # d fp16 | qh u32 | qs[16]
Q8_0_BYTES = GGML_QUANT_SIZES[_T.Q8_0][1]  # d fp16 | qs[32] int8

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


def host_has(feature: str) -> bool:
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get(feature, False))
    except Exception:  # pragma: no cover - exotic llvmlite builds
        return False


# With AVX2 the byte products go through the instructions ggml itself uses (vpsignb, vpmaddubsw,
# vpmaddwd): twice the work per instruction of widening to 16 bits first. The results are the same
# integers either way (|products| stay far from the 16-bit saturation of vpmaddubsw here).
HAS_AVX2 = host_has("avx2")


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


def _make_dot_lanes(signed: bool, has_corr: bool):
    """The super-block lane dot of ggml's AVX2 k- and i-quant vec_dots: per super-block, 8 int32
    lanes (lane m = the scaled products 4m .. 4m+3 of each 32-quant chunk; sv: 16 int16 scales per
    chunk, one per byte pair), minus corr[8 s + m] (has_corr), converted to float and fused-multiply-
    added by d = dsc[s] into 8 float lanes; hsum_float_8 at the end. Unsigned quants (0..63) go
    through vpmaddubsw as they are, signed ones (int8) through ggml's sign trick (mul_add_epi8); the
    integers are exact either way."""

    def codegen_dot(context, builder, signature, args):
        st = signature.args
        i16 = ir.IntType(16)
        pq = _elem_ptr(context, builder, st[0], args[0], args[1], _I8, st[1])
        px = _elem_ptr(context, builder, st[2], args[2], args[3], _I8, st[3])
        ps = _elem_ptr(context, builder, st[4], args[4], args[5], i16, st[5])
        k = 6
        if has_corr:
            pc = _elem_ptr(context, builder, st[6], args[6], args[7], _I32, st[7])
            k = 8
        pd = _elem_ptr(context, builder, st[k], args[k], args[k + 1], _F32, st[k + 1])
        n = context.cast(builder, args[k + 2], st[k + 2], types.intp)
        intp = n.type
        v32 = ir.VectorType(_I8, 32)
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
                scv = _load_vec(builder, builder.gep(ps, [builder.add(builder.mul(s, ir.Constant(intp, 128)),
                                                                       ir.Constant(intp, 16 * c))]), i16, 16)
                if signed and HAS_AVX2:  # |q| times x with q's sign (mul_add_epi8), then the scales
                    qv = _load_vec(builder, builder.gep(pq, [off]), _I8, 32)
                    xv = _load_vec(builder, builder.gep(px, [off]), _I8, 32)
                    aq = _x86(builder, "llvm.x86.avx2.psign.b", v32, [qv, qv])
                    sx = _x86(builder, "llvm.x86.avx2.psign.b", v32, [xv, qv])
                    p16 = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(i16, 16), [aq, sx])
                    cl = _x86(builder, "llvm.x86.avx2.pmadd.wd", v8, [p16, scv])
                else:
                    cl = _kq_chunk_lanes(builder, pq, px, off, scv, signed)
                lanes = builder.add(lanes, cl)
            if has_corr:
                cv = _load_vec(builder, builder.gep(pc, [builder.mul(s, ir.Constant(intp, 8))]), _I32, 8)
                lanes = builder.sub(lanes, cv)
            d = _splat(builder, builder.load(builder.gep(pd, [s])), 8)
            builder.store(builder.call(fma8, [d, builder.sitofp(lanes, v8f), builder.load(acc)]), acc)
        return _hsum_movehl(builder, builder.load(acc))

    if has_corr:
        @intrinsic
        def dot(typingctx, q, iq, x, ix, sv, isv, corr, ic, dsc, ids, nsb):
            if not (_is_int8_array(q) and _is_int8_array(x)):
                return None
            u = types.unliteral
            return types.float32(q, u(iq), x, u(ix), sv, u(isv), corr, u(ic), dsc, u(ids), u(nsb)), codegen_dot
    else:
        @intrinsic
        def dot(typingctx, q, iq, x, ix, sv, isv, dsc, ids, nsb):
            if not (_is_int8_array(q) and _is_int8_array(x)):
                return None
            u = types.unliteral
            return types.float32(q, u(iq), x, u(ix), sv, u(isv), dsc, u(ids), u(nsb)), codegen_dot
    return dot


# ggml_vec_dot_q6_K_q8_K (unsigned 6-bit quants, corr[8 s + m] = 32 * (bsum[2m] sc[2m] + bsum[2m+1]
# sc[2m+1])) and the TQ1_0 / TQ2_0 vec_dots (codes 0..2, unit scales, corr = bsum[2m] + bsum[2m+1])
dot_q6k_lanes = _make_dot_lanes(signed=False, has_corr=True)
# the i-quant vec_dots (ggml_vec_dot_iq2_xxs_q8_K ... iq1_m, iq4_xs): signed grid / table values
dot_lanes_s = _make_dot_lanes(signed=True, has_corr=False)


def _block_lanes(builder, pq, px, off):
    """<8 x i32> lanes of the 32 products int8 q[off+k] * int8 x[off+k] (lane m: products 4m .. 4m+3)."""
    return _madd32_lanes(builder, pq, _I8, px, off)


def _make_dot_b32(mode: int):
    """Rows of 32-value blocks (signed int8 values q, unpacked) times Q8_0 activations, in the float
    order of one of ggml's AVX2 vec_dots (arch/x86/quants.c); sc: float32, 2 per block.

    mode 0 (ggml_vec_dot_iq4_nl_q8_0 / mxfp4_q8_0): blocks in pairs, even blocks fused-multiply-added
        into acc1, odd into acc2, by sc[2b] = d_x * d_w; hsum_float_8(acc1 + acc2). nblocks even.
    mode 1 (ggml_vec_dot_nvfp4_q8_0): one acc; lanes 0-3 scaled by sc[2b], lanes 4-7 by sc[2b+1]
        (one UE4M3 scale per 16 values).
    mode 2 (ggml_vec_dot_q1_0_q8_0): groups of 4 blocks (128 values): accb = sc[2b] * lanes (a plain
        multiply for the first block, fused-multiply-adds for the other three: sc[2b] = d_x of the
        block), then acc = fma(d_w, accb, acc) with d_w = sc[2b + 1] of the group's first block.
    """

    @intrinsic
    def dot_b32(typingctx, q, iq, x, ix, sc, isc, nblocks):
        if not (_is_int8_array(q) and _is_int8_array(x)):
            return None
        u = types.unliteral
        sig = types.float32(q, u(iq), x, u(ix), sc, u(isc), u(nblocks))

        def codegen(context, builder, signature, args):
            st = signature.args
            pq = _elem_ptr(context, builder, st[0], args[0], args[1], _I8, st[1])
            px = _elem_ptr(context, builder, st[2], args[2], args[3], _I8, st[3])
            ps = _elem_ptr(context, builder, st[4], args[4], args[5], _F32, st[5])
            n = context.cast(builder, args[6], st[6], types.intp)
            intp = n.type
            v8f = ir.VectorType(_F32, 8)
            fma8 = _fma_fn(builder, v8f, "llvm.fma.v8f32")
            zero = ir.Constant(v8f, [0.0] * 8)
            acc1 = cgutils.alloca_once_value(builder, zero)
            acc2 = cgutils.alloca_once_value(builder, zero)

            def lanes_f(b):
                off = builder.mul(b, ir.Constant(intp, 32))
                return builder.sitofp(_block_lanes(builder, pq, px, off), v8f)

            def scale(i):
                return builder.load(builder.gep(ps, [i]))

            if mode == 0:
                with cgutils.for_range(builder, builder.sdiv(n, ir.Constant(intp, 2))) as loop:
                    b0 = builder.mul(loop.index, ir.Constant(intp, 2))
                    b1 = builder.add(b0, ir.Constant(intp, 1))
                    s0 = _splat(builder, scale(builder.mul(b0, ir.Constant(intp, 2))), 8)
                    s1 = _splat(builder, scale(builder.mul(b1, ir.Constant(intp, 2))), 8)
                    builder.store(builder.call(fma8, [s0, lanes_f(b0), builder.load(acc1)]), acc1)
                    builder.store(builder.call(fma8, [s1, lanes_f(b1), builder.load(acc2)]), acc2)
                return _hsum_movehl(builder, builder.fadd(builder.load(acc1), builder.load(acc2)))
            if mode == 1:
                with cgutils.for_range(builder, n) as loop:
                    b = loop.index
                    i0 = builder.mul(b, ir.Constant(intp, 2))
                    lo = _splat(builder, scale(i0), 8)
                    hi = _splat(builder, scale(builder.add(i0, ir.Constant(intp, 1))), 8)
                    sv = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 8), [0, 1, 2, 3, 12, 13, 14, 15]))
                    builder.store(builder.call(fma8, [sv, lanes_f(b), builder.load(acc1)]), acc1)
                return _hsum_movehl(builder, builder.load(acc1))
            # mode 2
            with cgutils.for_range(builder, builder.sdiv(n, ir.Constant(intp, 4))) as loop:
                b0 = builder.mul(loop.index, ir.Constant(intp, 4))
                accb = builder.fmul(_splat(builder, scale(builder.mul(b0, ir.Constant(intp, 2))), 8), lanes_f(b0))
                for k in range(1, 4):
                    b = builder.add(b0, ir.Constant(intp, k))
                    accb = builder.call(fma8, [_splat(builder, scale(builder.mul(b, ir.Constant(intp, 2))), 8),
                                               lanes_f(b), accb])
                dw = _splat(builder, scale(builder.add(builder.mul(b0, ir.Constant(intp, 2)), ir.Constant(intp, 1))), 8)
                builder.store(builder.call(fma8, [dw, accb, builder.load(acc1)]), acc1)
            return _hsum_movehl(builder, builder.load(acc1))

        return sig, codegen

    return dot_b32


dot_b32_pairs = _make_dot_b32(0)
dot_b32_halves = _make_dot_b32(1)
dot_b32_q1_0 = _make_dot_b32(2)


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
        # `sumf += x[i]*y[i]` as GCC builds it: float sumf: an in-order reduction vectorized (products
        # rounded, then added one by one) and a scalar tail contracted into fma; vectorized 8 wide in
        # the AVX-512 build, 8 then 4 wide in the AVX2 one (measured against each build's ggml for
        # every n % 64 and n % 32); double sumf: the float product widened, then added
        vw = ir.Constant(intp, 8 if lanes == 16 else 4)
        n_mul = builder.mul(builder.sdiv(m, vw), vw)
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



KV_STEP = 64  # the largest step of a dot mode over keys (DOT_VEC16: 4 x 16 lanes)
