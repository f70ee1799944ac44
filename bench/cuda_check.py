"""CUDA backend checks for a GPU machine (CI has none; tests/runtime/test_cuda.py runs on CPU torch).

    python3 bench/cuda_check.py GGUF [GGUF ...]

For each GGUF: logits of the torch backend on CUDA against ggquant's CPU backend (batch of 30
then token-by-token decode of 10), max |dlogit| and argmax agreement (target <= 1e-2 on the
tiny F32 models); then CUDA graphs against eager on the GPU (replayed prefill chunks, 30 decode
steps across two KV windows of 16 positions: the same logits). Then every block dequantizer on the GPU against
the bit-exact CPU kernels. tests/runtime/test_cuda_kernels.py checks the Triton kernels.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    import torch
    from gguf import GGMLQuantizationType as T

    from ggquant.quant import types as qt
    from ggquant.quant.types import CUDA_TYPES
    from ggquant.runtime.cuda import dequantize
    from ggquant.runtime.model import Session, load_model

    print("device:", torch.cuda.get_device_name())
    rng = np.random.default_rng(1)
    for path in sys.argv[1:]:
        cpu_model = load_model(path, device="cpu")
        ids = [2] + [int(t) for t in rng.integers(21, min(500, cpu_model.n_vocab), 39)]
        cpu = Session(cpu_model, 64).eval(ids, "all")
        s = Session(load_model(path, device="cuda"), 64, n_batch=16)
        got = np.concatenate([s.eval(ids[:30], "all")] + [s.eval([t], "all") for t in ids[30:]])
        d = float(np.abs(got - cpu).max())
        same = int((got.argmax(-1) == cpu.argmax(-1)).sum())
        print(f"{Path(path).name}: max |dlogit| cuda vs cpu = {d:.2e}, argmax {same}/{len(ids)}")
        one = Session(load_model(path, device="cuda"), 64, n_batch=64).eval(ids, "all")  # one batch of 40
        print(f"{Path(path).name}: one 40-token batch (MoE: grouped experts) max |dlogit| vs cpu = "
              f"{float(np.abs(one - cpu).max()):.2e}, argmax {int((one.argmax(-1) == cpu.argmax(-1)).sum())}/{len(ids)}")
        print(f"{Path(path).name}: graph prefill + decode vs eager max |dlogit| = {graph_vs_eager(path):.2e}")
    for qtype in CUDA_TYPES:
        x = (rng.standard_normal((64, 1024)) * rng.uniform(0.1, 3, (64, 1))).astype(np.float32)
        imatrix = rng.uniform(0.1, 2, 1024).astype(np.float32) if qt.get(qtype).requires_imatrix else None
        raw = qt.quantize(x, qtype, imatrix)
        ref = qt.dequantize(raw, qtype, x.shape)
        got = dequantize(torch, qtype, torch.from_numpy(raw).cuda(), 1024).cpu().numpy()
        print(f"dequantize {T(qtype).name:<5} on cuda: bit-equal to ggml's = {np.array_equal(got.view(np.uint32), ref.view(np.uint32))}")


def graph_vs_eager(path) -> float:
    """Max |dlogit| between graphs off and on: prompts of 20 tokens in chunks of 16 + 4 (each
    shape eager, captured, then replayed: the third prompt and a fourth of other tokens come from
    replayed graphs), then 30 decode steps across two KV windows of 16 positions."""
    import ggquant.runtime.cuda as cuda
    from ggquant.runtime.model import Session, load_model

    old, cuda.GRAPH_KV_STEP = cuda.GRAPH_KV_STEP, 16
    prompts = [[2] + list(range(100 + 7 * i, 119 + 7 * i)) for i in (0, 0, 0, 1)]
    try:
        outs = []
        for graphs in (False, True):
            m = load_model(path, device="cuda")
            m.backend.graphs = graphs
            s = Session(m, 64, n_batch=16)
            got = []
            for p in prompts:
                s.reset()
                got.append(s.eval(p, "all"))
            got += [s.eval([t], "last") for t in range(300, 330)]
            outs.append(np.concatenate(got))
    finally:
        cuda.GRAPH_KV_STEP = old
    return float(np.abs(outs[0] - outs[1]).max())


if __name__ == "__main__":
    main()
