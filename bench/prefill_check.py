"""Prefill (batched products on tensor cores) checks for the GPU machine (issue 17; CI has no GPU,
tests/runtime/test_cuda_prefill.py runs the same comparisons with torch on the CPU).

    python3 bench/prefill_check.py GGUF [GGUF ...]

For each GGUF, 40 prompt tokens in one batch, logits of every position:
  - each prefill mode (cublas, triton, f32) on CUDA against ggquant's CPU backend (llama.cpp's CPU
    arithmetic) and against the CUDA f32 mode: max |dlogit|, relative to max |logit|, argmax
    agreement;
  - prefill == decode: the same tokens one at a time (batch-1 Triton matvec, CUDA graphs);
  - chunked prefill (n_batch 16) against one batch.
Exit status 1 when a check exceeds its bound (against the CPU backend 5% of max |logit|, whose Q8_0/Q8_K activations alone move the logits
~2%; against the f32 mode and decode 1%; argmax >= 90%).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch

    from ggquant.formats.gguf import GGUFReader
    from ggquant.runtime.cuda import CUDABackend
    from ggquant.runtime.model import ARCHITECTURES, Session, load_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a local run of the same code (torch ops only)
    print("device:", torch.cuda.get_device_name() if dev == "cuda" else "cpu")
    bad = 0
    for path in sys.argv[1:]:
        name = Path(path).name
        with_cpu = os.environ.get("PREFILL_CHECK_CPU", "1") != "0"  # 0: skip the CPU backend (numba compile time)
        n_vocab = int(GGUFReader(path).get("tokenizer.ggml.tokens").__len__())
        ids = [2] + [int(t) for t in np.random.default_rng(1).integers(min(21, n_vocab - 1), min(500, n_vocab), 39)]
        ref_cpu = Session(load_model(path, device="cpu"), 64, n_batch=64).eval(ids, "all") if with_cpu else None

        def model(mode):
            r = GGUFReader(path)
            return ARCHITECTURES[r.get("general.architecture")](r, CUDABackend(device=dev, prefill=mode))

        ref_f32 = Session(model("f32"), 64, n_batch=64).eval(ids, "all")
        scale = float(np.abs(ref_f32).max())

        def report(what, got, ref, bound=0.05, argmax=0.9):
            nonlocal bad
            d = float(np.abs(got - ref).max())
            agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
            ok = np.isfinite(got).all() and d <= bound * scale and agree >= argmax
            bad += not ok
            print(f"{name}: {what:34} max |dlogit| {d:.3e} ({d / scale:.1e} of max |logit|), argmax {agree:.0%}"
                  f"{'' if ok else '  <-- FAIL'}", flush=True)

        if with_cpu:
            report("cuda f32 vs cpu", ref_f32, ref_cpu)
        for mode in ("cublas", "triton"):
            m = model(mode)
            got = Session(m, 64, n_batch=64).eval(ids, "all")
            if with_cpu:
                report(f"cuda {mode} vs cpu", got, ref_cpu)
            report(f"cuda {mode} vs cuda f32", got, ref_f32, bound=0.01)
            s = Session(m, 64, n_batch=64)
            dec = np.concatenate([s.eval([t], "all") for t in ids])
            report(f"cuda {mode} prefill vs decode", got, dec, bound=0.01)
            s = Session(m, 64, n_batch=16)
            chunked = np.concatenate([s.eval(ids[i:i + 16], "all") for i in range(0, len(ids), 16)])
            report(f"cuda {mode} 16-token chunks vs one batch", chunked, got)
    print("FAILED" if bad else "all prefill checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
