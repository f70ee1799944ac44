"""The 26B-A4B-like mixture of experts (`gemma4_a4b`, transformers' fused 3-D Gemma4TextExperts)
quantized by auto-round 0.16.1 itself (RTN, W4A16), through `ggquant convert`.

What auto-round writes (pinned by test_what_auto_round_writes_for_the_experts):
- the experts are quantized, never left fused: both routes write one GPTQ-layout Linear per
  expert and projection (`experts.<e>.{gate,up,down}_proj.qweight/qzeros/scales`), no
  `experts.gate_up_proj` / `experts.down_proj`. The model-free route (a path, iters=0,
  disable_opt_rtn) splits the fused tensors itself ("Splitting fused expert tensor ..."); the
  regular route unfuses Gemma4TextExperts into per-expert nn.Linear before quantizing;
- the router: the model-free route quantizes `router.proj` like any Linear; the regular route skips
  it ("shape not divisible by 32": 12 experts) and keeps it bf16, byte for byte the source's, with
  an extra_config (auto_round) or `dynamic` "-:" (auto_gptq) entry;
- packing: sym -> "auto_round:auto_gptq"; asym -> "auto_round" (model-free, GPTQ layout, v2
  zeros) or "auto_round:auto_awq" (regular route); format auto_gptq -> quant_method "gptq";
- group 128 wider than the 64/32-wide inputs: the model-free route pads every input width with
  zero weights to 128 (experts included), the regular route keeps one group per row.

ggquant stacks the per-expert modules into llama.cpp's ffn_gate_up_exps / ffn_down_exps, crops
the model-free padding, and transcodes every quantized matrix exactly (sym -> Q4_0, asym ->
Q5_0, the quantized router -> F32); the F32 conversion equals that of the exact float32
dequantization; the tensors auto-round left in bf16 convert byte for byte as llama.cpp's converter
converts the float checkpoint; llama.cpp's converter itself refuses both exports; llama.cpp runs
the exact GGUFs and ggquant's runtime gives their logits bit for bit.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ggquant.convert import convert
from ggquant.fixtures import tiny_model
from ggquant.formats.gguf import GGUFReader
from tests.quantized import gemma4_quantized as G
from tests.quantized.test_convert_quantized_gemma4_family import _assert_equals_reference
from tests.quantized.util import assert_runtime_equals_llama_cpp

pytest.importorskip("auto_round")

# case -> (route, format, sym, group size), the packing auto-round labels it with, the exact GGML type
CASES = {
    "model_free-sym-g32": (("model_free", "auto_round", True, 32), "auto_round:auto_gptq", "Q4_0"),
    "model_free-asym-g32": (("model_free", "auto_round", False, 32), "auto_round", "Q5_0"),
    "model_free-sym-g128": (("model_free", "auto_round", True, 128), "auto_round:auto_gptq", "Q4_0"),
    "model-sym-g32": (("model", "auto_round", True, 32), "auto_round:auto_gptq", "Q4_0"),
    "model-asym-g32": (("model", "auto_round", False, 32), "auto_round:auto_awq", "Q5_0"),
    "model-sym-g128": (("model", "auto_round", True, 128), "auto_round:auto_gptq", "Q4_0"),
    "model-auto_gptq-asym-g32": (("model", "auto_gptq", False, 32), None, "Q5_0"),
}
N_LAYERS, N_EXPERTS = 8, 12
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def _build(case: str):
    return G.build_auto_round_moe(*CASES[case][0])


def _tensors(d) -> dict:
    from safetensors import safe_open

    f = safe_open(str(d / "model.safetensors"), "pt")
    return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("case", list(CASES))
def test_what_auto_round_writes_for_the_experts(case):
    import torch

    (route, fmt, sym, group), packing, _ = CASES[case]
    d = _build(case)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    if fmt == "auto_gptq":
        assert qc["quant_method"] == "gptq" and qc["sym"] is sym
    else:
        assert (qc["quant_method"], qc["packing_format"], qc["sym"]) == ("auto-round", packing, sym)
    sd = _tensors(d)
    src = _tensors(tiny_model(G.MOE_MODEL))
    assert not [k for k in sd if _FUSED.search(k)]
    for il in range(N_LAYERS):
        p = f"model.language_model.layers.{il}."
        for e in range(N_EXPERTS):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert p + f"experts.{e}.{proj}.qweight" in sd, (il, e, proj)
        if route == "model_free":
            assert p + "router.proj.qweight" in sd and p + "router.proj.weight" not in sd
        else:
            assert p + "router.proj.qweight" not in sd
            assert torch.equal(sd[p + "router.proj.weight"].view(torch.int16),
                               src[p + "router.proj.weight"].view(torch.int16))
    gate = sd["model.language_model.layers.0.experts.0.gate_proj.qweight"]  # GPTQ [in*4/32, F], AWQ [in, F*4/32]
    width = gate.shape[0] if packing == "auto_round:auto_awq" else gate.shape[0] * 8
    assert width == (128 if route == "model_free" and group == 128 else 64)


@pytest.mark.parametrize("case", list(CASES))
def test_auto_round_moe_converts_exactly(tmp_path, case):
    (route, _, _, group), _, want = CASES[case]
    q = _build(case)
    conv = convert(q, outfile=tmp_path / "auto.gguf")  # --outtype auto: the exact block type
    quant = {t.name: t for t in conv.files[0].tensors if t.source_quant}
    assert all(t.exact for t in quant.values()), [n for n, t in quant.items() if not t.exact]
    stacked = [n for n in quant if n.endswith("_exps.weight")]
    assert len(stacked) == 2 * N_LAYERS and all(quant[n].qtype.name == want for n in stacked)
    routers = [n for n in quant if n.endswith("ffn_gate_inp.weight")]
    assert len(routers) == (N_LAYERS if route == "model_free" else 0)
    assert all(quant[n].qtype.name == "F32" for n in routers)
    assert {t.qtype.name for n, t in quant.items() if n not in routers} == {want}
    if route == "model_free" and group == 128:
        # the padded widths: the same function as the regular route's one group per row
        ref = convert(G.build_auto_round_moe("model", "auto_round", True, 128), outtype="f32",
                      outfile=tmp_path / "ref.gguf")
        f32 = convert(q, outtype="f32", outfile=tmp_path / "f32.gguf")
        with GGUFReader(ref.written[0]) as r, GGUFReader(f32.written[0]) as a:
            for t in r.tensors:
                if "ffn_gate_inp.weight" not in t.name:  # quantized here, bf16 there
                    assert np.array_equal(a.tensor(t.name).raw(), t.raw()), t.name
    else:
        _assert_equals_reference(tmp_path, q, G.dequantized_copy(q), conv)


@pytest.mark.parametrize("route", G.AUTO_ROUND_ROUTES)
def test_tensors_auto_round_left_in_bf16_convert_as_llama_cpp_converts_the_float_model(tmp_path, route,
                                                                                      reference_gguf):
    """Every tensor auto-round did not quantize (norms, embeddings, the regular route's router,
    per_expert_scale, router.scale) is byte for byte llama.cpp's F32 conversion of the float
    checkpoint auto-round started from."""
    f32 = convert(G.build_auto_round_moe(route), outtype="f32", outfile=tmp_path / "f32.gguf")
    quantized = {t.name for t in f32.files[0].tensors if t.source_quant}
    compared = []
    with GGUFReader(reference_gguf(G.MOE_MODEL, "f32")) as r, GGUFReader(f32.written[0]) as a:
        for t in a.tensors:
            if t.name not in quantized:
                assert np.array_equal(t.raw(), r.tensor(t.name).raw()), t.name
                compared.append(t.name)
    assert ("blk.0.ffn_gate_inp.weight" in compared) is (route == "model")
    assert "blk.0.ffn_down_exps.scale" in compared and "token_embd.weight" in compared


def test_llama_cpp_converter_cannot_read_auto_rounds_moe_exports(tmp_path):
    """llama.cpp's convert_hf_to_gguf.py (0.3.36) refuses quant_method auto-round outright, and
    cannot map the per-expert modules of auto-round's auto_gptq export."""
    from tests.oracles.llama_converter import ConvertJob, ReferenceConverterError, run_reference_converter_many

    jobs = [ConvertJob(_build(c), tmp_path / f"{c}.gguf", "f32", False, ())
            for c in ("model_free-sym-g32", "model-auto_gptq-asym-g32")]
    ar, gptq = run_reference_converter_many(jobs)
    assert isinstance(ar, ReferenceConverterError) and "Quant method is not yet supported: 'auto-round'" in str(ar)
    assert isinstance(gptq, ReferenceConverterError) and re.search(r"Can not map tensor '[^']*experts\.0\.", str(gptq))
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("case", ["model_free-sym-g32", "model-asym-g32", "model_free-sym-g128"])
def test_exact_auto_round_moe_runs_in_llama_cpp_and_the_runtime_bit_for_bit(tmp_path, case):
    out = tmp_path / "q.gguf"
    convert(_build(case), outfile=out)
    assert_runtime_equals_llama_cpp(out)


def test_padded_expert_with_nonzero_padding_names_it(tmp_path):
    """A model-free export whose padded input columns are not zero weights does not match config.json:
    refused naming the expert's module, nothing written."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from ggquant.errors import GGQuantError

    dst = tmp_path / "src" / "gemma4_auto_round_moe"
    shutil.copytree(_build("model_free-sym-g128"), dst)
    sd = load_file(str(dst / "model.safetensors"))
    key = "model.language_model.layers.2.experts.5.up_proj.qweight"  # [128*4/32, F]: rows 8.. pack inputs 64..127
    q = sd[key].clone()
    assert int(q[8, 0]) & 0xF == 8  # sym GPTQ: code 8 is a zero weight
    q[8, 0] = torch.tensor(int(q[8, 0]) + 1, dtype=torch.int32)
    sd[key] = q
    save_file(sd, str(dst / "model.safetensors"))
    with pytest.raises(GGQuantError, match=r"layers\.2\.experts\.5\.up_proj.*padding column 64 of row 0 is not zero"):
        convert(dst, outfile=tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
