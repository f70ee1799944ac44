"""The CUDA runtime's kernels: dequant (torch block decoders and repacked layouts; torch is passed in)
and triton (the batch-1 decode kernels; importing it needs triton)."""
