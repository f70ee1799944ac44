"""F32 / F16 / BF16 / IQ4_NL / IQ4_XS kernels, byte for byte against libggml-base.

Quantize is compared with ggml_quantize_chunk (the path llama-quantize runs), dequantize with
the type traits' to_float; floats are compared as uint32 bit patterns so NaN payloads and
signed zeros count.
"""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.kernels.quants import floats, iq4

oracle = pytest.importorskip("tests.oracles.ggml")
pytest.importorskip("llama_cpp")

FLOAT_TYPES = [T.F32, T.F16, T.BF16]
IQ4_TYPES = [T.IQ4_NL, T.IQ4_XS]
ALL_TYPES = FLOAT_TYPES + IQ4_TYPES
N_ROWS = 32


def _kernels(qtype):
    mod = floats if qtype in FLOAT_TYPES else iq4
    return mod.QUANTIZE[qtype], mod.DEQUANTIZE[qtype]


def _family(name: str, n: int) -> np.ndarray:
    """Input families of the brief, float32 [N_ROWS, n]; deterministic per (name, n)."""
    rng = np.random.default_rng([n, sum(map(ord, name))])
    normal = rng.standard_normal((N_ROWS, n)).astype(np.float32)
    if name == "normal":
        return normal
    if name == "heavy":  # student-t df=2, x10: a few huge values dominate each block
        return (rng.standard_t(2, (N_ROWS, n)) * 10).astype(np.float32)
    if name == "zeros":
        return np.zeros((N_ROWS, n), np.float32)
    if name == "constant":  # a different constant per row, both signs
        return np.repeat(rng.uniform(-3, 3, (N_ROWS, 1)).astype(np.float32), n, axis=1)
    if name == "outlier":  # small values plus one large outlier per row
        x = normal * np.float32(0.01)
        x[np.arange(N_ROWS), rng.integers(0, n, N_ROWS)] = rng.choice([-50.0, 50.0], N_ROWS)
        return x
    if name == "tiny":
        return normal * np.float32(1e-30)
    if name == "huge":  # sums of squares overflow float32 to inf
        return normal * np.float32(1e30)
    if name == "fp16max":  # around the largest fp16 (65504)
        return (normal * np.float32(2e4)).clip(-6.6e4, 6.6e4).astype(np.float32)
    if name == "mixed_rows":  # rows of very different scales, some exactly zero blocks
        x = normal * (np.float32(10.0) ** rng.integers(-8, 8, (N_ROWS, 1))).astype(np.float32)
        x[::3, : n // 2] = 0
        return x
    if name == "fp16_grid":  # values already on the fp16 grid
        return (normal * 3).astype(np.float16).astype(np.float32)
    if name == "one_sign":
        return np.abs(normal) * np.where(np.arange(N_ROWS)[:, None] % 2 == 0, 1, -1).astype(np.float32)
    raise KeyError(name)


FAMILIES = ["normal", "heavy", "zeros", "constant", "outlier", "tiny", "huge", "fp16max",
            "mixed_rows", "fp16_grid", "one_sign"]


def _imatrix(name: str | None, n: int):
    if name is None:
        return None
    rng = np.random.default_rng([n, 7, sum(map(ord, name))])
    if name == "random":
        return rng.uniform(0.01, 10.0, n).astype(np.float32)
    if name == "some_zeros":
        w = rng.exponential(1.0, n).astype(np.float32)
        w[rng.random(n) < 0.3] = 0
        w[:32] = 0  # a whole IQ4_NL block with zero importance
        return w
    if name == "equal":
        return np.full(n, 0.75, np.float32)
    raise KeyError(name)


IMATRICES = [None, "random", "some_zeros", "equal"]


def _check_quantize(qtype, x, imatrix):
    quantize, dequantize = _kernels(qtype)
    ref = oracle.quantize(qtype, x, imatrix)
    got = quantize(x, imatrix)
    assert got.dtype == np.uint8 and got.shape == ref.shape
    if not np.array_equal(got, ref):
        bad = np.argwhere(got != ref)
        pytest.fail(f"{qtype.name}: {len(bad)} bytes differ, first at (row, byte) {tuple(bad[0])}")
    # Dequantizing our own bytes must also match ggml's to_float bit for bit.
    n = x.shape[1]
    assert np.array_equal(dequantize(got, n).view(np.uint32), oracle.dequantize(qtype, ref, n).view(np.uint32))


@pytest.mark.parametrize("imatrix", IMATRICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", IQ4_TYPES, ids=lambda t: t.name)
def test_iq4_quantize_matches_ggml(qtype, family, imatrix):
    n = 4096 if family == "normal" else 512
    x = _family(family, n)
    _check_quantize(qtype, x, _imatrix(imatrix, n))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_quantize_matches_ggml(qtype, family):
    x = _family(family, 512)
    _check_quantize(qtype, x, None)
    # The chunk API ignores the imatrix for float types; so do we.
    _check_quantize(qtype, x, _imatrix("random", 512))


def _special_floats() -> np.ndarray:
    """NaNs (quiet, signalling, with payloads, both signs), infinities, zeros, float32 and fp16
    subnormals, fp16 rounding ties and overflow thresholds, as float32 [N_ROWS, 256]."""
    bits = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # +-0, +-inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7FFFFFFF, 0xFFFFFFFF,  # NaNs
        0x7F80FFFF, 0x7F810000, 0x7FBFFFFF, 0x7FC0FFFF, 0x7FC12345,
        0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00400000,  # float32 subnormals
        0x00800000, 0x00800001,  # smallest float32 normals
        0x33000000, 0x33000001, 0x32FFFFFF, 0x33800000, 0x33C00000,  # around half the smallest fp16 subnormal
        0x38800000, 0x387FFFFF, 0x387FE000, 0x387FF000, 0x387FF001,  # fp16 min normal boundary
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # 65504, 65520 (tie to inf), 65536
        0x3F801000, 0x3F803000, 0x3F801001, 0x3F802FFF,  # fp16 ties (to even) and near-ties around 1.0
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF,  # bf16 ties around 1.0
        0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # float32 max: bf16 rounding to inf
    ]
    rng = np.random.default_rng(1234)
    extra = rng.integers(0, 2**32, size=N_ROWS * 256 - len(bits), dtype=np.uint64)
    # Random patterns concentrated in the interesting exponent ranges: fp16 subnormals and
    # near-overflow, plus anything at all.
    expo = rng.choice([0, 101, 102, 103, 110, 112, 113, 142, 143, 255, 254, 127], size=extra.size)
    targeted = (extra & 0x807FFFFF) | (expo.astype(np.uint64) << 23)
    mixed = np.where(rng.random(extra.size) < 0.5, targeted, extra).astype(np.uint32)
    u = np.concatenate([np.array(bits, dtype=np.uint64).astype(np.uint32), mixed])
    return u.view(np.float32).reshape(N_ROWS, 256)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_quantize_special_values(qtype):
    with np.errstate(all="ignore"):
        _check_quantize(qtype, _special_floats(), None)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_quantize_random_bit_patterns(qtype):
    u = np.random.default_rng(99).integers(0, 2**32, size=(64, 16384), dtype=np.uint64).astype(np.uint32)
    with np.errstate(all="ignore"):
        _check_quantize(qtype, u.view(np.float32), None)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_half_dequantize_every_bit_pattern(qtype):
    """All 65536 16-bit patterns, signalling NaNs included (ggml returns them quiet for F16)."""
    data = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(4, -1)
    _, dequantize = _kernels(qtype)
    got = dequantize(data, 16384)
    ref = oracle.dequantize(qtype, data, 16384)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks(qtype):
    """Random block bytes (any fp16 scale, NaN/inf included) through to_float."""
    n = 1024
    data = oracle.random_blocks(qtype, N_ROWS, n, seed=int(qtype))
    _, dequantize = _kernels(qtype)
    with np.errstate(all="ignore"):
        got = dequantize(data, n)
        ref = oracle.dequantize(qtype, data, n)
    assert got.shape == (N_ROWS, n) and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", IQ4_TYPES, ids=lambda t: t.name)
def test_iq4_nonfinite_inputs_match_ggml(qtype):
    """NaN / inf inside blocks: no crash, and the same defined bytes as ggml."""
    x = _family("normal", 512)
    x[0, 5] = np.inf
    x[1, 40] = -np.inf
    x[2, 7] = np.nan
    x[3, :] = np.nan
    x[4, 256:288] = np.inf
    with np.errstate(all="ignore"):
        _check_quantize(qtype, x, None)
        _check_quantize(qtype, x, _imatrix("random", 512))


def test_iq4_nl_chunk_path_is_not_from_float_ref():
    """Pins the research note: the chunk API (ntry=7) differs from quantize_row_iq4_nl_ref
    (ntry=-1) for ordinary data, and we follow the chunk API."""
    import ctypes

    lib = oracle.libggml_base()
    x = _family("normal", 512)
    traits = lib.ggml_get_type_traits(int(T.IQ4_NL)).contents
    from_ref = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64)(
        traits.from_float_ref
    )
    ref_bytes = np.zeros((N_ROWS, 512 // 32 * 18), np.uint8)
    from_ref(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), ref_bytes.ctypes.data, x.size)
    got = iq4.QUANTIZE[T.IQ4_NL](x, None)
    assert not np.array_equal(got, ref_bytes)
    assert np.array_equal(got, oracle.quantize(T.IQ4_NL, x, None))


@numba.njit(cache=True)
def _best_index_both(xs):
    fast = np.empty(xs.size, np.int64)
    spec = np.empty(xs.size, np.int64)
    for i in range(xs.size):
        fast[i] = iq4.best_index_int8(xs[i])
        spec[i] = iq4.best_index_int8_search(xs[i])
    return fast, spec


def test_best_index_int8_table_equals_ggml_binary_search():
    """The table form used in the hot loops equals the literal port of best_index_int8.

    (Checked once for all 2**32 float32 patterns; here: every float32 within 2**12 ulps of
    each level and each midpoint, every float32 in [-2, 2) at 2**-16 steps, specials, and
    random bit patterns.)"""
    kv = iq4.KVALUES_IQ4NL.astype(np.float32)
    anchors = np.concatenate([kv, (kv[:-1] + kv[1:]) / 2, np.float32([0.0])]).astype(np.float32)
    steps = np.arange(-4096, 4097, dtype=np.int64)
    near = []
    for a in anchors:
        for sign in (1, -1):
            b = np.int64(np.float32(a * sign).view(np.uint32))
            near.append((b + steps).clip(0, 2**32 - 1).astype(np.uint32))
    grid = np.arange(-2.0, 2.0, 2.0**-16, dtype=np.float32)
    rand = np.random.default_rng(5).integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    special = np.float32([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-45, 3e38, -3e38])
    xs = np.concatenate([np.concatenate(near).view(np.float32), grid, rand.view(np.float32), special])
    fast, spec = _best_index_both(xs)
    assert np.array_equal(fast, spec)


def test_best_index_int8_is_nearest_level_with_ties_up():
    """best_index_int8: nearest kvalues_iq4nl level; an exact midpoint goes to the upper level."""
    kv = iq4.KVALUES_IQ4NL.astype(np.float32)
    mids = (kv[:-1] + kv[1:]) / 2
    probes = np.concatenate([kv, mids, np.nextafter(mids, -np.inf), np.nextafter(mids, np.inf),
                             np.float32([-1e9, 1e9, 0.0, -0.0, -127.5, 113.5])]).astype(np.float32)
    got, spec = _best_index_both(probes)
    dist = np.abs(probes[:, None].astype(np.float64) - kv[None, :])
    best = dist.min(axis=1, keepdims=True)
    expect = np.array([np.flatnonzero(row == b).max() for row, b in zip(dist, best)])  # ties -> upper
    assert np.array_equal(got, expect) and np.array_equal(spec, expect)
    nan_fast, nan_spec = _best_index_both(np.float32([np.nan]))
    assert nan_fast[0] == nan_spec[0] == 15  # NaN falls through every compare in C


def test_registry_dicts_have_plain_functions_for_each_type():
    for mod, types in ((floats, FLOAT_TYPES), (iq4, IQ4_TYPES)):
        assert set(mod.QUANTIZE) == set(types) and set(mod.DEQUANTIZE) == set(types)
        for t in types:
            assert callable(mod.QUANTIZE[t]) and callable(mod.DEQUANTIZE[t])
