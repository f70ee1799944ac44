"""The safetensors reader: header validation, dtypes, row-range views, shards."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from ggquant.errors import FormatError, GGQuantError
from ggquant.formats.safetensors import SafetensorsFile, open_checkpoint
from ggquant.tensor import to_float32


def write_st(path, header: dict, data: bytes, raw_header: bytes | None = None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_reads_bf16_f16_f32_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)).astype(np.float32) * 10
    x[0, :3] = [np.inf, -0.0, 1e-40]  # infinities, signed zero, subnormals survive
    tensors = {"a": torch.from_numpy(x).to(torch.bfloat16), "b": torch.from_numpy(x).to(torch.float16),
               "c": torch.from_numpy(x), "s": torch.tensor(2.5, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    f = SafetensorsFile(tmp_path / "model.safetensors")
    for name, t in tensors.items():
        want = t.to(torch.float32).numpy()
        got = f.tensors[name].float_rows(0, f.tensors[name].n_outer)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
    # row ranges are views of the same bytes
    a = f.tensors["a"]
    assert np.array_equal(a.float_rows(2, 4), tensors["a"][2:4].to(torch.float32).numpy())
    assert a.rows(1, 3).base is not None  # no copy
    a.release(0, 5)  # dropping pages keeps the data readable (re-read from the file)
    assert np.array_equal(a.float_rows(0, 5), tensors["a"].to(torch.float32).numpy())
    f.close()


def test_to_float32_refuses_int_and_fp8():
    with pytest.raises(GGQuantError, match="I32"):
        to_float32(np.zeros(3, np.int32), "I32", "t")
    with pytest.raises(GGQuantError, match="F8_E4M3"):
        to_float32(np.zeros(3, np.uint8), "F8_E4M3", "t")


@pytest.mark.parametrize("header,data,needle", [
    ({"w": entry("F32", [2, 2], 0, 12)}, bytes(16), "needs 16 bytes"),  # offsets disagree with shape
    ({"w": entry("Q4", [2], 0, 2)}, bytes(2), "unknown dtype 'Q4'"),
    ({"w": entry("F32", [2, -1], 0, 0)}, b"", "non-negative"),
    ({"w": entry("F32", [2], 4, 0)}, bytes(8), "not a valid byte range"),
    ({"w": {"dtype": "F32", "shape": [1]}}, bytes(4), "data_offsets"),
    ({"w": entry("F32", [2], 0, 8), "v": entry("F32", [2], 4, 12)}, bytes(12), "overlaps"),
    ({"w": entry("F32", [4], 0, 16)}, bytes(8), "truncated"),
    ({"w": [1, 2]}, b"", "must be an object"),
])
def test_bad_headers(tmp_path, header, data, needle):
    p = write_st(tmp_path / "m.safetensors", header, data)
    with pytest.raises(FormatError, match=needle) as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("raw,needle", [
    (struct.pack("<Q", 1 << 40) + b"{}", "implausible"),
    (struct.pack("<Q", 100) + b"{}", "truncated"),
    (b"\x01\x02", "truncated or not a safetensors"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8"),
    (struct.pack("<Q", 3) + b"[1]", "JSON object"),
])
def test_bad_files(tmp_path, raw, needle):
    p = tmp_path / "m.safetensors"
    p.write_bytes(raw)
    with pytest.raises(FormatError, match=needle):
        SafetensorsFile(p)


def test_truncation_names_the_first_cut_tensor(tmp_path):
    h = {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 16, 32), "c": entry("F32", [4], 32, 48)}
    p = write_st(tmp_path / "m.safetensors", h, bytes(40))
    with pytest.raises(FormatError, match=r"tensor 'c'.*8 of its 16 bytes"):
        SafetensorsFile(p)


def test_scalar_and_empty_tensors(tmp_path):
    h = {"s": entry("F32", [], 0, 4), "e": entry("F32", [0, 3], 4, 4), "__metadata__": {"format": "pt"}}
    p = write_st(tmp_path / "m.safetensors", h, struct.pack("<f", 1.5))
    f = SafetensorsFile(p)
    assert f.metadata == {"format": "pt"}
    assert f.tensors["s"].read().shape == () and float(f.tensors["s"].read().view(np.float32)) == 1.5
    assert f.tensors["e"].rows(0, 0).shape == (0, 3)
    with pytest.raises(GGQuantError, match="outside"):
        f.tensors["s"].rows(0, 2)
    f.close()


def test_checkpoint_order_is_llama_cpp_order(tmp_path):
    """Shards sorted, names sorted inside each shard (ModelBase.index_tensors + SafetensorsLocal)."""
    write_st(tmp_path / "model-00002-of-00002.safetensors", {"a": entry("F32", [1], 0, 4)}, bytes(4))
    write_st(tmp_path / "model-00001-of-00002.safetensors",
             {"z": entry("F32", [1], 0, 4), "m": entry("F32", [1], 4, 8)}, bytes(8))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00002-of-00002.safetensors", "z": "model-00001-of-00002.safetensors",
        "m": "model-00001-of-00002.safetensors"}}))
    c = open_checkpoint(tmp_path)
    assert list(c.tensors) == ["m", "z", "a"]
    c.close()


def test_index_and_shards_must_agree(tmp_path):
    write_st(tmp_path / "model-00001-of-00001.safetensors",
             {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 4, 8)}, bytes(8))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(FormatError, match="tensor 'b' is not listed"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(FormatError, match="weight_map"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(FormatError, match="same folder"):
        open_checkpoint(tmp_path)


def test_duplicate_tensor_across_shards(tmp_path):
    write_st(tmp_path / "model-1.safetensors", {"a": entry("F32", [1], 0, 4)}, bytes(4))
    write_st(tmp_path / "model-2.safetensors", {"a": entry("F32", [1], 0, 4)}, bytes(4))
    with pytest.raises(FormatError, match="also appears"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickles_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04.")
    with pytest.raises(GGQuantError, match="pickle"):
        open_checkpoint(tmp_path)


def test_empty_folder(tmp_path):
    with pytest.raises(GGQuantError, match="no \\*.safetensors"):
        open_checkpoint(tmp_path)
