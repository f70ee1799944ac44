"""GGML quant families, one module per family with quantize and dequantize side by side:
floats (F32/F16/BF16), legacy (Q4_0 ... Q8_0), kquants (Q2_K ... Q6_K), iq4 (IQ4_NL/IQ4_XS),
iquants (the grid i-quants IQ2_XXS ... IQ1_M; their search tables in iqtables), lowbit (TQ1_0/TQ2_0,
MXFP4/NVFP4, Q1_0 and the Q2_0 kernels), and transcode (exact packing of integer codes into legacy
blocks). Each family module lists its types in QUANTIZE / DEQUANTIZE dicts; the registry
(ggquant.quant.types) names them per type."""
