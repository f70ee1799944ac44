"""Scale-search procedures shared by the legacy quants and the k-quants, bit-exact with ggml.

Ports of the static helpers in ggml/src/ggml-quants.c: ``make_qx_quants``, ``make_q3_quants``,
``make_qkx2_quants``, ``make_qkx3_quants`` and ``make_qp_quants`` (plus ``nearest_int``,
``get_scale_min_k4`` and the C integer-conversion corner cases the quantizers rely on).

Conventions that keep the results bit-identical with the C reference:

* Every float is float32 and every accumulation runs sequentially in the C loop order
  (no ``np.sum``/``np.dot``, which reorder); integers that C converts to float are wrapped
  in ``F32(...)`` so numba never promotes to float64; C expressions keep their left-to-right
  association, e.g. ``w*x*l`` is ``(w*x)*l``.
* Comparisons are the C ones (strict ``<``/``>``; ``MAX(a, b)`` is ``a > b ? a : b``), which
  also decides what happens with NaN (a NaN is "true" in C's ``d ? ... : ...`` tests).
* C pointers into a block become (array, offset) pairs: ``x[xo + i]`` is C's ``x[i]`` where
  the caller passed ``x + xo`` (a search takes one view of its block per call, never per
  element).
* ``error_model="numpy"`` gives IEEE division (1/0 = inf, 0/0 = NaN) like C instead of
  Python's ZeroDivisionError. fastmath stays off (no FMA contraction: libggml-base is built
  without it, see shared/research/imatrix-and-quants.md §2.6).

Speed (the searches are most of the quantizers' time), without changing a single float op:

* Callers pass preallocated scratch (``WORK_FLOATS``/``WORK_INTS``); nothing allocates per call.
* Each trial computes its integer levels and the per-element products in a loop without
  reductions (LLVM vectorizes it), then adds the products in index order, as GCC does with
  the C. numba keeps LLVM's SLP vectorizer off, so this split has to be written out.
* A trial whose levels equal the previous trial's is skipped: its sums are bit-identical, so
  the C's acceptance test cannot change any state (argued at each skip).
"""

import numba as nb
import numpy as np
from numba import types

from . import common
from .common import GROUP_MAX_EPS, JIT, ROUND_MAGIC

F32 = np.float32


# Plain (not IR-inlined) entry points to the shared fp16 / byte helpers of common.py, which are
# inline="always": expanding them at every call site made the block functions take 10+ s each
# to compile. LLVM still inlines these small functions into their callers.
@nb.njit(**JIT)
def fp32_to_fp16(f):
    return common.fp32_to_fp16(f)


@nb.njit(**JIT)
def fp16_to_fp32(h):
    return common.fp16_to_fp32(h)


@nb.njit(**JIT)
def put_u16(out, pos, h):
    common.put_u16(out, pos, h)


@nb.njit(**JIT)
def get_u16(buf, pos):
    return common.get_u16(buf, pos)

# Explicit signatures for the searches: one compiled version each, whatever constants the call
# sites pass (numba would otherwise compile a specialisation per literal argument combination,
# several seconds each).
_f32a, _i8a, _u8a, _i32a = types.float32[::1], types.int8[::1], types.uint8[::1], types.int32[::1]
_i64, _b = types.int64, types.boolean
SIG_QX = types.float32(_i64, _i64, _f32a, _i64, _i8a, _i64, _i64, _f32a, _i64, _b, _f32a, _i32a)
SIG_Q3 = types.float32(_i64, _i64, _f32a, _i64, _i8a, _i64, _b)
SIG_QKX = types.UniTuple(types.float32, 2)(
    _i64, _i64, _f32a, _i64, _f32a, _i64, _b, _u8a, _i64, _u8a, types.float32, types.float32, _i64, _b, _b, _f32a
)
SIG_QP = types.float32(_i64, _i64, _f32a, _i64, _u8a, _i64, _f32a, _i64, _f32a)
SIG_QKX2 = types.UniTuple(types.float32, 2)(
    _i64, _i64, _f32a, _i64, _f32a, _i64, _u8a, _i64, _u8a, types.float32, types.float32, _i64, _b, _f32a
)
SIG_QKX3 = types.UniTuple(types.float32, 2)(
    _i64, _i64, _f32a, _i64, _f32a, _i64, _b, _u8a, _i64, _u8a, types.float32, types.float32, _i64, _b, _f32a
)

