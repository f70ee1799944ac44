"""GLQ e8_shell checkpoints: ggquant's dequantization (written from the research note, no glq
import) equals glq 0.8.16's own reconstruction within 1e-6, for every bpw 2..8, non-power-of-two
block-diagonal transforms and a Gemma-4-PLE-like quantized embedding.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggquant.errors import FormatError, GGQuantError
from ggquant.formats.quantized import glq as glq_reader
from ggquant.formats.quantized import open_quantized
from tests.quantized.util import assert_bits_equal, open_dir

glq = pytest.importorskip("glq")
pytest.importorskip("torch")

from ggquant.fixtures.cache import cached_build  # noqa: E402
from ggquant.fixtures.quantized import (  # noqa: E402
    GLQ_EMBEDDING, GLQ_LAYERS, build_glq, glq_embedding_rows, glq_linear_forward,
)

TOL = 1e-6


@pytest.fixture(scope="session")
def glq_dir():
    from importlib.metadata import version

    return cached_build("glq_mixed", build_glq, glq_version=version("glq"))


def test_linears_equal_glq(glq_dir):
    model = open_dir(glq_dir)
    oracle = np.load(glq_dir / "oracle.npz")
    assert model.method == "glq"
    for mod, (m, n, bpw) in GLQ_LAYERS.items():
        rec = model[f"{mod}.weight"]
        assert rec.shape == (m, n) and rec.bpw == bpw and not rec.padded
        assert rec.encoding == f"GLQ e8_shell {bpw} bpw, {(bpw + 1) // 2} stage(s)"
        w = rec.dequantize()
        # glq's quantize-time reconstruction W_hat, and its E8RHTLinear inference path.
        np.testing.assert_allclose(w, oracle[rec.name], rtol=0, atol=TOL, err_msg=rec.name)
        np.testing.assert_allclose(w, glq_linear_forward(glq_dir, mod, bpw), rtol=0, atol=TOL, err_msg=rec.name)
        assert rec.suggested_type == glq_reader.SUGGESTED_TYPES[bpw]
    consumed = model.consumed
    assert "model.layers.0.mlp.down_proj.Qidxs4" in consumed and "model.embed_tokens.weight" not in consumed


def test_embedding_equals_glq(glq_dir):
    mod, vocab, dim, bpw = GLQ_EMBEDDING
    rec = open_dir(glq_dir)[f"{mod}.weight"]
    assert rec.embedding and rec.padded and rec.shape == (vocab, 128)
    true = rec.cropped(vocab, dim)
    w = true.dequantize()
    np.testing.assert_allclose(w, np.load(glq_dir / "oracle.npz")[rec.name], rtol=0, atol=TOL)
    np.testing.assert_allclose(w, glq_embedding_rows(glq_dir, mod, dim), rtol=0, atol=TOL)
    assert_bits_equal(true.dequantize(rows=(5, 9)), w[5:9], "embedding rows")


def test_row_ranges_across_hadamard_blocks(glq_dir):
    """Rows 0..63 and 64..95 of a 96-row layer are separate left-transform blocks."""
    rec = open_dir(glq_dir)["model.layers.0.mlp.gate_proj.weight"]
    full = rec.dequantize()
    for a, b in ((0, 1), (10, 70), (64, 96), (63, 65), (0, 96)):
        assert_bits_equal(rec.dequantize(rows=(a, b)), full[a:b], f"rows {a}:{b}")


def test_no_exact_block_type(glq_dir):
    rec = open_dir(glq_dir)["model.layers.0.self_attn.q_proj.weight"]
    assert rec.exact_ggml() is None and "E8" in rec.not_exact_reason
    assert rec.expected_exact_type()[0] is None
    qtype, data = rec.exact_ggml([T.Q8_0, T.F16, T.F32])  # only F32 holds GLQ values
    assert qtype == T.F32
    assert_bits_equal(data.view(np.float32), rec.dequantize(), "F32")


def test_codebook_table():
    cb = glq_reader.e8_shell_codebook()
    assert cb.shape == (65536, 8)
    assert hashlib.sha256(cb.astype("<f4").tobytes()).hexdigest() == glq_reader.CODEBOOK_SHA256
    assert glq_reader.CODEBOOK_FILE.stat().st_size < 200_000
    norms = (cb.astype(np.float64) ** 2).sum(1)
    assert norms[0] == 0 and np.all(np.diff(norms) >= 0) and norms[-1] == 12


def test_codebook_equals_glq_bundled_table():
    from glq.codebook import E8ShellCodebook

    ref = E8ShellCodebook.build(verbose=False).codebook
    assert np.array_equal(glq_reader.e8_shell_codebook(), ref.numpy().astype(np.float32))


@pytest.mark.slow
def test_codebook_derivation_reproduces_table():
    assert np.array_equal(glq_reader.derive_e8_shell_codebook(), glq_reader.e8_shell_codebook())


@pytest.mark.parametrize("codebook", ["trellis", "e8p", "e8_relaxed", "lattice9"])
def test_refuses_other_codebooks(codebook):
    with pytest.raises(GGQuantError, match=codebook):
        open_quantized({"quantization_config": {"quant_method": "glq", "codebook": codebook}}, [], lambda n: None)


def test_layer_bpw_contradiction(glq_dir, tmp_path):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(glq_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["layer_bpw"]["model.layers.0.self_attn.q_proj"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="q_proj.*4 bpw"):
        open_dir(d)
