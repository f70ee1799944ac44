"""The mixture-of-experts operations of the CPU backend against ggml-cpu, bit for bit: MUL_MAT_ID
(every weight type, with the kernel ggml picks per expert: vec_dot, the repacked gemv, the tiled
k-quants for experts that get >= 8 rows) against ggml's own graph (tests/oracles/ggml_graph.py),
and the router's softmax / top-k / renormalisation against float64 references and ggml's rules.
(The whole 26B-A4B-like model against llama.cpp: tests/runtime/test_tiny_models.py.)"""

import numpy as np
import pytest

from ggquant.kernels.cpu.matmul import ISA
from ggquant.quant import types as qt
from ggquant.runtime.cpu import CPUBackend, CPUWeight
from tests.oracles import ggml_graph as graph
from tests.runtime.test_matmul import ALL_TYPES, _weights

E = 6  # experts


def _experts(rng, qtype, n, k):
    w = _weights(rng, qtype, E * n, k)  # with an imatrix where the type takes one (IQ2_XXS needs it)
    return CPUWeight("blk.0.ffn_down_exps.weight", qtype, (E, n, k), w.reshape(E * n, -1)), w


def _routing(rng, T_, k):
    """ids [T, k]: distinct experts per token; expert 0 is chosen by most tokens, so with 12+
    tokens it gets >= 8 rows (the tiled kernel), others 1 - 3, expert E - 1 none."""
    ids = np.empty((T_, k), np.int32)
    for t in range(T_):
        rest = rng.permutation(np.arange(1, E - 1))[:k - 1]
        ids[t] = np.concatenate([[0], rest]) if t % 5 else rng.permutation(np.arange(1, E - 1))[:k]
    return ids


@pytest.mark.skipif(bool(ISA.unmatched), reason=f"llama.cpp's kernels for {ISA.unmatched} are not emulated")
@pytest.mark.parametrize("isa", [ISA.name])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("ntok", [1, 3, 13])
@pytest.mark.parametrize("per_slot", [False, True], ids=["shared-input", "input-per-expert"])
def test_mul_mat_id_bit_identical_to_ggml(qtype, ntok, per_slot, isa):
    rng = np.random.default_rng(int(qtype) * 100 + ntok)
    be = CPUBackend(threads=2)
    k_used = 3
    for n, k in [(64, 512), (37, 256)]:  # rows % 8 == 0 (CPU_REPACK for Q4_0 / Q4_K) and not
        if k % qt.get(qtype).block_size:
            continue
        w3, raw = _experts(rng, qtype, n, k)
        ids = _routing(rng, ntok, k_used)
        x = rng.standard_normal((ntok, k_used if per_slot else 1, k)).astype(np.float32)
        got = be.mul_mat_id(x if per_slot else x[:, 0], w3, ids)
        ref = graph.mul_mat_id(qtype, raw.reshape(E, n, -1) if raw.dtype == np.uint8 else raw.reshape(E, n, k),
                               x, ids)
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), (n, k, np.mean(got != ref))


@pytest.mark.parametrize("n_expert", [12, 16, 128, 37])
def test_router_softmax_is_ggml_soft_max(n_expert):
    """Full chunks of the SIMD width through ggml_v_expf, the rest through expf: within float
    rounding of the exact softmax, rows summing to 1 (bit-exactness with ggml is checked on the
    whole model, tests/runtime/test_tiny_models.py)."""
    rng = np.random.default_rng(n_expert)
    x = (rng.standard_normal((9, n_expert)) * 3).astype(np.float32)
    p = CPUBackend().softmax(x)
    ref = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert np.abs(p - ref).max() <= 4e-7 and np.abs(p.sum(-1) - 1).max() <= 1e-6


def test_top_k_is_descending_and_renormalised():
    be = CPUBackend()
    rng = np.random.default_rng(0)
    probs = be.softmax(rng.standard_normal((20, 12)).astype(np.float32) * 2)
    ids, w = be.moe_top_k(probs, 3)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :3]
    assert np.array_equal(ids, order)
    sel = np.take_along_axis(probs, order, -1)
    s = sel.astype(np.float64).sum(-1).astype(np.float32)
    assert np.array_equal(w, sel / s[:, None])
    # equal probabilities: the lower expert index first; a vanishing sum is clamped, not divided by 0
    ids, w = be.moe_top_k(np.zeros((1, 4), np.float32), 2)
    assert ids.tolist() == [[0, 1]] and w.tolist() == [[0.0, 0.0]]