_I32_LIMIT = F32(2147483648.0)  # 2**31, exactly representable


@nb.njit(**JIT)
def nearest_int(fval):
    """ggml-quants.c nearest_int: float32 add of 1.5*2**23, then read the mantissa bits.

    Same results as common.nearest_int (including the defined garbage beyond |fval| >
    4194303 and for NaN), but through an LLVM bitcast: the array-view bit trick allocates
    on every call and made the search loops ~20x slower.
    """
    val = F32(fval) + ROUND_MAGIC
    i = np.int64(common.f32_as_i32(val))
    return (i & 0x007FFFFF) - 0x00400000


@nb.njit(**JIT)
def c_f32_to_int_lowbyte(v):
    """Low byte (0..255) of C's ``(int8_t)v`` / ``(uint8_t)v`` on x86-64 GCC.

    GCC converts with cvttss2si (truncation toward zero) and keeps the low byte; an
    out-of-range or NaN input gives the "integer indefinite" 0x80000000, whose low byte is
    0. Every float32 >= 2**31 is a multiple of 256, so the 64-bit form gives the same byte.
    """
    if v >= -_I32_LIMIT and v < _I32_LIMIT:
        return np.int64(v) & 0xFF
    return np.int64(0)


@nb.njit(**JIT)
def as_int8(i):
    """C conversion of an int to int8_t (GCC: modulo 256, two's complement)."""
    return ((np.int64(i) & 0xFF) ^ 0x80) - 0x80


@nb.njit(**JIT)
def c_roundf(v):
    """C roundf: round half away from zero (not numpy's half-to-even)."""
    t = np.trunc(v)
    if abs(v - t) >= F32(0.5):  # v - t is exact in float32
        t = t + (F32(1.0) if v > F32(0.0) else F32(-1.0))
    return t


@nb.njit(**JIT)
def get_scale_min_k4(j, q, qo):
    """ggml-quants.c get_scale_min_k4: 6-bit scale and min j of a Q4_K/Q5_K scales[12] at q[qo:]."""
    if j < 4:
        d = np.int64(q[qo + j]) & 63
        m = np.int64(q[qo + j + 4]) & 63
    else:
        d = (np.int64(q[qo + j + 4]) & 0xF) | ((np.int64(q[qo + j - 4]) >> 6) << 4)
        m = (np.int64(q[qo + j + 4]) >> 4) | ((np.int64(q[qo + j]) >> 6) << 4)
    return d, m


# Scratch the searches need from their caller (allocated once per row, never per call):
# WORK_FLOATS float32 and WORK_INTS int32, enough for blocks of up to 32 values.
MAX_N = 32
WORK_FLOATS = 5 * MAX_N
WORK_INTS = MAX_N


@nb.njit(**JIT)
def _qx_weight(xi, rmse_type):
    # make_qx_quants without qw: w = rmse_type == 1 ? x*x : == 2 ? 1 : == 3 ? |x| : sqrt|x|
    if rmse_type == 1:
        return xi * xi
    if rmse_type == 2:
        return F32(1.0)
    if rmse_type == 3:
        return abs(xi)
    return np.sqrt(abs(xi))


@nb.njit(**JIT)
def _qx_levels(n, nmax, iscale, xb, lbuf):
    for i in range(n):
        lbuf[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * xb[i])))


