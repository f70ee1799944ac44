"""`ggquant quantize` against llama_model_quantize (llama-cpp-python): same types, same bytes."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from ggquant.errors import GGQuantError
from ggquant.quant import presets
from ggquant.convert.gguf_to_gguf import quantize_gguf
from tests.oracles import ggml as ggml_oracle
from tests.toy_models import build_toy_llama

QUANT_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
              "quantize.imatrix.chunks_count")


def _fields(r):
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in QUANT_KEYS:
            continue
        out[k] = (tuple(f.types), [bytes(p) for p in f.parts])
    return out


def assert_same_model(ours, ref, ignore_imatrix_keys=False):
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type, f"{ta.name}: {ta.tensor_type.name} vs llama.cpp {tb.tensor_type.name}"
        assert np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8)), \
            f"{ta.name} ({ta.tensor_type.name}): bytes differ from llama.cpp"
    fa, fb = _fields(a), _fields(b)
    assert list(fa) == list(fb)
    assert fa == fb


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return {
        "tied": build_toy_llama(d / "tied.gguf"),
        "untied": build_toy_llama(d / "untied.gguf", tied=False, n_head_kv=4, seed=1),
    }


def _random_imatrix(path, seed=0):
    """Normalised per-column weights for every blk.* matmul, as llama-quantize passes them."""
    rng = np.random.default_rng(seed)
    r = gguf.GGUFReader(path)
    im = {}
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            v = rng.gamma(1.0, 1.0, int(t.shape[0])).astype(np.float32)
            v[rng.random(v.size) < 0.05] = 0
            im[t.name] = v
    return im


PRESET_NAMES = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
                "IQ4_XS", "IQ4_NL", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"]


@pytest.mark.parametrize("preset_name", PRESET_NAMES)
@pytest.mark.parametrize("model", ["tied", "untied"])
def test_quantize_matches_llama_model_quantize(toy, tmp_path, preset_name, model):
    src = toy[model]
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(src, ours, preset_name, progress=False)
    ggml_oracle.llama_quantize(src, ref, presets.PRESETS[preset_name])
    assert_same_model(ours, ref)
    assert ours.read_bytes() == ref.read_bytes()  # header, metadata order, padding: the whole file


@pytest.mark.parametrize("preset_name", ["Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K", "Q4_0", "Q5_1"])
def test_quantize_with_imatrix_matches_llama(toy, tmp_path, preset_name):
    from tests.imatrix_util import write_imatrix_gguf

    src = toy["tied"]
    im = _random_imatrix(src)
    counts = {k: 64 for k in im}
    im_file = write_imatrix_gguf(tmp_path / "imatrix.gguf", {k: v * 64 for k, v in im.items()}, counts)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(src, ours, preset_name, imatrix=im_file, progress=False)
    from ggquant.imatrix.files import load

    ggml_oracle.llama_quantize(src, ref, presets.PRESETS[preset_name], imatrix=load(im_file).normalised())
    assert_same_model(ours, ref)
    keys = gguf.GGUFReader(ours).fields
    assert keys["quantize.imatrix.entries_count"].contents() == len(im)


def test_tensor_type_overrides_and_pure_match_llama(toy, tmp_path):
    src = toy["tied"]
    rules = [("attn_v", T.Q8_0), (r"blk\.[0-3]\.ffn_down", T.Q5_K)]
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(src, ours, "Q4_K_M", tensor_types=[f"{p}={t.name}" for p, t in rules], progress=False)
    ggml_oracle.llama_quantize(src, ref, F.MOSTLY_Q4_K_M, tensor_types=rules)
    assert_same_model(ours, ref)
    quantize_gguf(src, ours, "Q3_K_M", pure=True, force=True, progress=False)
    ggml_oracle.llama_quantize(src, ref, F.MOSTLY_Q3_K_M, pure=True)
    assert_same_model(ours, ref)


def test_requantize_is_refused_without_flag(toy, tmp_path):
    q = tmp_path / "q.gguf"
    quantize_gguf(toy["tied"], q, "Q4_K_M", progress=False)
    with pytest.raises(GGQuantError, match="allow-requantize"):
        quantize_gguf(q, tmp_path / "again.gguf", "Q3_K_M", progress=False)
    assert not (tmp_path / "again.gguf").exists()


def test_requantize_from_quantized_matches_llama(toy, tmp_path):
    q = tmp_path / "q.gguf"
    quantize_gguf(toy["untied"], q, "Q5_K_M", progress=False)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(q, ours, "Q3_K_S", allow_requantize=True, progress=False)
    ggml_oracle.llama_quantize(q, ref, F.MOSTLY_Q3_K_S, allow_requantize=True)
    assert_same_model(ours, ref)


def test_dry_run_writes_nothing_and_matches_plan(toy, tmp_path):
    out = tmp_path / "never.gguf"
    res = quantize_gguf(toy["tied"], out, "Q4_K_M", dry_run=True, progress=False)
    assert not out.exists()
    ref = tmp_path / "ref.gguf"
    ggml_oracle.llama_quantize(toy["tied"], ref, F.MOSTLY_Q4_K_M)
    r = gguf.GGUFReader(ref)
    assert [(c.name, c.dst_type) for c in res.tensors] == [(t.name, t.tensor_type) for t in r.tensors]
    assert res.bytes_out == sum(int(t.n_bytes) for t in r.tensors)


def test_existing_output_is_not_overwritten(toy, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(GGQuantError, match="--force"):
        quantize_gguf(toy["tied"], out, "Q8_0", progress=False)
    assert out.read_bytes() == b"precious"


def test_imatrix_for_another_model_is_refused(toy, tmp_path):
    from tests.imatrix_util import write_imatrix_gguf

    im_file = write_imatrix_gguf(tmp_path / "im.gguf", {"blk.0.attn_q.weight": np.ones(100, np.float32)},
                                 {"blk.0.attn_q.weight": 1})
    with pytest.raises(GGQuantError, match="blk.0.attn_q.weight"):
        quantize_gguf(toy["tied"], tmp_path / "o.gguf", "Q4_K_M", imatrix=im_file, progress=False)
    assert not (tmp_path / "o.gguf").exists()
