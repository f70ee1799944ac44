"""The numba CPU kernels of the runtime, bit-identical to what ggml-cpu runs for llama.cpp: simd
(LLVM vector primitives), actquant (the activation conversion of a product), matmul (one product per
weight type, CpuIsa), iqmatmul and b32matmul (the low-bit types' products), ops (attention, RoPE, norms, GELU, softcap)."""
