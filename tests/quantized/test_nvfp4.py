"""NVFP4 checkpoints (compressed-tensors nvfp4-pack-quantized) through `ggquant convert`.

The fixture is made by compressed-tensors itself (tests/quantized/gemma4_quantized.build_ct_nvfp4:
a 31B-like Gemma 4, every text Linear NVFP4A16 or NVFP4 with static input scales).

- the reader's dequantization is compressed-tensors' own (`dequantize` in float32) bit for bit;
- the GGML NVFP4 blocks hold the same codes and fp8 scales: ggml's own dequantization of them
  (libggml-base, ctypes) equals compressed-tensors' dequantization with no global scale; the global
  scale becomes `<name>.scale` = float32(1/g), as llama.cpp's converter writes it;
- whole conversions equal llama.cpp's convert_hf_to_gguf.py at f32/f16/bf16/q8_0: every tensor
  (order, names, types, bytes) and every metadata key but ggquant's own provenance keys (and a tiny
  Llama 3, whose q/k rows are permuted for RoPE with their codes and scales);
- llama.cpp runs the GGUF and ggquant's runtime (which applies the `.scale` tensors) gives its
  logits bit for bit; they stay close to llama.cpp's on the float32 dequantization (Q8_0
  activations apart); the torch backend meets the float32 dequantization within 1e-3;
- `--to hf` folds `.scale` into the dequantized weight (llama.cpp's effective weight);
- a row not made of whole 64-value blocks is requantized (Q8_0, said why) and --exact refuses it;
  a missing global scale is refused naming the tensor.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ggquant.convert import convert
from ggquant.errors import GGQuantError
from ggquant.formats.gguf import GGUFReader
from tests.convert.helpers import assert_same_tensors
from tests.oracles import ggml
from tests.oracles.llama_converter import cached_reference_ggufs
from tests.quantized import gemma4_quantized as G
from tests.oracles.llama_logits import llama_cpp_logits
from tests.quantized.util import assert_runtime_equals_llama_cpp, assert_torch_backend_meets_dequantized, open_dir

pytest.importorskip("compressed_tensors")

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
PROVENANCE = "ggquant."  # ggquant's own metadata (ggquant.source.*): llama.cpp writes none


def _ct_dequantize(d, rec, global_scale: bool = True) -> np.ndarray:
    """compressed-tensors' own NVFP4 dequantization of one module, in float32."""
    import torch
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors import safe_open

    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**cfg["config_groups"]["group_0"]["weights"])
    mod = rec.name.removesuffix(".weight")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        packed, scale = f.get_tensor(mod + ".weight_packed"), f.get_tensor(mod + ".weight_scale")
        g = f.get_tensor(mod + ".weight_global_scale") if global_scale else None
    x = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    return dequantize(x_q=x, scale=scale.to(torch.float32), args=args, global_scale=g, dtype=torch.float32).numpy()


@pytest.mark.parametrize("scheme", ["NVFP4A16", "NVFP4"])
def test_nvfp4_blocks_hold_compressed_tensors_values(scheme):
    from gguf import GGMLQuantizationType as T

    d = G.build_ct_nvfp4(scheme)
    model = open_dir(d)
    assert len(model) == 41 and model.method == "compressed-tensors"
    for rec in model:
        want = _ct_dequantize(d, rec)
        assert np.array_equal(rec.dequantize().view(np.uint32), want.view(np.uint32)), rec.name
        qtype, blocks = rec.exact_ggml()
        assert qtype == T.NVFP4
        # ggml's dequantization of the blocks: the library's values without the global scale, as
        # numbers (e2m1 code 8 is -0 there and +0 in ggml's kvalues_mxfp4)
        back = ggml.dequantize(T.NVFP4, blocks, rec.shape[1]).reshape(rec.shape)
        assert np.array_equal(back, _ct_dequantize(d, rec, global_scale=False)), rec.name
        comp = dict(rec.companions())
        assert comp[".scale"].tobytes() == (np.float32(1) / rec.global_scale).tobytes()
        assert (".input_scale" in comp) == (scheme == "NVFP4")
        if scheme == "NVFP4":
            assert comp[".input_scale"].tobytes() == (np.float32(1) / rec.input_global_scale).tobytes()
            assert np.isfinite(comp[".input_scale"]).all()


def _metadata(path):
    with GGUFReader(path) as r:
        return [(k, f.type, f.item_type, str(f.value)) for k, f in r.fields.items() if not k.startswith(PROVENANCE)]


# (scheme, tiny model, outtypes): Gemma 4 31B-like; Llama 3 (q/k rows permuted for RoPE as
# LlamaModel._repack_nvfp4 does: each row keeps its codes and fp8 scales)
CONVERSIONS = [("NVFP4A16", "gemma4_31b", OUTTYPES), ("NVFP4", "gemma4_31b", ("f16",)), ("NVFP4A16", "llama3", ("f16",))]


@pytest.mark.parametrize("scheme, source, types", CONVERSIONS, ids=lambda v: v if isinstance(v, str) else "")
def test_nvfp4_conversion_equals_llama_cpp_converter(tmp_path, scheme, source, types):
    d = G.build_ct_nvfp4(scheme, source)
    refs = cached_reference_ggufs([(d, t, False) for t in types])
    for t, ref in zip(types, refs):
        if isinstance(ref, Exception):
            raise ref
        ours = convert(d, outtype=t, outfile=tmp_path / f"{t}.gguf").written[0]
        assert_same_tensors(ref, ours)
        assert _metadata(ours) == _metadata(ref), t
        with GGUFReader(ours) as r:
            nv = [x.name for x in r.tensors if x.qtype.name == "NVFP4"]
            assert len(nv) == len(open_dir(d)) and r.get("ggquant.source.exact_tensors") == nv
            assert r.get("general.file_type") == (7 if t == "q8_0" else 39)  # MOSTLY_Q8_0 / MOSTLY_NVFP4
            names = [x.name for x in r.tensors]
            if scheme == "NVFP4":
                assert "blk.0.attn_q.input_scale" in names