@nb.njit(**JIT)
def _qx_sums(n, work, lbuf):
    """sumlx = sum (w*x)*l and suml2 = sum (w*l)*l in index order; work[0:n] = w, work[n:2n] = w*x."""
    for i in range(n):
        fl = F32(lbuf[i])
        work[2 * n + i] = work[n + i] * fl
        work[3 * n + i] = (work[i] * fl) * fl
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        sumlx += work[2 * n + i]
        suml2 += work[3 * n + i]
    return sumlx, suml2


@nb.njit(SIG_QX, **JIT)
def make_qx_quants(n, nmax, x, xo, L, Lo, rmse_type, qw, qwo, use_qw, work, lbuf):
    """ggml-quants.c make_qx_quants: symmetric levels in [-nmax, nmax-1], stored as l + nmax.

    x[xo:xo+n] -> L[Lo:Lo+n] (int8); qw[qwo:qwo+n] are the weights when use_qw (C: qw != NULL).
    work/lbuf: WORK_FLOATS/WORK_INTS scratch. Returns the scale.
    """
    xb = x[xo:xo + n]
    Lb = L[Lo:Lo + n]
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(xb[i])
        if ax > amax:
            amax = ax
            vmax = xb[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            Lb[i] = 0
        return F32(0.0)
    fnmax = F32(nmax)
    iscale = F32(-nmax) / vmax
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * xb[i])
            Lb[i] = nmax + max(-nmax, min(nmax - 1, l))
        return F32(1.0) / iscale
    return_early = rmse_type < 0
    rtype = -rmse_type if return_early else rmse_type
    for i in range(n):  # the C recomputes these identical weights in every trial
        xi = xb[i]
        w = qw[qwo + i] if use_qw else _qx_weight(xi, rtype)
        work[i] = w
        work[n + i] = w * xi
    _qx_levels(n, nmax, iscale, xb, lbuf)
    for i in range(n):
        Lb[i] = lbuf[i] + nmax
    sumlx, suml2 = _qx_sums(n, work, lbuf)
    scale = sumlx / suml2 if suml2 != F32(0.0) else F32(0.0)
    if return_early:
        return F32(0.5) * (scale + F32(1.0) / iscale) if suml2 > F32(0.0) else F32(1.0) / iscale
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + F32(0.1) * F32(step)) / vmax
        changed = 0
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * xb[i])))
            changed |= l ^ lbuf[i]
            lbuf[i] = l
        if changed == 0:
            # Same levels as the previous trial (or the first pass): same sums, so the C's
            # test gives the same answer and an acceptance would rewrite the same L, scale
            # and best. Skipping it is exact.
            continue
        sumlx, suml2 = _qx_sums(n, work, lbuf)
        if suml2 > F32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):  # the C re-runs nearest_int here: same levels
                Lb[i] = nmax + lbuf[i]
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@nb.njit(SIG_Q3, **JIT)
def make_q3_quants(n, nmax, x, xo, L, Lo, do_rmse):
    """ggml-quants.c make_q3_quants (Q3_K reference path): weights x*x, coordinate descent.

    x[xo:xo+n] -> L[Lo:Lo+n] (int8, l + nmax). Returns the scale.
    """
    xb = x[xo:xo + n]
    Lb = L[Lo:Lo + n]
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(xb[i])
        if ax > amax:
            amax = ax
            vmax = xb[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            Lb[i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / vmax
    if do_rmse:
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            xi = xb[i]
            l = nearest_int(iscale * xi)
            l = max(-nmax, min(nmax - 1, l))
            Lb[i] = l
            w = xi * xi
            fl = F32(l)
            sumlx += w * xi * fl
            suml2 += w * fl * fl
        for _itry in range(5):
            n_changed = 0
            for i in range(n):
                xi = xb[i]
                w = xi * xi
                fL = F32(Lb[i])
                slx = sumlx - w * xi * fL
                if slx > F32(0.0):
                    sl2 = suml2 - w * fL * fL
                    new_l = nearest_int(xi * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != Lb[i]:
                        fn = F32(new_l)
                        slx += w * xi * fn
                        sl2 += w * fn * fn
                        if sl2 > F32(0.0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                            Lb[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            Lb[i] += nmax
        return sumlx / suml2 if suml2 > F32(0.0) else F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * xb[i])
        l = max(-nmax, min(nmax - 1, l))
        Lb[i] = l + nmax
    return F32(1.0) / iscale


@nb.njit(**JIT)
def _qkx_error(n, scale, vmin, xb, Lv, work, use_mad):
    """sum w * err(scale*L + min - x) in index order, err = |.| (use_mad) or square; w = work[0:n]."""
    for i in range(n):
        diff = scale * F32(Lv[i]) + vmin - xb[i]
        diff = abs(diff) if use_mad else diff * diff
        work[4 * n + i] = work[i] * diff
    err = F32(0.0)
    for i in range(n):
        err += work[4 * n + i]
    return err


@nb.njit(SIG_QKX, **JIT)
def _make_qkx_quants(n, nmax, x, xo, w, wo, use_w, L, Lo, Laux, rmin, rdelta, nstep, use_mad, le_test, work):
    """Body shared by make_qkx2_quants and make_qkx3_quants (they differ only in the
    degenerate-range test, ``max == min`` vs ``max <= min``, and the NULL-weights default)."""
    xb = x[xo:xo + n]
    Lb = L[Lo:Lo + n]
    for i in range(n):  # work[0:n] = the weights
        work[i] = w[wo + i] if use_w else xb[i] * xb[i]
    x0 = xb[0]
    vmin = x0
    vmax = x0
    sum_w = work[0]
    sum_x = sum_w * x0
    for i in range(1, n):
        xi = xb[i]
        if xi < vmin:
            vmin = xi
        if xi > vmax:
            vmax = xi
        wi = work[i]
        sum_w += wi
        sum_x += wi * xi
    if vmin > F32(0.0):
        vmin = F32(0.0)
    degenerate = (vmax <= vmin) if le_test else (vmax == vmin)
    if degenerate:
        for i in range(n):
            Lb[i] = 0
        return F32(0.0), -vmin
    fnmax = F32(nmax)
    iscale = fnmax / (vmax - vmin)
    scale = F32(1.0) / iscale
    for i in range(n):
        Lb[i] = max(0, min(nmax, nearest_int(iscale * (xb[i] - vmin))))
    best_error = _qkx_error(n, scale, vmin, xb, Lb, work, use_mad)
    if nstep < 1:
        return scale, -vmin
    have_prev = False
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fnmax) / (vmax - vmin)
        changed = 0
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (xb[i] - vmin))))
            changed |= l ^ np.int64(Laux[i])
            Laux[i] = l
        if have_prev and changed == 0:
            # Same levels as the previous step: the fit and its error are the same, and that
            # error was either accepted (best_error == it) or rejected (best_error <= it, and
            # best_error has not changed since), so the C's `<` test fails. Skipping is exact.
            continue
        have_prev = True
        # Products in a loop without reductions, then the three sums in index order: the
        # same float operations as the C's single loop.
        for i in range(n):
            fl = F32(Laux[i])
            wl = work[i] * fl
            work[n + i] = wl  # w*l
            work[2 * n + i] = wl * fl  # w*l*l
            work[3 * n + i] = wl * xb[i]  # w*l*x
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            sum_l += work[n + i]
            sum_l2 += work[2 * n + i]
            sum_xl += work[3 * n + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F32(0.0):
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = _qkx_error(n, this_scale, this_min, xb, Laux, work, use_mad)
            if cur_error < best_error:
                for i in range(n):
                    Lb[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, -vmin


@nb.njit(SIG_QKX2, **JIT)
def make_qkx2_quants(n, nmax, x, xo, w, wo, L, Lo, Laux, rmin, rdelta, nstep, use_mad, work):
    """ggml-quants.c make_qkx2_quants (k-quant reference paths): asymmetric levels 0..nmax.

    x[xo:xo+n], weights w[wo:wo+n] -> L[Lo:Lo+n] (uint8); Laux is n bytes and work
    WORK_FLOATS floats of scratch. rmin/rdelta must be float32.
    Returns (scale, the_min) where the_min = -min >= 0.
    """
    return _make_qkx_quants(n, nmax, x, xo, w, wo, True, L, Lo, Laux, rmin, rdelta, nstep, use_mad, False, work)


@nb.njit(SIG_QKX3, **JIT)
def make_qkx3_quants(n, nmax, x, xo, w, wo, use_w, L, Lo, Laux, rmin, rdelta, nstep, use_mad, work):
    """ggml-quants.c make_qkx3_quants (imatrix paths): as qkx2, weights default to x*x when
    not use_w (C: weights == NULL) and the degenerate test is max <= min."""
    return _make_qkx_quants(n, nmax, x, xo, w, wo, use_w, L, Lo, Laux, rmin, rdelta, nstep, use_mad, True, work)


@nb.njit(**JIT)
def _qp_mse(n, xb, scale, nmax, iscale, qw, qwo, work, use_level_buf, L, Lo):
    """sum w*(x - scale*l)^2 in index order, as (w*diff)*diff; l from L (uint8) or recomputed."""
    for i in range(n):
        if use_level_buf:
            l = np.int64(L[Lo + i])
        else:
            l = min(nmax, nearest_int(iscale * xb[i]))
        diff = xb[i] - scale * F32(l)
        work[i] = qw[qwo + i] * diff * diff
    mse = F32(0.0)
    for i in range(n):
        mse += work[i]
    return mse


@nb.njit(SIG_QP, **JIT)
def make_qp_quants(n, nmax, x, xo, L, Lo, qw, qwo, work):
    """ggml-quants.c make_qp_quants: non-negative sub-block scales/mins -> levels 0..nmax.

    x[xo:xo+n] -> L[Lo:Lo+n] (uint8; C stores ints into uint8_t, so a negative level wraps
    exactly as it does there), weights qw[qwo:qwo+n], work WORK_FLOATS scratch. Returns the
    super-block scale.
    """
    xb = x[xo:xo + n]
    vmax = F32(0.0)
    for i in range(n):
        xi = xb[i]
        vmax = vmax if vmax > xi else xi  # MAX(max, x[i])
    if vmax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[Lo + i] = 0
        return F32(0.0)
    fnmax = F32(nmax)
    iscale = fnmax / vmax
    for i in range(n):
        L[Lo + i] = nearest_int(iscale * xb[i]) & 0xFF
    scale = F32(1.0) / iscale
    # best_mse uses the uint8 levels just stored; the trials use MIN(nmax, l) unwrapped
    best_mse = _qp_mse(n, xb, scale, nmax, iscale, qw, qwo, work, True, L, Lo)
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + fnmax) / vmax
        scale_is = F32(1.0) / iscale_is
        mse = _qp_mse(n, xb, scale_is, nmax, iscale_is, qw, qwo, work, False, L, Lo)
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        xi = xb[i]
        l = nearest_int(iscale * xi)
        l = min(nmax, l)
        L[Lo + i] = l & 0xFF
        wi = qw[qwo + i]
        fl = F32(l)
        sumlx += wi * xi * fl
        suml2 += wi * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            xi = xb[i]
            wi = qw[qwo + i]
            fL = F32(L[Lo + i])
            slx = sumlx - wi * xi * fL
            sl2 = suml2 - wi * fL * fL
            if slx > F32(0.0) and sl2 > F32(0.0):
                new_l = nearest_int(xi * sl2 / slx)
                new_l = min(nmax, new_l)
                if new_l != np.int64(L[Lo + i]):
                    fn = F32(new_l)
                    slx += wi * xi * fn
                    sl2 += wi * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[Lo + i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > F32(0.0) else F32(0.0)
