"""Streaming: a tensor is converted chunk by chunk, never materialised whole.

A 256 MiB bf16 tensor (8192 x 16384, a sparse file with some random rows) goes through the
convert pipeline in a fresh process; its peak RSS may grow by far less than the tensor's
float32 size (512 MiB), which is what a whole-tensor implementation needs at least. The same
script at E4B's per-layer-embedding size (262144 x 10752) is the measurement in the report.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, resource, struct, sys
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from ggquant.convert.plan import TensorPlan
    from ggquant.convert.encode import Pipeline, tensor_chunks
    from ggquant.formats.gguf import GGUFWriter
    from ggquant.formats.safetensors import SafetensorsFile
    from ggquant.quant import types as qt

    folder, qname, rows, cols = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    qtype = T[qname]
    path = os.path.join(folder, "big.safetensors")
    nb = rows * cols * 2
    h = json.dumps({"w": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [0, nb]}}).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + nb)  # sparse: reads as zeros
        for r in range(0, rows, rows // 16):
            f.seek(8 + len(h) + r * cols * 2)
            f.write((rng.standard_normal(cols, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes())
    if qtype != T.BF16:
        qt.get(qtype).quantize(np.ones((2, cols), np.float32))  # compile before measuring
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = SafetensorsFile(path).tensors["w"]
    plan = TensorPlan("w", t.shape, qtype, "test", src=t, hf_name="w", n_outer=t.n_outer)
    w = GGUFWriter(os.path.join(folder, "out.gguf"))
    pipe = Pipeline([lambda: tensor_chunks(plan)])
    w.add_tensor("w", plan.shape, qtype, lambda: pipe.chunks(0))
    w.write()
    pipe.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) // 1024)
''')


@pytest.mark.parametrize("qtype", ["Q8_0", "BF16", "F16"])
def test_peak_memory_is_a_chunk_not_a_tensor(tmp_path, qtype):
    rows, cols = 8192, 16384
    f32_mib = rows * cols * 4 // 2**20
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), qtype, str(rows), str(cols)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    growth = int(res.stdout.split()[-1])
    assert growth < f32_mib // 3, f"peak RSS grew by {growth} MiB converting a {f32_mib} MiB (as f32) tensor"
