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
  the caller passed ``x + xo``. This avoids creating numpy views (and their reference
  counting) in the hot loops.
* ``error_model="numpy"`` gives IEEE division (1/0 = inf, 0/0 = NaN) like C instead of
  Python's ZeroDivisionError. fastmath stays off (no FMA contraction: libggml-base is built
  without it, see shared/research/imatrix-and-quants.md §2.6).
"""

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .common import GROUP_MAX_EPS

F32 = np.float32

# Options for every per-row / per-block function in the quant kernels (see module docstring).
JIT = dict(cache=True, error_model="numpy")

# ggml-quants.c nearest_int: 1.5 * 2**23
_ROUND_MAGIC = F32(12582912.0)
_I32_LIMIT = F32(2147483648.0)  # 2**31, exactly representable


@intrinsic
def _f32_as_i32(typingctx, x):
    """Reinterpret a float32's bits as int32 (C memcpy) without allocating an array."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@nb.njit(inline="always", **JIT)
def nearest_int(fval):
    """ggml-quants.c nearest_int: float32 add of 1.5*2**23, then read the mantissa bits.

    Same results as common.nearest_int (including the defined garbage beyond |fval| >
    4194303 and for NaN), but through an LLVM bitcast: the array-view bit trick allocates
    on every call and made the search loops ~20x slower.
    """
    val = F32(fval) + _ROUND_MAGIC
    i = np.int64(_f32_as_i32(val))
    return (i & 0x007FFFFF) - 0x00400000


@nb.njit(inline="always", **JIT)
def c_f32_to_int_lowbyte(v):
    """Low byte (0..255) of C's ``(int8_t)v`` / ``(uint8_t)v`` on x86-64 GCC.

    GCC converts with cvttss2si (truncation toward zero) and keeps the low byte; an
    out-of-range or NaN input gives the "integer indefinite" 0x80000000, whose low byte is
    0. Every float32 >= 2**31 is a multiple of 256, so the 64-bit form gives the same byte.
    """
    if v >= -_I32_LIMIT and v < _I32_LIMIT:
        return np.int64(v) & 0xFF
    return np.int64(0)


@nb.njit(inline="always", **JIT)
def as_int8(i):
    """C conversion of an int to int8_t (GCC: modulo 256, two's complement)."""
    return ((np.int64(i) & 0xFF) ^ 0x80) - 0x80


@nb.njit(inline="always", **JIT)
def c_roundf(v):
    """C roundf: round half away from zero (not numpy's half-to-even)."""
    t = np.trunc(v)
    if abs(v - t) >= F32(0.5):  # v - t is exact in float32
        t = t + (F32(1.0) if v > F32(0.0) else F32(-1.0))
    return t


@nb.njit(inline="always", **JIT)
def get_scale_min_k4(j, q, qo):
    """ggml-quants.c get_scale_min_k4: 6-bit scale and min j of a Q4_K/Q5_K scales[12] at q[qo:]."""
    if j < 4:
        d = q[qo + j] & 63
        m = q[qo + j + 4] & 63
    else:
        d = (q[qo + j + 4] & 0xF) | ((q[qo + j - 4] >> 6) << 4)
        m = (q[qo + j + 4] >> 4) | ((q[qo + j] >> 6) << 4)
    return np.int64(d), np.int64(m)


@nb.njit(inline="always", **JIT)
def _qx_weight(xi, rmse_type, qw, qwo, i, use_qw):
    # make_qx_quants: w = qw ? qw[i] : rmse_type == 1 ? x*x : == 2 ? 1 : == 3 ? |x| : sqrt|x|
    if use_qw:
        return qw[qwo + i]
    if rmse_type == 1:
        return xi * xi
    if rmse_type == 2:
        return F32(1.0)
    if rmse_type == 3:
        return abs(xi)
    return np.sqrt(abs(xi))


