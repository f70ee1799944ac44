"""ggquant: move LLM weights into and out of GGUF, bit-exact with ggml, and prove each conversion."""

__version__ = "0.1.0"
