"""The low-bit quantizers (grid i-quants, ternary, FP4, Q1_0/Q2_0) are byte-exact with ggml_quantize_chunk.

Oracle: tests/oracles/ggml.py (libggml-base from llama-cpp-python). Inputs as for the legacy and
k-quants: random normal, heavy-tailed, all-zero, constant, outliers, tiny/large magnitudes, mixed
sub-blocks (zero, one-signed, constant), with and without random imatrices (some with zero
columns). Where ggml itself aborts (GGML_ASSERT in its grid search: overflowing magnitudes make
every candidate distance inf/NaN), ggquant raises instead; those inputs are tested separately,
without calling ggml.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.errors import GGQuantError
from ggquant.kernels.quants import iqtables, iquants, lowbit
from ggquant.quant import types as qtypes
from tests.oracles import ggml as ggml_oracle
from tests.quant import inputs

pytest.importorskip("llama_cpp")

IQ_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
LOWBIT_TYPES = [T.TQ1_0, T.TQ2_0, T.MXFP4, T.NVFP4, T.Q1_0]
N_ROWS = 12


IQ_FAMILIES = ["normal", "normal_wide", "heavy_tailed", "zeros", "constant", "outlier", "tiny", "small",
               "large", "fp16_max", "mixed_blocks"]
LOWBIT_FAMILIES = IQ_FAMILIES + ["huge", "denormal", "powers_of_two", "ties", "fp4_midpoints"]
IMATRICES = [None, "random", "some_zeros", "all_equal"]


def _input(name):
    return inputs.family(name, N_ROWS, few_rows=4, sub=16)


def _imatrix(kind, n):
    return inputs.imatrix(kind, n, zero_prefix=32)


def _assert_bytes_equal(ours, ref, what):
    assert ours.dtype == np.uint8 and ours.shape == ref.shape, (what, ours.shape, ref.shape)
    if not np.array_equal(ours, ref):
        bad_rows = np.flatnonzero((ours != ref).any(axis=1))
        pytest.fail(f"{what}: {int((ours != ref).sum())} bytes differ, in rows {bad_rows[:10].tolist()}")


@pytest.mark.parametrize("imatrix", IMATRICES, ids=str)
@pytest.mark.parametrize("family", IQ_FAMILIES)
@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda t: t.name)
def test_iq_quantize_matches_ggml(qtype, family, imatrix):
    if imatrix is None and qtype in iquants.REQUIRES_IMATRIX:
        pytest.skip("ggml_quantize_requires_imatrix: ggml asserts an imatrix")
    x = _input(family)
    w = _imatrix(imatrix, x.shape[1])
    _assert_bytes_equal(qtypes.get(qtype).quantize(x, w), ggml_oracle.quantize(qtype, x, w),
                        f"{qtype.name} {family} imatrix={imatrix}")


@pytest.mark.parametrize("family", LOWBIT_FAMILIES)
@pytest.mark.parametrize("qtype", LOWBIT_TYPES, ids=lambda t: t.name)
def test_lowbit_quantize_matches_ggml(qtype, family):
    x = _input(family)
    ours = qtypes.get(qtype).quantize(x)
    _assert_bytes_equal(ours, ggml_oracle.quantize(qtype, x), f"{qtype.name} {family}")
    # ggml ignores the imatrix for these types (quantize_q1_0 takes a per-row path, same bytes)
    w = _imatrix("random", x.shape[1])
    _assert_bytes_equal(ggml_oracle.quantize(qtype, x, w), ours, f"{qtype.name} {family} with imatrix")


@pytest.mark.parametrize("family", LOWBIT_FAMILIES)
def test_q2_0_matches_ggml(family):
    """GGML_TYPE_Q2_0 (42): not in gguf 0.19.0's enum, so only its kernels exist (no registry entry)."""
    x = _input(family)
    ours = lowbit.quantize_q2_0(x)
    ref = ggml_oracle.quantize(lowbit.Q2_0_ID, x)
    _assert_bytes_equal(ours, ref, f"Q2_0 {family}")
    y = lowbit.dequantize_q2_0(ref, x.shape[1])
    assert np.array_equal(y.view(np.uint32), ggml_oracle.dequantize(lowbit.Q2_0_ID, ref, x.shape[1]).view(np.uint32))


