"""Legacy quants and k-quants are byte-exact with ggml_quantize_chunk, both paths, and their
dequantizers are bit-exact with ggml's to_float.

Oracle: tests/oracles/ggml.py (libggml-base from llama-cpp-python, through ctypes).
"""

import numba as nb
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from ggquant.kernels import common, qsearch
from ggquant.kernels.quants import kquants, legacy
from tests.oracles import ggml as ggml_oracle
from tests.quant import inputs

pytest.importorskip("llama_cpp")

LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
TYPES = LEGACY + KQUANTS
QUANTIZE = {**legacy.QUANTIZE, **kquants.QUANTIZE}
DEQUANTIZE = {**legacy.DEQUANTIZE, **kquants.DEQUANTIZE}

# Byte offsets of the fp16 scale fields inside one block (ggml-common.h block_<type>).
FP16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}

N_ROWS = 32


FAMILIES = ["normal", "normal_wide", "heavy_tailed", "zeros", "constant", "outlier", "tiny", "huge",
            "fp16_max", "mixed_blocks"]
IMATRICES = [None, "random", "some_zeros", "all_equal"]
_INPUTS: dict = {}


def _input(name: str) -> np.ndarray:
    if name not in _INPUTS:
        _INPUTS[name] = inputs.family(name, N_ROWS)
    return _INPUTS[name]


_imatrix = inputs.imatrix


def _assert_bytes_equal(ours, ref, what):
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, (what, ours.shape, ref.shape)
    if not np.array_equal(ours, ref):
        bad_rows = np.flatnonzero((ours != ref).any(axis=1))
        pytest.fail(f"{what}: {int((ours != ref).sum())} bytes differ, in rows {bad_rows[:10].tolist()}")


def _assert_floats_equal(ours, ref, what):
    assert ours.dtype == np.float32 and ours.shape == ref.shape, (what, ours.shape, ref.shape)
    if not np.array_equal(ours.view(np.uint32), ref.view(np.uint32)):
        bad = np.flatnonzero(ours.view(np.uint32).ravel() != ref.view(np.uint32).ravel())
        pytest.fail(f"{what}: {bad.size} floats differ, first at flat index {bad[0]}: "
                    f"{ours.ravel()[bad[0]]!r} vs {ref.ravel()[bad[0]]!r}")


@pytest.mark.parametrize("imatrix_kind", IMATRICES, ids=lambda k: k or "no_imatrix")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quantize_matches_ggml_and_dequantize_roundtrips(qtype, family, imatrix_kind):
    x = _input(family)
    qw = _imatrix(imatrix_kind, x.shape[1])
    ref = ggml_oracle.quantize(qtype, x, qw)
    ours = QUANTIZE[qtype](x, qw)
    _assert_bytes_equal(ours, ref, f"{qtype.name} quantize {family} imatrix={imatrix_kind}")
    # dequantize the oracle's own bytes
    _assert_floats_equal(DEQUANTIZE[qtype](ref, x.shape[1]), ggml_oracle.dequantize(qtype, ref, x.shape[1]),
                         f"{qtype.name} dequantize of ggml's {family} bytes")


def _random_blocks(qtype, n_rows, n_per_row, seed):
    """Random block bytes whose fp16 scale fields hold finite values (NaN payloads are not
    comparable), including zeros, negatives, subnormals and large magnitudes."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n_rows, n_per_row // block, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        vals = rng.standard_normal(data.shape[:2]) * rng.choice([1e-6, 1e-2, 1.0, 1e3], data.shape[:2])
        vals[rng.random(data.shape[:2]) < 0.05] = 0.0
        vals = vals.astype(np.float16)
        assert np.isfinite(vals).all()
        data[:, :, off:off + 2] = vals.view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(n_rows, -1)


@pytest.mark.parametrize("n_per_row", [256, 4096])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_ggml(qtype, n_per_row):
    data = _random_blocks(qtype, N_ROWS, n_per_row, seed=int(qtype) * 7 + n_per_row)
    _assert_floats_equal(DEQUANTIZE[qtype](data, n_per_row), ggml_oracle.dequantize(qtype, data, n_per_row),
                         f"{qtype.name} dequantize random blocks")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quantize_is_independent_of_thread_count(qtype):
    x = _input("heavy_tailed")[:8]
    qw = _imatrix("random", x.shape[1])
    before = nb.get_num_threads()
    try:
        nb.set_num_threads(1)
        one = QUANTIZE[qtype](x, qw)
    finally:
        nb.set_num_threads(before)
    _assert_bytes_equal(QUANTIZE[qtype](x, qw), one, f"{qtype.name} 1 thread vs {before}")


def test_q8_0_ignores_imatrix():
    x = _input("normal")
    _assert_bytes_equal(QUANTIZE[T.Q8_0](x, _imatrix("random", x.shape[1])), QUANTIZE[T.Q8_0](x, None), "Q8_0")


@nb.njit
def _both_nearest_int(v):
    a = np.empty(v.size, np.int64)
    b = np.empty(v.size, np.int64)
    for i in range(v.size):
        a[i] = qsearch.nearest_int(v[i])
        b[i] = common.nearest_int(v[i])
    return a, b


def test_bitcast_nearest_int_equals_shared_helper():
    """qsearch.nearest_int (LLVM bitcast) is common.nearest_int (array view), garbage range included."""
    rng = np.random.default_rng(3)
    v = np.concatenate([
        rng.standard_normal(10000) * 100, np.arange(-8, 8, 0.5),
        [4194303.0, -4194304.0, 4194304.5, 1e7, -1e9, 3e38],
        [np.inf, -np.inf, np.nan], rng.standard_normal(1000) * 1e12,
    ]).astype(np.float32)
    a, b = _both_nearest_int(v)
    np.testing.assert_array_equal(a, b)
    inside = np.abs(v) <= 4194303
    np.testing.assert_array_equal(a[inside], np.rint(v[inside]).astype(np.int64))


@nb.njit
def _c_conversions(v):
    r = np.empty(v.size, np.float32)
    lb = np.empty(v.size, np.int64)
    for i in range(v.size):
        r[i] = qsearch.c_roundf(v[i])
        lb[i] = qsearch.c_f32_to_int_lowbyte(v[i])
    return r, lb


def test_c_roundf_and_int_conversion():
    v = np.array([0.5, -0.5, 1.5, 2.5, -2.5, 0.49999997, -0.49999997, 126.5, -127.5, 3.0, 0.0,
                  2.0**31, -(2.0**31), 3e9, np.nan, 255.9, 256.0, -1.5], dtype=np.float32)
    r, lb = _c_conversions(v)
    half_away = np.sign(v) * np.floor(np.abs(v.astype(np.float64)) + 0.5)
    expect_r = np.where(np.isnan(v), np.nan, half_away).astype(np.float32)
    np.testing.assert_array_equal(r, expect_r)
    # cvttss2si: truncation toward zero; out of int32 range / NaN -> 0x80000000 (low byte 0)
    expect_lb = [0, 0, 1, 2, 254, 0, 0, 126, 129, 3, 0, 0, 0, 0, 0, 255, 0, 255]
    np.testing.assert_array_equal(lb, expect_lb)
