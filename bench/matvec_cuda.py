"""Batch-1 matvec speed per weight layout for the i-quant types of issue 14 (IQ4_XS, IQ3_S, IQ2_S,
IQ4_NL, IQ3_XXS, IQ2_XS), on a GPU: the generic
"int8" repack (one int8 code per weight + a float32 scale per 16/32 columns) against the packed
layout (dequant.py PACKED: the block's own bits), the same random blocks for both:

    python bench/matvec_cuda.py                       # all six (under 60 s on an H100)
    python bench/matvec_cuda.py iq3_s                 # one type

Per type and shape (E4B's FFN: N=10240,K=2560 and N=2560,K=10240): us per call, bits read per
weight (the layout's bytes, x not counted), GB/s of those bytes, and the int8/packed time ratio
(> 1: the packed kernel is faster). Weights are read cold (enough copies to exceed the L2 cache)
and calls timed as one CUDA graph (bench/matvec_tune.py's time_calls). Also checks that both
layouts give the same product (float32 accumulation, different order: relative max difference)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from bench.matvec_tune import time_calls  # noqa: E402
from ggquant.kernels.cuda import triton as ck  # noqa: E402
from ggquant.runtime.cuda import repack  # noqa: E402

TYPES = {"iq4_xs": T.IQ4_XS, "iq3_s": T.IQ3_S, "iq2_s": T.IQ2_S, "iq4_nl": T.IQ4_NL, "iq3_xxs": T.IQ3_XXS,
         "iq2_xs": T.IQ2_XS}
SHAPES = [(10240, 2560), (2560, 10240)]
COLD_BYTES = 256 << 20  # > 50 MB of L2


def random_blocks(qtype, n, k):
    """Random block bytes with one sane fp16 d per block (every other byte pattern is a valid block)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = torch.randint(0, 256, (n, k // block * size), dtype=torch.uint8, device="cuda")
    raw.view(n, k // block, size)[..., 0:2] = torch.tensor([0x00, 0x20], dtype=torch.uint8, device="cuda")
    return raw


def main():
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(TYPES)
    print("device:", torch.cuda.get_device_name())
    for name in names:
        qtype = TYPES[name]
        for n, k in SHAPES:
            raw = random_blocks(qtype, n, k)
            x = torch.randn(k, device="cuda")
            layouts = {"int8": repack(torch, qtype, raw, k), "packed": repack(torch, qtype, raw, k, packed=True)}
            ys, times = {}, {}
            for label, (kind, parts) in layouts.items():
                nbytes = sum(p.numel() * p.element_size() for p in parts)
                copies = [tuple(p.clone() for p in parts) for _ in range(max(1, -(-COLD_BYTES // nbytes)))]
                ys[label] = ck.matvec(torch, kind, parts, x, n, k)
                t = time_calls(lambda i: ck.matvec(torch, kind, copies[i % len(copies)], x, n, k),
                               min(1000, max(20, len(copies))))
                times[label] = t
                print(f"{name:6s} {n:5d}x{k:<5d} {label:6s} ({kind:6s}): {t * 1e6:7.1f} us  "
                      f"{8 * nbytes / (n * k):5.3f} bits/weight  {nbytes / t / 1e9:6.0f} GB/s")
            diff = float((ys["packed"] - ys["int8"]).abs().max() / ys["int8"].abs().max())
            print(f"{name:6s} {n:5d}x{k:<5d} int8/packed time ratio {times['int8'] / times['packed']:.2f}  "
                  f"(products agree: max |diff| / max |y| = {diff:.1e})")


if __name__ == "__main__":
    main()
