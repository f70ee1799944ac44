"""imatrix files: llama.cpp's GGUF layout byte for byte, the legacy .dat, normalisation, merging."""

import numpy as np
import pytest
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.errors import FormatError, GGQuantError
from ggquant.imatrix.files import Entry, Imatrix, load, merge, save_dat, save_gguf
from tests.imatrix_util import write_imatrix_gguf


def sample(seed=0):
    rng = np.random.default_rng(seed)
    entries = {
        "blk.0.attn_q.weight": Entry(rng.gamma(1, 1, (1, 64)).astype(np.float32) * 100, np.array([100])),
        "blk.0.ffn_down.weight": Entry(rng.gamma(1, 1, (1, 96)).astype(np.float32) * 100, np.array([100])),
        # MoE entry: 4 experts, one never routed to
        "blk.1.ffn_up_exps.weight": Entry(rng.gamma(1, 1, (4, 64)).astype(np.float32) * 7, np.array([7, 0, 30, 63])),
    }
    return Imatrix(entries, ["calibration.txt"], chunk_count=2, chunk_size=50)


def test_gguf_layout_equals_llama_imatrix_writer(tmp_path):
    """Dense entries byte-equal to the recipe proven identical to llama-imatrix's C writer (§1.5)."""
    im = sample()
    dense = {k: v for k, v in im.entries.items() if v.counts.size == 1}
    ours = save_gguf(Imatrix(dense, im.datasets, 2, 50), tmp_path / "ours.gguf")
    ref = write_imatrix_gguf(tmp_path / "ref.gguf", {k: v.sums for k, v in dense.items()},
                             {k: int(v.counts[0]) for k, v in dense.items()}, im.datasets, 2, 50)
    assert ours.read_bytes() == ref.read_bytes()


def test_gguf_round_trip_and_llama_normalisation(tmp_path):
    im = sample()
    back = load(save_gguf(im, tmp_path / "im.gguf"))
    assert back.datasets == im.datasets and (back.chunk_count, back.chunk_size) == (2, 50)
    for name, e in im.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums)
        assert np.array_equal(back.entries[name].counts, e.counts)
    moe = back.normalised()["blk.1.ffn_up_exps.weight"].reshape(4, 64)
    e = im.entries["blk.1.ffn_up_exps.weight"]
    assert np.array_equal(moe[1], np.ones(64, np.float32))  # count 0 -> 1.0 (quantize.cpp)
    assert np.array_equal(moe[2], e.sums[2] / np.float32(30))


def test_gguf_loads_in_ggml(tmp_path):
    import ctypes

    from tests.oracles.ggml import libggml_base

    lib = libggml_base()

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(save_gguf(sample(), tmp_path / "im.gguf")).encode(), Params(True, None))
    assert ctx
    assert lib.gguf_get_n_tensors(ctx) == 6
    lib.gguf_free(ctx)


def test_dat_values_are_what_llama_imatrix_writes(tmp_path):
    im = sample()
    back = load(save_dat(im, tmp_path / "im.dat"))
    assert back.legacy and back.chunk_count == 2 and back.datasets == ["calibration.txt"]
    e = im.entries["blk.0.attn_q.weight"]
    ncall = -(-100 // 50)
    want = (e.sums / np.float32(100)) * np.float32(ncall)
    assert np.array_equal(back.entries["blk.0.attn_q.weight"].sums, want)
    # llama-quantize then divides by ncall again (not always bit-identical to sum/count: §1.4)
    assert np.array_equal(back.normalised()["blk.0.attn_q.weight"], want.reshape(-1) / np.float32(ncall))
    moe = back.entries["blk.1.ffn_up_exps.weight"].sums.reshape(4, 64)
    assert np.array_equal(moe[1], np.full(64, np.float32(-(-63 // 50))))


def test_merge_adds_sums_and_counts():
    a, b = sample(0), sample(1)
    m = merge([a, b])
    name = "blk.0.attn_q.weight"
    assert np.array_equal(m.entries[name].sums, a.entries[name].sums + b.entries[name].sums)
    assert m.entries[name].counts.tolist() == [200]
    assert m.datasets == ["calibration.txt", "calibration.txt"]
    assert m.chunk_count == 200 // 50  # max count over entries / chunk size (m_last_chunk)


def test_bad_files_are_refused_cleanly(tmp_path):
    p = tmp_path / "junk.dat"
    p.write_bytes(b"\x05\x00\x00\x00\xff\xff\xff\x7f")
    with pytest.raises(FormatError, match="junk.dat"):
        load(p)
    with pytest.raises(GGQuantError, match="not found"):
        load(tmp_path / "missing.gguf")


def test_cli_show_and_convert(tmp_path):
    src = save_gguf(sample(), tmp_path / "im.gguf")
    r = CliRunner().invoke(main, ["imatrix", "show", str(src)])
    assert r.exit_code == 0 and "blk.1.ffn_up_exps.weight" in r.output and "4 experts" in r.output
    r = CliRunner().invoke(main, ["imatrix", "convert", str(src), str(tmp_path / "im.dat"), "--output-format", "dat"])
    assert r.exit_code == 0, r.output
    assert load(tmp_path / "im.dat").legacy
    r = CliRunner().invoke(main, ["imatrix", "convert", str(src), str(tmp_path / "im.dat"), "--output-format", "dat"])
    assert r.exit_code == 1 and "--force" in r.output
