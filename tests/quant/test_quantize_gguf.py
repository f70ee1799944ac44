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
from tests.toy_models import build_toy_llama, build_toy_moe

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


# ------------------------------------------------------------------ low-bit presets (issue 14)

@pytest.fixture(scope="module")
def low_bit_toys(tmp_path_factory):
    d = tmp_path_factory.mktemp("lowbit")
    return {
        "tied": build_toy_llama(d / "tied.gguf"),
        "untied": build_toy_llama(d / "untied.gguf", tied=False, n_head_kv=4, seed=1),
        "plain": build_toy_llama(d / "plain.gguf", extras=False, seed=3),  # only whole 128/256-blocks
        "moe4": build_toy_moe(d / "moe4.gguf", n_expert=4),
        "moe8": build_toy_moe(d / "moe8.gguf", n_expert=8, n_head_kv=4),
    }


def _imatrix_file(src, path, seed=0):
    """Random imatrix entries for every blk.* matmul (3-D: one slice per expert), as a GGUF file,
    and the normalised vectors llama-quantize would pass to libllama."""
    from ggquant.imatrix.files import load
    from tests.imatrix_util import write_imatrix_gguf

    rng = np.random.default_rng(seed)
    sums = {}
    for t in gguf.GGUFReader(src).tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2 and "_norm" not in t.name:
            n = int(t.shape[0]) * (int(t.shape[2]) if len(t.shape) == 3 else 1)
            v = rng.gamma(1.0, 1.0, n).astype(np.float32)
            v[rng.random(n) < 0.05] = 0
            sums[t.name] = v * 64
    im_file = write_imatrix_gguf(path, sums, {k: 64 for k in sums})
    return im_file, load(im_file).normalised()


# Presets that need no imatrix (ggml's and llama-quantize's requirements both unmet by none of their types)
LOW_BIT_NO_IMATRIX = [("IQ3_S", "tied"), ("IQ3_S", "untied"), ("IQ3_M", "tied"), ("IQ3_M", "untied"),
                      ("TQ1_0", "tied"), ("TQ1_0", "untied"), ("TQ2_0", "tied"), ("TQ2_0", "untied"),
                      ("MXFP4_MOE", "tied"), ("MXFP4_MOE", "moe4"), ("Q1_0", "plain"), ("IQ3_S", "moe8"),
                      ("IQ3_M", "moe8"), ("Q4_K", "untied"), ("Q3_K", "tied"), ("Q5_K", "tied")]
LOW_BIT_WITH_IMATRIX = [("IQ2_XXS", "tied"), ("IQ2_XS", "untied"), ("IQ2_S", "tied"), ("IQ2_M", "untied"),
                        ("IQ3_XXS", "tied"), ("IQ3_XXS", "untied"), ("IQ3_XS", "untied"), ("IQ3_S", "tied"),
                        ("IQ3_M", "untied"), ("IQ1_S", "tied"), ("IQ1_M", "untied"), ("Q2_K_S", "tied"),
                        ("Q2_K_S", "untied"), ("TQ2_0", "tied"), ("IQ2_XXS", "moe4"), ("IQ2_M", "moe8"),
                        ("IQ3_XS", "moe8"), ("IQ1_M", "moe8"), ("MXFP4_MOE", "moe8"), ("Q2_K_S", "moe4")]


@pytest.mark.parametrize("preset_name, model, with_imatrix", [(p, m, False) for p, m in LOW_BIT_NO_IMATRIX]
                         + [(p, m, True) for p, m in LOW_BIT_WITH_IMATRIX])
def test_low_bit_preset_matches_llama_model_quantize(low_bit_toys, tmp_path, preset_name, model, with_imatrix):
    """Without an imatrix the whole file is byte-equal; with one, tensors and metadata are (ggquant
    also writes llama-quantize's quantize.imatrix.* keys)."""
    src = low_bit_toys[model]
    im_file, im_values = _imatrix_file(src, tmp_path / "imatrix.gguf") if with_imatrix else (None, None)
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    quantize_gguf(src, ours, preset_name, imatrix=im_file, progress=False)
    ggml_oracle.llama_quantize(src, ref, presets.PRESETS[preset_name], imatrix=im_values)
    assert_same_model(ours, ref)
    if not with_imatrix:
        assert ours.read_bytes() == ref.read_bytes()


