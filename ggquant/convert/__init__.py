"""The jobs. Each reads top to bottom: open -> map -> plan -> encode -> write (DESIGN.md).

    hf_to_gguf     `ggquant convert HF_DIR --to gguf`         (convert)
    gguf_to_hf     `ggquant convert MODEL.gguf --to hf`       (export_hf)
    gguf_to_gguf   `ggquant quantize IN.gguf OUT.gguf`        (quantize_gguf, llama-quantize)
    to_compressed_tensors, to_glq                              (--to compressed-tensors / glq)

Shared steps: plan.py (the plan records and their report), quantized.py (already-quantized
checkpoints: their weights and the exact/lossy decision), encode.py (rows -> GGML bytes, the
pipeline). Nothing below this package (formats/, arch/, quant/, kernels/) imports from it.
"""

from ggquant.convert.gguf_to_gguf import quantize_gguf
from ggquant.convert.gguf_to_hf import export_hf
from ggquant.convert.hf_to_gguf import convert, plan_conversion

__all__ = ["convert", "plan_conversion", "export_hf", "quantize_gguf"]
