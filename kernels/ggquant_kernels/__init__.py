"""Compute kernels only (numba CPU, torch/triton CUDA). Installed as ``ggquant.kernels``.

No file-format or model knowledge lives here: kernels see float32 matrices and raw GGML
block bytes laid out as ``uint8[n_rows, row_bytes]``.
"""