def test_low_bit_tensor_types_and_pure_match_llama(low_bit_toys, tmp_path):
    src = low_bit_toys["tied"]
    im_file, im_values = _imatrix_file(src, tmp_path / "imatrix.gguf")
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    rules = [("attn_v", T.IQ4_XS), (r"blk\.[0-3]\.ffn_down", T.IQ3_XXS), ("ffn_gate", T.TQ2_0), ("attn_q", T.NVFP4)]
    quantize_gguf(src, ours, "IQ2_M", imatrix=im_file, tensor_types=[f"{p}={t.name}" for p, t in rules],
                  progress=False)
    ggml_oracle.llama_quantize(src, ref, F.MOSTLY_IQ2_M, imatrix=im_values, tensor_types=rules)
    assert_same_model(ours, ref)
    for preset_name in ("IQ1_M", "IQ3_XS", "MXFP4_MOE"):
        quantize_gguf(src, ours, preset_name, imatrix=im_file, pure=True, force=True, progress=False)
        ggml_oracle.llama_quantize(src, ref, presets.PRESETS[preset_name], imatrix=im_values, pure=True)
        assert_same_model(ours, ref)


def _both_refuse(tmp_path, llama_quantize, ours, match):
    """llama_model_quantize fails; ggquant raises an error matching `match` and writes nothing."""
    with pytest.raises(RuntimeError):
        llama_quantize(tmp_path / "ref.gguf")
    out = tmp_path / "ours.gguf"
    with pytest.raises(GGQuantError, match=match):
        ours(out)
    assert not out.exists()


@pytest.mark.parametrize("preset_name", ["IQ2_XXS", "IQ2_S", "IQ3_XXS", "IQ1_M", "Q2_K_S", "IQ3_XS"])
def test_imatrix_required_by_llama_quantize_is_a_clear_error(low_bit_toys, tmp_path, preset_name):
    """llama-quantize refuses these presets without an imatrix (tensor_requires_imatrix); so do we,
    naming the tensor and the type, before anything is written."""
    src = low_bit_toys["tied"]
    _both_refuse(tmp_path, lambda ref: ggml_oracle.llama_quantize(src, ref, presets.PRESETS[preset_name]),
                 lambda out: quantize_gguf(src, out, preset_name, progress=False),
                 r"blk\.0\.\w+\.weight: \w+ needs an importance matrix")


def test_imatrix_missing_an_entry_is_a_clear_error(low_bit_toys, tmp_path):
    """'Missing importance matrix for tensor ... in a very low-bit quantization' (llama-quant.cpp)."""
    from tests.imatrix_util import write_imatrix_gguf

    src = low_bit_toys["tied"]
    im_file, im_values = _imatrix_file(src, tmp_path / "imatrix.gguf")
    del im_values["blk.3.ffn_up.weight"]
    partial = write_imatrix_gguf(tmp_path / "partial.gguf", {k: v * 64 for k, v in im_values.items()},
                                 {k: 64 for k in im_values})
    _both_refuse(tmp_path, lambda ref: ggml_oracle.llama_quantize(src, ref, F.MOSTLY_IQ2_XS, imatrix=im_values),
                 lambda out: quantize_gguf(src, out, "IQ2_XS", imatrix=partial, progress=False),
                 r"blk\.3\.ffn_up\.weight: IQ2_XS needs an importance matrix")


def test_no_fallback_type_is_a_clear_error(low_bit_toys, tmp_path):
    """Q1_0 rows that are not whole 128-blocks: llama.cpp has no fallback type ("no tensor type
    fallback is defined for type q1_0"); ggquant names the tensor and the type, writes nothing."""
    src = low_bit_toys["tied"]  # blk.0.odd.weight has 48 columns
    _both_refuse(tmp_path, lambda ref: ggml_oracle.llama_quantize(src, ref, F.MOSTLY_Q1_0),
                 lambda out: quantize_gguf(src, out, "Q1_0", progress=False),
                 r"blk\.0\.\w+\.weight: rows of \d+ elements cannot be stored as Q1_0")


def test_every_quant_option_is_a_preset():
    """tools/quantize/quantize.cpp QUANT_OPTIONS, but Q2_0 (not in gguf 0.19.0) and COPY."""
    quant_options = ["Q1_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
                     "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K",
                     "IQ3_XS", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K",
                     "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32"]
    assert set(quant_options) == set(presets.PRESETS)