@pytest.mark.parametrize("qtype", [T.NVFP4, T.Q1_0], ids=lambda t: t.name)
def test_new_dequantizers_match_ggml(qtype):
    data = ggml_oracle.random_blocks(qtype, 16, 1024, seed=int(qtype))
    if qtype == T.Q1_0:  # finite fp16 scales (random bytes would include NaN patterns)
        blocks = data.reshape(-1, 18)
        h = np.random.default_rng(0).standard_normal(blocks.shape[0]).astype(np.float16).view(np.uint16)
        blocks[:, 0], blocks[:, 1] = h & 0xFF, h >> 8
    ours = qtypes.get(qtype).dequantize(data, (16, 1024))
    ref = ggml_oracle.dequantize(qtype, data, 1024)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_rows_ggml_aborts_on_raise_a_clear_error():
    """ggml GGML_ASSERTs (process abort) when its grid search finds no neighbour, as with these
    magnitudes (checked once in a subprocess); ggquant raises an error naming tensor and type."""
    w = _imatrix("random", 512)
    for qtype, scale in [(T.IQ2_XXS, 1e18), (T.IQ2_XS, 1e30), (T.IQ2_S, 1e30), (T.IQ3_XXS, 1e15), (T.IQ3_S, 1e18)]:
        x = (np.random.default_rng(0).standard_normal((4, 512)) * scale).astype(np.float32)
        with pytest.raises(GGQuantError, match=rf"blk\.0\.ffn_up\.weight: {qtype.name}"):
            qtypes.get(qtype).quantize(x, w, what="blk.0.ffn_up.weight")


@pytest.mark.parametrize("qtype", sorted(iquants.REQUIRES_IMATRIX), ids=lambda t: t.name)
def test_types_ggml_requires_an_imatrix_for_refuse_without(qtype):
    with pytest.raises(GGQuantError, match=rf"blk\.1\.attn_q\.weight: .*{qtype.name} needs an importance matrix"):
        qtypes.get(qtype).quantize(np.ones((2, 256), np.float32), None, what="blk.1.attn_q.weight")


def test_search_tables_are_ggmls():
    """kgrid codes derived from gguf-py: distinct, on-grid kmap entries point back, neighbour lists
    are by (distance, index) and hold whole distance shells (the quantizers' bytes check the rest)."""
    for qtype in iqtables.KINDS:
        tb = iqtables.tables(qtype)
        codes = iqtables.kgrid(qtype).astype(np.int64)
        assert len(set(codes.tolist())) == len(codes) == tb.grid.shape[0]
        assert np.array_equal(tb.kmap[codes], np.arange(len(codes)))
        mask = (1 << tb.bits) - 1
        off_grid = np.flatnonzero((tb.kmap < 0) & (tb.kmap != iqtables.UNREACHABLE))
        for code in off_grid[:: max(1, off_grid.size // 50)]:
            o = -int(tb.kmap[code]) - 1
            n = int(tb.neighbours[o])
            idx = tb.neighbours[o + 1: o + 1 + n].astype(np.int64)
            pos = 2 * ((code >> (tb.bits * np.arange(tb.grid.shape[1]))) & mask) + 1
            d2 = ((tb.grid.astype(np.int64) - pos) ** 2).sum(axis=1)
            assert list(zip(d2[idx], idx)) == sorted(zip(d2[idx], idx))
            shells = np.unique(d2)[: tb.nwant]
            assert set(idx.tolist()) == set(np.flatnonzero(np.isin(d2, shells)).tolist())
        assert tb.seconds < 30
