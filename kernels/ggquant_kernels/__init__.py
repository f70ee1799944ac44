"""Compute kernels only (numba CPU, torch/triton CUDA). Installed as ``ggquant.kernels``.

No file-format or model knowledge lives here: kernels see float32 matrices and raw GGML
block bytes laid out as ``uint8[n_rows, row_bytes]``. quants/ holds the quant families
(quantize and dequantize together), cpu/ the CPU runtime's products and ops, cuda/ the CUDA
runtime's decoders and Triton kernels; common.py and qsearch.py are the scalar helpers and
ggml's scale searches they share.
"""
