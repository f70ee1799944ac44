"""`ggquant convert` of already-quantized Llama / Qwen checkpoints (GPTQ, MLX, compressed-tensors W4A16,
AWQ) into GGUF.

Llama's converter permutes the rows of q_proj and k_proj into llama.cpp's RoPE layout (whole heads,
LlamaModel.permute). That is a permutation of whole output rows: each row keeps its integer codes and
its column groups (act-order g_idx included), so the permuted weight transcodes exactly. Per case,
every quantized weight is written exactly, and ggml's dequantization of each equals, bit for bit, the
tensor of the F32 GGUF converted from the checkpoint's exact float32 dequantization (which goes
through the float permutation, llama.cpp's converter's bytes); llama.cpp runs the GGUF with the
dequantized F32's logits within what Q8_0 activations allow. With act-order only ffn_down can be made
exact (its columns sorted by group); the other weights are requantized for that reason alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ggquant.convert import convert
from ggquant.fixtures.cache import cached_build
from ggquant.fixtures.quantized import build_auto_round
from ggquant.formats.gguf import GGUFReader
from tests.oracles import ggml as ggml_oracle
from tests.quantized import gemma4_quantized as G
from tests.quantized.test_convert_quantized import EXACT_LOGIT_TOL, LOSSY_LOGIT_TOL, assert_logits_close
from tests.quantized.util import assert_bits_equal

pytest.importorskip("llama_cpp")

def _awq_llama3():
    """auto-round's AWQ (gemm) export of the tiny Llama 3, int4 asymmetric, group 32 (RTN)."""
    auto_round = pytest.importorskip("auto_round")
    return cached_build("llama3_awq", build_auto_round, fmt="auto_awq", bits=4, sym=False, group_size=32,
                        source="llama3", autoround_version=auto_round.__version__)


CASES = {
    "llama3_gptq_sym": lambda: G.build_gptq(source="llama3"),
    "llama3_ct_w4a16_sym": lambda: G.build_ct(source="llama3"),
    "llama3_ct_w4a16_asym": lambda: G.build_ct(symmetric=False, source="llama3"),
    "llama3_awq_asym": _awq_llama3,
    "llama3_gptq_asym_act_order": lambda: G.build_gptq(sym=False, act_order=True, source="llama3"),
    "llama3_mlx": lambda: G.build_mlx(source="llama3"),
    "qwen2_gptq_sym": lambda: G.build_gptq(source="qwen2"),
}
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.mark.parametrize("case", list(CASES))
def test_every_weight_exact_and_equal_to_the_dequantized_conversion(case, tmp_path):
    qdir = CASES[case]()
    conv = convert(qdir, outfile=tmp_path / "q.gguf")
    path = Path(conv.written[0])
    plans = [t for t in conv.files[0].tensors if t.source_quant]
    names = {t.name for t in plans}
    for kind in LINEARS:
        assert f"blk.0.{kind}.weight" in names, kind
    lossy = [(t.name, t.why) for t in plans if not t.exact]
    if "act_order" in case:
        # act-order: a 32-column block mixes groups, except in ffn_down, whose columns are sorted by group
        # (ffn_gate / ffn_up rows alike); what stays lossy is so for act-order alone, not the permutation
        assert {n.split(".", 2)[2] for n, _ in lossy} == {f"{k}.weight" for k in LINEARS if k != "ffn_down"}
        assert all("act-order" in why and "transforms" not in why for _, why in lossy), lossy
    else:
        assert not lossy, lossy
    f32 = Path(convert(G.dequantized_copy(qdir), outtype="f32", outfile=tmp_path / "f32.gguf").written[0])
    with GGUFReader(path) as r, GGUFReader(f32) as ref:
        for t in [t for t in plans if t.exact]:
            g = r.tensor(t.name)
            got = ggml_oracle.dequantize(t.qtype, np.ascontiguousarray(g.raw()).view(np.uint8).reshape(t.shape[0], -1),
                                         t.shape[-1])
            want = np.ascontiguousarray(ref.tensor(t.name).raw()).view(np.float32)
            cols = getattr(t.src.encoding.record, "_perm_cols", None)  # act-order ffn_down: sorted columns
            if cols is not None:
                want = want[:, cols]
            assert_bits_equal(got.reshape(want.shape), want, t.name)
    assert_logits_close(path, qdir, tmp_path, LOSSY_LOGIT_TOL if lossy else EXACT_LOGIT_TOL)
