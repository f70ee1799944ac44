"""GLQ mixture-of-experts checkpoints (the 26B-A4B-like `gemma4_a4b`), in the layout glq 0.8.16 writes
for Gemma 4 (gemma4_quantized.build_glq_moe): per expert, gate_up_proj [2F, H] quantized as one
GLQ matrix and stored split by rows as experts.<e>.gate_proj / up_proj (shared SV, Wscale and
residual scales duplicated), down_proj on its own; the router left bf16.

The split halves do not decode on their own (the row Hadamard mixes rows across the split):
ggquant rejoins them, stacks the experts into ffn_gate_up_exps / ffn_down_exps equal to glq's own
reconstruction, requantizes them (no GGML type holds GLQ values) and llama.cpp and the runtime give
the same logits bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggquant.convert import convert
from ggquant.formats.gguf import GGUFReader
from tests.quantized import gemma4_quantized as G
from tests.quantized.test_glq import TOL
from tests.quantized.util import assert_runtime_equals_llama_cpp, open_dir

pytest.importorskip("glq")

LAYER = 0
PREFIX = f"model.language_model.layers.{LAYER}.experts."


def test_glq_experts_stack_to_glqs_own_reconstruction(tmp_path):
    q = G.build_glq_moe(LAYER)
    oracle = np.load(q / "oracle.npz")
    n_exp = sum(1 for k in oracle.files if k.endswith("gate_up_proj"))
    # the trap: the stored gate_proj half decoded as a matrix of its own is not glq's weight
    alone = open_dir(q, via="numpy").tensors[PREFIX + "0.gate_proj.weight"].dequantize()
    F = alone.shape[0]
    assert np.abs(alone - oracle[PREFIX + "0.gate_up_proj"][:F]).max() > 100 * TOL
    f32 = convert(q, outtype="f32", outfile=tmp_path / "f32.gguf")
    with GGUFReader(f32.written[0]) as r:
        for gguf, hf in (("ffn_gate_up_exps", "gate_up_proj"), ("ffn_down_exps", "down_proj")):
            t = r.tensor(f"blk.{LAYER}.{gguf}.weight")
            got = np.asarray(t.raw()).view(np.float32).reshape(t.shape)
            want = np.stack([oracle[f"{PREFIX}{e}.{hf}"] for e in range(n_exp)])
            np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=gguf)


def test_glq_moe_requantized_runs_in_llama_cpp_and_the_runtime_bit_for_bit(tmp_path):
    conv = convert(G.build_glq_moe(LAYER), outfile=tmp_path / "auto.gguf")
    stacked = {t.name: t for t in conv.files[0].tensors if t.source_quant and "_exps." in t.name}
    assert set(stacked) == {f"blk.{LAYER}.ffn_gate_up_exps.weight", f"blk.{LAYER}.ffn_down_exps.weight"}
    # Q4_K suggested for 2 bpw; 64- and 32-wide rows are not whole super-blocks: its fallback
    assert all(not t.exact and t.qtype.name == "Q5_0" for t in stacked.values())
    assert_runtime_equals_llama_cpp(conv.written[0])
