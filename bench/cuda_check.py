"""CUDA backend checks for a GPU machine (CI has none; tests/runtime/test_cuda.py runs on CPU torch).

    python3 bench/cuda_check.py GGUF [GGUF ...]

For each GGUF: logits of the torch backend on CUDA against ggquant's CPU backend (batch of 30
then token-by-token decode of 10), max |dlogit| and argmax agreement (target <= 1e-2 on the
tiny F32 models). Then every block dequantizer on the GPU against the bit-exact CPU kernels.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    import torch
    from gguf import GGMLQuantizationType as T

    from ggquant.quant import types as qt
    from ggquant.runtime.cuda import SUPPORTED, dequantize
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
    for qtype in SUPPORTED:
        x = (rng.standard_normal((64, 1024)) * rng.uniform(0.1, 3, (64, 1))).astype(np.float32)
        raw = qt.quantize(x, qtype)
        ref = qt.dequantize(raw, qtype, x.shape)
        got = dequantize(torch, qtype, torch.from_numpy(raw).cuda(), 1024).cpu().numpy()
        print(f"dequantize {T(qtype).name:<5} on cuda: bit-equal to ggml's = {np.array_equal(got.view(np.uint32), ref.view(np.uint32))}")


if __name__ == "__main__":
    main()
