"""Exact transcoding vs dequantize + requantize, on the same quantized tensor in the same run.

    .venv/bin/python bench/transcode.py [--rows 4096] [--cols 4096] [--threads 2] [--repeat 3]

Each case is one weight [rows, cols] in a quantized checkpoint layout, read through
ggquant.formats.quantized.open_quantized from in-memory arrays (no disk I/O):

    ct-int4-g128   compressed-tensors pack-quantized int4 sym group 128, bf16 scales -> Q4_0 exact
    gptq-asym4     GPTQ v1 int4 asym group 128, fp16 scales                     -> Q5_0 exact
    ct-int8-chan   compressed-tensors pack-quantized int8 sym channel           -> Q8_0 exact
    mlx-4bit-g64   MLX affine 4-bit group 64, bf16 scales/biases                -> Q4_1 exact

Columns (MB/s of float32-equivalent weight, rows*cols*4 bytes, best of --repeat):
    convert        what `ggquant convert` runs per exact tensor (convert.encode.exact_chunk):
                   the source's blocks (unpacked codes + scales), then one numba pass that packs,
                   reads each block back as ggml does and compares it with the source value
    exact+verify   the general packer (ggquant.quant.transcode) with verify=True: ggml-dequantize
                   the blocks and compare with the source's dequantization bit for bit
    exact          the general packer alone (verify=False)
    dequant        the source's exact float32 dequantization alone
    deq+same       dequantize, then quantize to the same GGML type (ggml's reference quantizer,
                   ggquant's numba port): what a converter without exact transcoding does, and lossy
    deq+Q4_K       dequantize, then quantize to Q4_K (the usual requantization target)
"""

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggquant.fixtures.quantized import pack_bits_rows  # noqa: E402
from ggquant.convert.encode import exact_chunk  # noqa: E402
from ggquant.formats.quantized import open_quantized  # noqa: E402
from ggquant.quant import types as qtypes  # noqa: E402


def best_of(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _bf16(x):
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _scales(rng, shape):
    s = (rng.random(shape) * 0.01 + 1e-3).astype(np.float32)
    return (s.view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16 values


def _ct(rng, R, N, bits, group):
    half = 1 << (bits - 1)
    q = rng.integers(-half, half, (R, N))
    G = 1 if group == -1 else N // group
    strategy = {"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group}
    cfg = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "version": "0.20.0", "ignore": [], "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": bits, "type": "int", "symmetric": True, **strategy}}}}}
    t = {"m.weight_packed": pack_bits_rows((q + half).astype(np.uint32), bits),
         "m.weight_scale": _bf16(_scales(rng, (R, G))), "m.weight_shape": np.array([R, N], dtype=np.int64)}
    return cfg, t


def _gptq_asym(rng, R, N, group=128, bits=4):
    q = rng.integers(0, 16, (R, N)).astype(np.uint32)
    G = N // group
    z = rng.integers(0, 16, (R, G)).astype(np.int64)
    per = 32 // bits
    words = np.zeros((G, R * bits // 32), dtype=np.int64)
    for j in range(per):
        words += (z.T[:, j::per] - 1) << (bits * j)  # v1: zero - 1
    cfg = {"quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": False,
                                   "desc_act": False, "format": "gptq"}}
    t = {"m.qweight": pack_bits_rows(q, bits).view(np.uint32).T.copy().view(np.int32),
         "m.qzeros": (words & 0xFFFFFFFF).astype(np.uint32).view(np.int32),
         "m.scales": (rng.random((G, R)) * 0.01 + 1e-3).astype(np.float16),
         "m.g_idx": (np.arange(N) // group).astype(np.int32)}
    return cfg, t


def _mlx(rng, R, N, bits=4, group=64):
    u = rng.integers(0, 1 << bits, (R, N)).astype(np.uint32)
    s = _scales(rng, (R, N // group))
    b = -s * 8
    cfg = {"quantization": {"bits": bits, "group_size": group, "mode": "affine"}}
    t = {"m.weight": pack_bits_rows(u, bits).view(np.uint32), "m.scales": _bf16(s), "m.biases": _bf16(b)}
    return cfg, t


CASES = {
    "ct-int4-g128": (lambda rng, R, N: _ct(rng, R, N, 4, 128), T.Q4_0),
    "gptq-asym4": (_gptq_asym, T.Q5_0),
    "ct-int8-chan": (lambda rng, R, N: _ct(rng, R, N, 8, -1), T.Q8_0),
    "mlx-4bit-g64": (_mlx, T.Q4_1),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    R, N = a.rows, a.cols
    mb = R * N * 4 / 1e6
    print(f"{R}x{N} weight ({mb:.0f} MB as float32), {a.threads} numba threads, best of {a.repeat}; MB/s of float32")
    print(f"{'case':<14} {'type':<5} {'convert':>8} {'exact+verify':>12} {'exact':>8} {'dequant':>8} {'deq+same':>9} "
          f"{'deq+Q4_K':>9} {'convert / deq+same':>19}")
    for name in a.cases.split(","):
        make, qtype = CASES[name]
        cfg, tensors = make(rng, R, N)
        rec = open_quantized(cfg, list(tensors), tensors.__getitem__)["m.weight"]
        res = rec.exact_ggml([qtype], rows=(0, 8))  # compile the kernels on a small slice
        assert res is not None and res[0] == qtype, rec.not_exact_reason
        same, q4k = qtypes.get(qtype), qtypes.get(T.Q4_K)
        same.quantize(rec.dequantize((0, 8)))
        q4k.quantize(rec.dequantize((0, 8)))
        assert not isinstance(exact_chunk(rec, qtype, (0, 8)), str)
        cv = mb / best_of(lambda: exact_chunk(rec, qtype, (0, R)), a.repeat)
        ev = mb / best_of(lambda: rec.exact_ggml([qtype], verify=True), a.repeat)
        ex = mb / best_of(lambda: rec.exact_ggml([qtype], verify=False), a.repeat)
        dq = mb / best_of(lambda: rec.dequantize(), a.repeat)
        rq = mb / best_of(lambda: same.quantize(rec.dequantize()), a.repeat)
        rk = mb / best_of(lambda: q4k.quantize(rec.dequantize()), 1)
        print(f"{name:<14} {qtype.name:<5} {cv:8.0f} {ev:12.0f} {ex:8.0f} {dq:8.0f} {rq:9.0f} {rk:9.0f} "
              f"{cv / rq:18.2f}x")


if __name__ == "__main__":
    main()