@pytest.mark.parametrize("scheme, source", [("NVFP4A16", "gemma4_31b"), ("NVFP4A16", "llama3"), ("NVFP4", "gemma4_31b")])
def test_nvfp4_runs_in_llama_cpp_and_the_runtime_bit_for_bit(tmp_path, scheme, source):
    """(W4A4's `.input_scale` tensors load in llama.cpp, which no graph of this version reads.)"""
    d = G.build_ct_nvfp4(scheme, source)
    nv = convert(d, outtype="f32", outfile=tmp_path / "nvfp4.gguf").written[0]
    logits = assert_runtime_equals_llama_cpp(nv)  # the runtime applies every <weight>.scale
    ref = convert(G.dequantized_copy(d), outtype="f32", outfile=tmp_path / "ref.gguf").written[0]
    want = llama_cpp_logits(ref, [2] + list(range(40, 79)))
    # the same weights up to one rounding of 1/g, but llama.cpp's NVFP4 product rounds the
    # activations to Q8_0 (vec_dot_type) where the F32 one does not: close, not equal (measured:
    # max |d| 0.09 of logits up to 14.6 on the Gemma 4, 0.16 of 5.6 on the Llama, where 3 of 40
    # positions are near-ties, top-2 margins 0.01-0.07, that flip). A missing global scale
    # (x 1/g ~ 1e-4) or q/k rows out of RoPE order would be far outside this.
    assert np.abs(logits - want).max() <= 0.05 * np.abs(want).max()
    assert (logits.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_nvfp4_rows_of_partial_blocks_are_requantized_and_refused_by_exact(tmp_path):
    d = G.build_ct_nvfp4(source="gemma4_e4b")  # mlp.down_proj rows are 96 values wide
    conv = convert(d, outfile=tmp_path / "auto.gguf")
    with GGUFReader(conv.written[0]) as r:
        assert r.tensor("blk.0.ffn_down.weight").qtype.name == "Q8_0"
        assert r.tensor("blk.0.ffn_up.weight").qtype.name == "NVFP4"
        assert "blk.0.ffn_down.scale" not in [t.name for t in r.tensors]
        assert "blk.0.ffn_down.weight" in r.get("ggquant.source.requantized_tensors")
    with pytest.raises(GGQuantError, match=r"blk\.0\.ffn_down\.weight.*not whole 64-value"):
        convert(d, outfile=tmp_path / "exact.gguf", exact=True)
    assert not (tmp_path / "exact.gguf").exists()


def test_nvfp4_without_global_scale_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    src = G.build_ct_nvfp4()
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    gone = "model.language_model.layers.1.self_attn.q_proj.weight_global_scale"
    del sd[gone]
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(GGQuantError, match=gone.replace(".", r"\.")):
        convert(bad, outfile=tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("source", ["gemma4_31b", "llama3"])
def test_nvfp4_torch_backend_equals_the_float32_dequantization(tmp_path, source):
    """The torch backend (torch on the CPU here) dequantizes the blocks to float32 and multiplies
    by <weight>.scale without quantizing activations: it meets the CPU runtime on the float32
    dequantization within 1e-3 (measured: 2.3e-4 and 7.6e-6)."""
    pytest.importorskip("torch")
    assert_torch_backend_meets_dequantized(G.build_ct_nvfp4(source=source), tmp_path)


def test_nvfp4_gguf_goes_back_to_hugging_face_with_the_scale_folded_in(tmp_path):
    """`--to hf`: each NVFP4 weight comes back as ggml's dequantization times its `.scale` (the
    weight llama.cpp computes with), the `.scale` / `.input_scale` tensors are not written, and
    transformers gives the logits of the float32 dequantization up to that one rounding of 1/g."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from ggquant.convert.gguf_to_hf import export_hf
    from ggquant.quant import types as qt

    d = G.build_ct_nvfp4("NVFP4")
    gguf = convert(d, outtype="f32", outfile=tmp_path / "nvfp4.gguf").written[0]
    hf = tmp_path / "hf"
    export_hf(gguf, outfile=hf)
    got = load_file(str(hf / "model.safetensors"))
    assert not [k for k in got if k.endswith(("scale", "input_scale"))]
    ct = {rec.name.replace("model.language_model.", "model."): rec for rec in open_dir(d)}
    with GGUFReader(gguf) as r:
        for t in r.tensors:
            if t.qtype.name != "NVFP4":
                continue
            s = r.tensor(t.name.removesuffix(".weight") + ".scale").raw().view(np.float32)[0]
            hf_name = next(n for n in ct if t.name.split(".")[1] == n.split(".")[2] and
                           n.endswith({"attn_q": "q_proj.weight", "attn_k": "k_proj.weight", "attn_v": "v_proj.weight",
                                       "attn_output": "o_proj.weight", "ffn_gate": "gate_proj.weight",
                                       "ffn_up": "up_proj.weight", "ffn_down": "down_proj.weight"}[t.name.split(".")[2]]))
            want = qt.dequantize(np.asarray(t.raw()), t.qtype, t.shape).astype(np.float32) * s
            assert np.array_equal(got[hf_name].view(np.uint32), want.view(np.uint32)), t.name
            # one rounding apart from compressed-tensors' e2m1 * (fp8 / g)
            np.testing.assert_allclose(got[hf_name], ct[hf_name].dequantize(), rtol=2.5e-7, atol=0)
    ids = torch.tensor([[2] + list(range(40, 79))])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(G.dequantized_copy(d), dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