@nb.njit(**JIT)
def make_qx_quants(n, nmax, x, xo, L, Lo, rmse_type, qw, qwo, use_qw):
    """ggml-quants.c make_qx_quants: symmetric levels in [-nmax, nmax-1], stored as l + nmax.

    x[xo:xo+n] -> L[Lo:Lo+n] (int8); qw[qwo:qwo+n] are the weights when use_qw (C: qw != NULL).
    Returns the scale.
    """
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            vmax = x[xo + i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[Lo + i] = 0
        return F32(0.0)
    fnmax = F32(nmax)
    iscale = F32(-nmax) / vmax
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[xo + i])
            L[Lo + i] = nmax + max(-nmax, min(nmax - 1, l))
        return F32(1.0) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        xi = x[xo + i]
        l = nearest_int(iscale * xi)
        l = max(-nmax, min(nmax - 1, l))
        L[Lo + i] = l + nmax
        w = _qx_weight(xi, rmse_type, qw, qwo, i, use_qw)
        fl = F32(l)
        sumlx += w * xi * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != F32(0.0) else F32(0.0)
    if return_early:
        return F32(0.5) * (scale + F32(1.0) / iscale) if suml2 > F32(0.0) else F32(1.0) / iscale
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + F32(0.1) * F32(step)) / vmax
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            xi = x[xo + i]
            l = nearest_int(iscale * xi)
            l = max(-nmax, min(nmax - 1, l))
            w = _qx_weight(xi, rmse_type, qw, qwo, i, use_qw)
            fl = F32(l)
            sumlx += w * xi * fl
            suml2 += w * fl * fl
        if suml2 > F32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[xo + i])
                L[Lo + i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@nb.njit(**JIT)
def make_q3_quants(n, nmax, x, xo, L, Lo, do_rmse):
    """ggml-quants.c make_q3_quants (Q3_K reference path): weights x*x, coordinate descent.

    x[xo:xo+n] -> L[Lo:Lo+n] (int8, l + nmax). Returns the scale.
    """
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[xo + i])
        if ax > amax:
            amax = ax
            vmax = x[xo + i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[Lo + i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / vmax
    if do_rmse:
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            xi = x[xo + i]
            l = nearest_int(iscale * xi)
            l = max(-nmax, min(nmax - 1, l))
            L[Lo + i] = l
            w = xi * xi
            fl = F32(l)
            sumlx += w * xi * fl
            suml2 += w * fl * fl
        for _itry in range(5):
            n_changed = 0
            for i in range(n):
                xi = x[xo + i]
                w = xi * xi
                fL = F32(L[Lo + i])
                slx = sumlx - w * xi * fL
                if slx > F32(0.0):
                    sl2 = suml2 - w * fL * fL
                    new_l = nearest_int(xi * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[Lo + i]:
                        fn = F32(new_l)
                        slx += w * xi * fn
                        sl2 += w * fn * fn
                        if sl2 > F32(0.0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[Lo + i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[Lo + i] += nmax
        return sumlx / suml2 if suml2 > F32(0.0) else F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[xo + i])
        l = max(-nmax, min(nmax - 1, l))
        L[Lo + i] = l + nmax
    return F32(1.0) / iscale


@nb.njit(inline="always", **JIT)
def _kx_weight(w, wo, i, use_w, xi):
    # make_qkx3_quants: weights ? weights[i] : x*x  (make_qkx2_quants always has weights)
    if use_w:
        return w[wo + i]
    return xi * xi


@nb.njit(**JIT)
def _make_qkx_quants(n, nmax, x, xo, w, wo, use_w, L, Lo, Laux, rmin, rdelta, nstep, use_mad, le_test):
    """Body shared by make_qkx2_quants and make_qkx3_quants (they differ only in the
    degenerate-range test, ``max == min`` vs ``max <= min``, and the NULL-weights default)."""
    x0 = x[xo]
    vmin = x0
    vmax = x0
    sum_w = _kx_weight(w, wo, 0, use_w, x0)
    sum_x = sum_w * x0
    for i in range(1, n):
        xi = x[xo + i]
        if xi < vmin:
            vmin = xi
        if xi > vmax:
            vmax = xi
        wi = _kx_weight(w, wo, i, use_w, xi)
        sum_w += wi
        sum_x += wi * xi
    if vmin > F32(0.0):
        vmin = F32(0.0)
    degenerate = (vmax <= vmin) if le_test else (vmax == vmin)
    if degenerate:
        for i in range(n):
            L[Lo + i] = 0
        return F32(0.0), -vmin
    fnmax = F32(nmax)
    iscale = fnmax / (vmax - vmin)
    scale = F32(1.0) / iscale
    best_error = F32(0.0)
    for i in range(n):
        xi = x[xo + i]
        l = nearest_int(iscale * (xi - vmin))
        l = max(0, min(nmax, l))
        L[Lo + i] = l
        diff = scale * F32(l) + vmin - xi
        diff = abs(diff) if use_mad else diff * diff
        best_error += _kx_weight(w, wo, i, use_w, xi) * diff
    if nstep < 1:
        return scale, -vmin
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fnmax) / (vmax - vmin)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            xi = x[xo + i]
            l = nearest_int(iscale * (xi - vmin))
            l = max(0, min(nmax, l))
            Laux[i] = l
            wi = _kx_weight(w, wo, i, use_w, xi)
            fl = F32(l)
            sum_l += wi * fl
            sum_l2 += wi * fl * fl
            sum_xl += wi * fl * xi
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F32(0.0):
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = F32(0.0)
            for i in range(n):
                xi = x[xo + i]
                diff = this_scale * F32(Laux[i]) + this_min - xi
                diff = abs(diff) if use_mad else diff * diff
                cur_error += _kx_weight(w, wo, i, use_w, xi) * diff
            if cur_error < best_error:
                for i in range(n):
                    L[Lo + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, -vmin


@nb.njit(inline="always", **JIT)
def make_qkx2_quants(n, nmax, x, xo, w, wo, L, Lo, Laux, rmin, rdelta, nstep, use_mad):
    """ggml-quants.c make_qkx2_quants (k-quant reference paths): asymmetric levels 0..nmax.

    x[xo:xo+n], weights w[wo:wo+n] -> L[Lo:Lo+n] (uint8); Laux is n bytes of scratch.
    rmin and rdelta must be float32. Returns (scale, the_min) where the_min = -min >= 0.
    """
    return _make_qkx_quants(n, nmax, x, xo, w, wo, True, L, Lo, Laux, rmin, rdelta, nstep, use_mad, False)


@nb.njit(inline="always", **JIT)
def make_qkx3_quants(n, nmax, x, xo, w, wo, use_w, L, Lo, Laux, rmin, rdelta, nstep, use_mad):
    """ggml-quants.c make_qkx3_quants (imatrix paths): as qkx2, weights default to x*x when
    not use_w (C: weights == NULL) and the degenerate test is max <= min."""
    return _make_qkx_quants(n, nmax, x, xo, w, wo, use_w, L, Lo, Laux, rmin, rdelta, nstep, use_mad, True)


@nb.njit(**JIT)
def make_qp_quants(n, nmax, x, xo, L, Lo, qw, qwo):
    """ggml-quants.c make_qp_quants: non-negative sub-block scales/mins -> levels 0..nmax.

    x[xo:xo+n] -> L[Lo:Lo+n] (uint8; C stores ints into uint8_t, so a negative level wraps
    exactly as it does there), weights qw[qwo:qwo+n]. Returns the super-block scale.
    """
    vmax = F32(0.0)
    for i in range(n):
        xi = x[xo + i]
        vmax = vmax if vmax > xi else xi  # MAX(max, x[i])
    if vmax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[Lo + i] = 0
        return F32(0.0)
    fnmax = F32(nmax)
    iscale = fnmax / vmax
    for i in range(n):
        L[Lo + i] = nearest_int(iscale * x[xo + i]) & 0xFF
    scale = F32(1.0) / iscale
    best_mse = F32(0.0)
    for i in range(n):
        diff = x[xo + i] - scale * F32(L[Lo + i])
        best_mse += qw[qwo + i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F32(0.1) * F32(step) + fnmax) / vmax
        scale_is = F32(1.0) / iscale_is
        mse = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale_is * x[xo + i])
            l = min(nmax, l)
            diff = x[xo + i] - scale_is * F32(l)
            mse += qw[qwo + i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        xi = x[xo + i]
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
            xi = x[xo + i]
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
