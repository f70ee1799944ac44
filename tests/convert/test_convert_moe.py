"""Gemma 4 26B-A4B-like mixture of experts (`gemma4_a4b`): the parts of `convert --to gguf` the
dense models do not have.

- llama-quantize presets on the stacked experts (`ffn_gate_up_exps`, `ffn_down_exps`) equal
  llama_model_quantize of ggquant's own F32 GGUF, with and without a per-expert importance matrix
  (each expert quantized with its own slice, as llama_tensor_quantize_impl does);
- a stacked-expert tensor is streamed in row chunks within one expert: with a chunk smaller than
  an expert the file is unchanged;
- bad input (missing experts, a router of the wrong width, top-k > n_experts, a missing expert
  count) fails with one line naming the tensor or key, and writes nothing.

(Whole files against llama.cpp's converter at f32/f16/bf16/q8_0: tests/convert/test_convert_parity.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from ggquant.convert import convert
from ggquant.fixtures import tiny_model
from ggquant.formats.gguf import GGUFReader
from ggquant.quant import presets
from tests.convert.helpers import assert_identical, assert_same_tensors
from tests.convert.test_convert_bad_input import _edit_config, _edit_tensors, fails, model  # noqa: F401 (fixture)
from tests.oracles import ggml as ggml_oracle

MODEL = "gemma4_a4b"
EXPERT_TENSORS = ("ffn_gate_up_exps.weight", "ffn_down_exps.weight")


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "a4b-f32.gguf"
    convert(tiny_model(MODEL), outtype="f32", outfile=out)
    return out


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K", "Q3_K_M", "Q4_0", "IQ4_XS", "Q6_K", "MXFP4_MOE"])
def test_moe_preset_equals_llama_model_quantize(f32_gguf, tmp_path, preset):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(tiny_model(MODEL), outtype=preset, outfile=ours)
    ggml_oracle.llama_quantize(f32_gguf, ref, presets.PRESETS[preset])
    assert_identical(ref, ours)
    with GGUFReader(ours) as r:  # the router stays F32 (never quantized), the experts are quantized
        assert r.tensor("blk.0.ffn_gate_inp.weight").qtype.name == "F32"
        assert all(r.tensor(f"blk.0.{n}").qtype.name != "F32" for n in EXPERT_TENSORS)


def _expert_imatrix(path, f32_path, seed=0):
    """A llama-imatrix style file: dense matrices [n_in], stacked experts [n_expert, n_in] with
    their own counts, one expert never routed to (count 0) and one seen only a few times."""
    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    with GGUFReader(f32_path) as r:
        for t in r.tensors:
            if not t.name.startswith("blk.") or len(t.shape) < 2 or "ffn_gate_inp" in t.name:
                continue
            if len(t.shape) == 3:
                n_exp, n = t.shape[0], t.shape[-1]
                c = rng.integers(8, 40, n_exp).astype(np.float32)
                c[1], c[2] = 0, 3
                v = rng.gamma(1.0, 1.0, (n_exp, n)).astype(np.float32) * c[:, None]
                sums[t.name], counts[t.name] = v, c
            else:
                sums[t.name], counts[t.name] = rng.gamma(1.0, 1.0, t.shape[-1]).astype(np.float32) * 32, 32
    return _write_moe_imatrix(path, sums, counts)


def _write_moe_imatrix(path, sums, counts):
    """write_imatrix_gguf for entries whose counts are per expert ([n_expert] and [n_expert, n_in])."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch=None)
    w.kv_data[0].pop("general.architecture", None)
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["moe-test.txt"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 512)
    for name in sorted(sums):
        w.add_tensor(name + ".in_sum2", np.asarray(sums[name], dtype=np.float32))
        w.add_tensor(name + ".counts", np.asarray(counts[name], dtype=np.float32).reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("preset", ["IQ4_XS", "Q4_K_M"])
def test_moe_preset_with_per_expert_imatrix_equals_llama_model_quantize(f32_gguf, tmp_path, preset):
    from ggquant.imatrix.files import load

    im = _expert_imatrix(tmp_path / "imatrix.gguf", f32_gguf)
    vectors = load(im).normalised()
    assert vectors["blk.0.ffn_down_exps.weight"].size == 12 * 32  # n_expert x n_per_row
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    convert(tiny_model(MODEL), outtype=preset, outfile=ours, imatrix=im)
    ggml_oracle.llama_quantize(f32_gguf, ref, presets.PRESETS[preset], imatrix=vectors)
    assert_same_tensors(ref, ours)
    # and the imatrix changed the experts' blocks
    plain = tmp_path / "plain.gguf"
    convert(tiny_model(MODEL), outtype=preset, outfile=plain)
    with GGUFReader(ours) as a, GGUFReader(plain) as p:
        assert any(not np.array_equal(a.tensor(f"blk.0.{n}").raw(), p.tensor(f"blk.0.{n}").raw())
                   for n in EXPERT_TENSORS)


@pytest.mark.parametrize("outtype", ["bf16", "q8_0", "Q4_K_M"])
def test_expert_tensors_stream_in_chunks_within_an_expert(tmp_path, monkeypatch, outtype):
    """With a chunk smaller than one expert's rows the output is byte-identical: chunks are
    bounded row ranges inside an expert, never the whole stacked tensor."""
    from ggquant.convert import encode

    whole = tmp_path / "whole.gguf"
    convert(tiny_model(MODEL), outtype=outtype, outfile=whole)
    seen = []
    real = encode.expert_ranges

    def spy(n_expert, rows_per_expert, n_per_row):
        for e, a, b in real(n_expert, rows_per_expert, n_per_row):
            seen.append((e, a, b, rows_per_expert, n_per_row))
            yield e, a, b

    chunk = 4 * 64 * 5  # 5 rows of 64 floats; an expert of ffn_gate_up_exps has 64 rows
    monkeypatch.setattr(encode, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(encode, "expert_ranges", spy)
    chunked = tmp_path / "chunked.gguf"
    convert(tiny_model(MODEL), outtype=outtype, outfile=chunked)
    assert_identical(whole, chunked)
    assert seen and all(4 * (b - a) * n <= chunk and a // r == (b - 1) // r == e for e, a, b, r, n in seen)


# --- bad input --------------------------------------------------------------------------------

def test_missing_experts_name_the_tensor(model, tmp_path):
    moe = model(MODEL)
    _edit_tensors(moe, lambda t: t.pop("model.language_model.layers.5.experts.down_proj"))
    fails(moe, tmp_path, "model.language_model.layers.5.experts.down_proj", "missing")


def test_router_of_the_wrong_width_names_the_tensor(model, tmp_path):
    moe = model(MODEL)

    def widen(t):
        k = "model.language_model.layers.2.router.proj.weight"
        t[k] = t[k][:, :48].clone()

    _edit_tensors(moe, widen)
    fails(moe, tmp_path, "model.language_model.layers.2.router.proj.weight", "[12, 48]", "[12, 64]")


def test_experts_of_the_wrong_count_name_the_tensor(model, tmp_path):
    moe = model(MODEL)

    def drop(t):
        k = "model.language_model.layers.0.experts.gate_up_proj"
        t[k] = t[k][:10].clone()

    _edit_tensors(moe, drop)
    fails(moe, tmp_path, "model.language_model.layers.0.experts.gate_up_proj", "[10, 64, 64]")


def test_top_k_above_the_expert_count_is_refused(model, tmp_path):
    moe = model(MODEL)
    _edit_config(moe, lambda c: c["text_config"].update(top_k_experts=13))
    fails(moe, tmp_path, "top_k_experts = 13", "num_experts = 12")


def test_moe_without_an_expert_count_is_refused(model, tmp_path):
    moe = model(MODEL)
    _edit_config(moe, lambda c: c["text_config"].pop("num_experts"))
    fails(moe, tmp_path, "num_experts")
