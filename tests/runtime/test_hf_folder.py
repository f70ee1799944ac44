"""A Hugging Face folder run directly (ggquant/runtime/hf_source.py) is the GGUF `ggquant convert`
writes for it, without the file: the same metadata fields, tensor names/shapes/types/bytes, token
ids and (on the CPU backend) bit-identical logits, batched and token by token.

The tiny fixtures cover the three source layouts: gemma4_e4b (bf16, one file, vision + audio
towers that the text model skips), gemma4_e2b (f32, sharded) and gemma3_text (bf16, norm
weights stored with the +1 shift applied by the converter's transform).
"""

from __future__ import annotations

import functools
import mmap
from pathlib import Path

import numpy as np
import pytest

from ggquant.fixtures import tiny_model
from ggquant.convert import convert, plan_conversion
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import GGUFReader
from ggquant.runtime.hf_source import HFFolderReader
from ggquant.runtime.model import Session, load_model, open_reader
from ggquant.runtime.tokenizer import Tokenizer

MODELS = ["gemma4_e4b", "gemma4_e2b", "gemma3_text", "mistral", "qwen2"]  # llama3: 128k vocabulary, 2 min more
N_TOKENS = 40  # longer than the fixtures' sliding window of 8


def _ids(seed=0):
    rng = np.random.default_rng(seed)
    return [2] + [int(t) for t in rng.integers(21, 500, N_TOKENS - 1)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """converted(name, outtype) -> the GGUF `ggquant convert` writes (made once per module)."""

    @functools.cache
    def get(name: str, outtype: str) -> Path:
        out = tmp_path_factory.mktemp(f"{name}-{outtype}") / "model-{FTYPE}.gguf"
        return Path(convert(tiny_model(name), outtype=outtype, outfile=out).written[0])

    return get


def _assert_same_fields(gguf: GGUFReader, folder: HFFolderReader):
    assert list(folder.fields) == list(gguf.fields)  # same keys, same order
    for key, a in gguf.fields.items():
        b = folder.fields[key]
        assert (b.type, b.item_type) == (a.type, a.item_type), key
        if isinstance(a.value, np.ndarray):
            assert b.value.dtype == a.value.dtype and np.array_equal(b.value, a.value), key
        else:
            assert type(b.value) is type(a.value) and b.value == a.value, key


# (model, outtype): None is the default, the dtype the weights are stored in (bf16 for e4b and
# gemma3_text, f32 for e2b); q8_0 exercises the converter's quantizer inside raw().
READER_CASES = [(n, None) for n in MODELS] + [("gemma4_e4b", "f32"), ("gemma3_text", "f32"), ("gemma3_text", "q8_0")]


@pytest.mark.parametrize("name,outtype", READER_CASES)
def test_folder_reader_equals_the_converted_gguf(converted, name, outtype):
    folder = open_reader(tiny_model(name), outtype)
    with GGUFReader(converted(name, folder.outtype)) as gguf:
        _assert_same_fields(gguf, folder)
        assert [(t.name, t.shape, t.qtype) for t in folder.tensors] == [(t.name, t.shape, t.qtype) for t in gguf.tensors]
        for a, b in zip(gguf.tensors, folder.tensors):
            raw = b.raw()
            assert raw.dtype == np.uint8 and not raw.flags.writeable, a.name
            assert np.array_equal(raw, a.raw()), a.name
    folder.close()


def test_default_outtype_is_the_stored_dtype():
    assert open_reader(tiny_model("gemma4_e4b")).outtype == "bf16"
    assert open_reader(tiny_model("gemma4_e2b")).outtype == "f32"  # llama.cpp's auto would say f16
    assert open_reader(tiny_model("gemma3_text")).outtype == "bf16"


@functools.cache
def _logits(path: str, outtype: str | None, mode: str) -> np.ndarray:
    m = load_model(path, threads=2, outtype=outtype)
    s = Session(m, n_ctx=64)
    if mode == "batch":
        return s.eval(_ids(), "all")
    return np.concatenate([s.eval([t], "last") for t in _ids()])


LOGIT_CASES = [(n, "f32") for n in MODELS] + [("gemma4_e4b", None), ("gemma3_text", None)]


@pytest.mark.parametrize("mode", ["batch", "decode"])
@pytest.mark.parametrize("name,outtype", LOGIT_CASES)
def test_logits_bit_identical_to_the_converted_gguf(converted, name, outtype, mode):
    folder = str(tiny_model(name))
    ot = open_reader(folder, outtype).outtype
    ours = _logits(folder, outtype, mode)
    ref = _logits(str(converted(name, ot)), None, mode)
    assert ours.shape == (N_TOKENS, ref.shape[1])
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_ids_equal_the_converted_gguf(converted, name):
    text = "The robot bought honey at the café.\n\n  Twice: <start_of_turn>user 1234 ñ 😀\tend"
    a = Tokenizer.from_gguf(open_reader(tiny_model(name)))
    with GGUFReader(converted(name, "f32")) as r:
        b = Tokenizer.from_gguf(r)
    for special in (False, True):
        assert a.encode(text, parse_special=special) == b.encode(text, parse_special=special)


def _mapped_base(x):
    """The buffer at the end of an array's base chain (a memoryview's object for np.frombuffer)."""
    while isinstance(x, np.ndarray) and x.base is not None:
        x = x.base
    return x.obj if isinstance(x, memoryview) else x


def test_opening_reads_no_tensor_data_and_raw_is_lazy(monkeypatch):
    """Opening plans only; raw() computes one tensor when asked. A bf16 weight run as bf16 is a
    view of the safetensors mmap (no copy); run as f32 only that tensor is widened."""
    from ggquant.tensor import MappedRegion

    read: list[str] = []  # tensors read from the safetensors files
    orig = MappedRegion.rows
    monkeypatch.setattr(MappedRegion, "rows", lambda self, t, a, b: read.append(t.name) or orig(self, t, a, b))
    folder = tiny_model("gemma4_e4b")
    bf16 = open_reader(folder)
    f32 = open_reader(folder, "f32")
    assert read == []
    name = "blk.0.attn_q.weight"
    w = bf16.tensor(name).raw()
    assert isinstance(_mapped_base(w), mmap.mmap) and not w.flags.writeable
    assert len(set(read)) == 1
    read.clear()
    w32 = f32.tensor(name).raw()
    assert set(read) == {bf16.tensor(name).source.plan.hf_name} and w32.nbytes == 2 * w.nbytes
    assert w32.flags.owndata or not isinstance(_mapped_base(w32), mmap.mmap)


def test_outtype_applies_to_folders_only(converted):
    with pytest.raises(GGQuantError, match="--outtype applies to a Hugging Face folder"):
        load_model(converted("gemma3_text", "f32"), outtype="f32")
    with pytest.raises(GGQuantError, match="Q4_K_M.*a Hugging Face folder runs as one of"):
        open_reader(tiny_model("gemma3_text"), "Q4_K_M")


def _bad_folder(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / kind
    d.mkdir()
    if kind == "no_config":
        (d / "model.safetensors").write_bytes(b"")
    elif kind == "unsupported_arch":
        (d / "config.json").write_text('{"architectures": ["Phi3ForCausalLM"], "num_hidden_layers": 2}')
    elif kind == "pickle_only":
        (d / "config.json").write_text((tiny_model("gemma3_text") / "config.json").read_text())
        (d / "pytorch_model.bin").write_bytes(b"\x80\x02")
    return d


@pytest.mark.parametrize("kind,fragment", [
    ("no_config", "config.json: not found"),
    ("unsupported_arch", "'Phi3ForCausalLM' is not supported"),
    ("pickle_only", "only pickle checkpoints (pytorch_model.bin)"),
])
def test_bad_folders_raise_the_converters_error_unchanged(tmp_path, kind, fragment):
    d = _bad_folder(tmp_path, kind)
    with pytest.raises(GGQuantError) as conv_err:
        plan_conversion(d, outtype="f32")
    with pytest.raises(GGQuantError) as run_err:
        load_model(d)
    assert str(run_err.value) == str(conv_err.value)
    assert fragment in str(run_err.value)


def test_quantized_checkpoint_runs_as_its_exact_transcoding(tmp_path):
    """A compressed-tensors W4A16 folder: by default the runtime takes the converter's `auto` plan
    (int4 sym g32 -> Q4_0, moved exactly), and the logits equal the converted GGUF's."""
    from tests.quantized import gemma4_quantized as G

    folder = G.build_ct()
    m = load_model(folder, threads=2)
    assert m.reader.outtype == "auto" and m.reader.label == "Q4_0"
    assert any(t.qtype.name == "Q4_0" for t in m.reader.tensors)
    gguf = convert(folder, outtype="auto", outfile=tmp_path / "m-{FTYPE}.gguf").written[0]
    ids = _ids()[:20]
    ours = Session(m, 32).eval(ids, "all")
    ref = Session(load_model(gguf, threads=2), 32).eval(ids, "all")
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
