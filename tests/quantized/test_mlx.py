"""MLX affine checkpoints (mlx-lm / mlx-optiq layout), quantized by mlx itself (mlx[cpu]).

ggquant's dequantization equals mlx's float32 dequantization (mx.dequantize with float32 scales
and biases: one rounding of scale*q + bias) bit for bit; 2-4-bit groups transcode exactly to
Q4_1 and 5-bit groups to Q5_1 (d = scale, m = bias), checked against ggml's to_float.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.errors import GGQuantError
from ggquant.formats.quantized import open_quantized
from tests.oracles import ggml as ggml_oracle
from tests.quantized.util import assert_bits_equal, open_dir

pytest.importorskip("mlx.core")
pytest.importorskip("llama_cpp")

from ggquant.fixtures.quantized import build_mlx, mlx_dequantize  # noqa: E402

CASES = {  # id -> (build kwargs, exact type or None)
    "b2_g64": (dict(bits=2, group_size=64), T.Q4_1),
    "b3_g32": (dict(bits=3, group_size=32), T.Q4_1),
    "b4_g64": (dict(bits=4, group_size=64), T.Q4_1),
    "b4_g128": (dict(bits=4, group_size=128), T.Q4_1),
    "b4_g32_fp16": (dict(bits=4, group_size=32, dtype="float16"), T.Q4_1),
    "b5_g64": (dict(bits=5, group_size=64), T.Q5_1),
    "b6_g64": (dict(bits=6, group_size=64), None),
    "b8_g32": (dict(bits=8, group_size=32), None),
    # mlx-optiq style mixed precision: 4-bit default, sensitive layers 8-bit, one left in bf16.
    "optiq_mixed": (dict(bits=4, group_size=64, overrides={
        "model.layers.0.self_attn.v_proj": {"bits": 8, "group_size": 64},
        "model.layers.0.mlp.down_proj": {"bits": 8, "group_size": 32},
        "model.layers.0.self_attn.o_proj": False}), T.Q4_1),
}


@pytest.fixture(scope="session")
def mlx_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx")
    return {k: build_mlx(root / k, **kw) for k, (kw, _) in CASES.items()}


@pytest.mark.parametrize("case", CASES)
def test_dequantize_equals_mlx_and_exact(mlx_dirs, case):
    kw, qtype = CASES[case]
    d = mlx_dirs[case]
    model = open_dir(d)
    assert model.method == "mlx"
    lib = mlx_dequantize(d)
    assert sorted(lib) == sorted(r.name for r in model)
    overrides = kw.get("overrides", {})
    for rec in model:
        mod = rec.name[: -len(".weight")]
        bits = overrides.get(mod, {}).get("bits", kw["bits"]) if overrides.get(mod) is not False else None
        assert rec.encoding.startswith(f"MLX affine {bits}-bit"), rec.encoding
        ours = rec.dequantize()
        assert_bits_equal(ours, lib[rec.name], f"{case} {rec.name}")
        want = qtype if bits is not None and bits <= 4 else (T.Q5_1 if bits == 5 else None)
        res = rec.exact_ggml_or_reason()
        if want is None:
            assert isinstance(res, str) and "levels" in res, res
            assert rec.expected_exact_type()[0] is None
            continue
        assert not isinstance(res, str), res
        assert res[0] == want
        assert rec.expected_exact_type()[0] == want
        assert_bits_equal(ggml_oracle.dequantize(res[0], res[1], rec.shape[1]), ours, f"{case} {rec.name}")


def test_optiq_mixed_records(mlx_dirs):
    model = open_dir(mlx_dirs["optiq_mixed"])
    assert "model.layers.0.self_attn.o_proj.weight" not in model  # left in bf16: passes through
    assert "model.layers.0.self_attn.o_proj.weight" not in model.consumed
    assert "model.embed_tokens.weight" in model  # mlx-lm quantizes embeddings too
    assert "1x4-bit" not in model.description and "2x8-bit" in model.description
    assert model["model.layers.0.mlp.down_proj.weight"].encoding == "MLX affine 8-bit group32"
    rows = model["model.layers.0.mlp.gate_proj.weight"]
    full = rows.dequantize()
    assert_bits_equal(rows.dequantize(rows=(7, 99)), full[7:99], "row range")


def test_all_zero_group_scale_is_not_a_problem(mlx_dirs):
    """mlx gives an all-zero group the scale -1e-7 (not an fp16 value); the block holds one value,
    so it is written with a scale that is, and the tensor stays exact."""
    rec = open_dir(mlx_dirs["b4_g64"])["model.layers.0.mlp.up_proj.weight"]
    codes, scales, biases = rec._load((0, 1))
    assert not np.all(scales.astype(np.float16).astype(np.float32) == scales)  # row 0 is all zero
    qtype, data = rec.exact_ggml()
    assert qtype == T.Q4_1
    assert_bits_equal(ggml_oracle.dequantize(qtype, data[:1], rec.shape[1]), rec.dequantize(rows=(0, 1)), "row 0")


@pytest.mark.parametrize("quant, phrase", [
    ({"group_size": 32, "bits": 4, "mode": "mxfp4"}, "mxfp4"),
    ({"group_size": 64, "bits": 7}, "7-bit"),
    ({"group_size": 48, "bits": 4}, "group size 48"),
])
def test_refusals(quant, phrase):
    with pytest.raises(GGQuantError, match=phrase):
        open_quantized({"quantization": quant}, [], lambda n: None)


# --- the lossy target of 6- and 8-bit codes, by measured error -----------------------------------

# GGML types a 6/8-bit MLX weight could be requantized to, smallest first (bits per weight)
LOSSY_CANDIDATES = [T.Q5_0, T.Q5_K, T.Q5_1, T.Q6_K, T.Q8_0]


def _rel_rmse(pairs) -> float:
    return float(np.sqrt(sum(e for e, _ in pairs) / sum(n for _, n in pairs)))


@pytest.mark.parametrize("bits, group_size", [(6, 32), (6, 64), (8, 32), (8, 64)])
def test_lossy_target_is_the_smallest_type_within_mlx_error(tmp_path, bits, group_size):
    """--outtype auto requantizes 6/8-bit MLX codes (no GGML type holds them) to the smallest
    candidate whose error against mx.dequantize's values stays below MLX's own quantization error
    (mx.dequantize against the bf16 weights mlx quantized): Q6_K for 6 bit, Q8_0 for 8 bit.
    Fails if the target were a type with more error, or a bigger one than needed."""
    import mlx.core as mx
    from gguf import GGML_QUANT_SIZES

    from ggquant.convert.quantized import lossy_type
    from ggquant.fixtures.quantized import random_weights

    d = build_mlx(tmp_path / "m", bits=bits, group_size=group_size)
    model, lib = open_dir(d), mlx_dequantize(d)
    source = {f"{m}.weight": np.array(mx.array(w).astype(mx.bfloat16).astype(mx.float32))
              for m, w in random_weights(7).items()}  # what build_mlx quantized (seed 7)
    own, err = [], {q: [] for q in LOSSY_CANDIDATES}
    chosen = set()
    for name, w in source.items():
        rec, deq = model[name], lib[name]
        if rec.shape[1] % 256:
            continue  # every candidate needs whole blocks; the fixture's widths are 256 and 512
        chosen.add(lossy_type(rec, rec.shape[1]))
        own.append((np.sum((deq - w) ** 2), np.sum(w ** 2)))
        for q in LOSSY_CANDIDATES:
            y = ggml_oracle.dequantize(q, ggml_oracle.quantize(q, deq), deq.shape[1])
            err[q].append((np.sum((y - deq) ** 2), np.sum(deq ** 2)))
    assert len(own) >= 5
    (target,) = chosen
    within = [q for q in LOSSY_CANDIDATES if _rel_rmse(err[q]) <= _rel_rmse(own)]
    bpw = {q: GGML_QUANT_SIZES[q][1] * 8 / GGML_QUANT_SIZES[q][0] for q in LOSSY_CANDIDATES}
    assert within, "no candidate stays within MLX's own error"
    assert target == min(within, key=bpw.__getitem__), (
        f"{bits}-bit g{group_size}: target {target.name}, smallest within MLX's error "
        f"{min(within, key=bpw.__getitem__).name}; rel-RMSE MLX {_rel_rmse(own):.2e}, "
        + ", ".join(f"{q.name} {_rel_rmse(err[q]):.2e}" for q in LOSSY_CANDIDATES))


def test_lossy_target_falls_back_for_rows_that_are_not_super_blocks(mlx_dirs):
    from ggquant.convert.quantized import lossy_type

    rec = open_dir(mlx_dirs["b6_g64"])["model.layers.0.mlp.up_proj.weight"]
    assert lossy_type(rec, 256) == T.Q6_K
    assert lossy_type(rec, 96) == T.Q8_0  # not whole 256-element super-blocks: llama-quantize's Q6_K fallback
    assert lossy_type(open_dir(mlx_dirs["b4_g64"])["model.layers.0.mlp.up_proj.weight"], 256) is None
