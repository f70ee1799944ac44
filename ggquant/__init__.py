"""ggquant: move LLM weights into and out of GGUF, bit-exact with ggml, and prove each conversion."""

__version__ = "0.1.0"


# The Python API mirrors the CLI; imports are lazy so `import ggquant` stays cheap.
def quantize(inp, out, outtype, **kwargs):
    """`ggquant quantize`: see ggquant.quant.requantize.quantize_gguf."""
    from ggquant.quant.requantize import quantize_gguf

    return quantize_gguf(inp, out, outtype, **kwargs)


def inspect(path) -> dict:
    """`ggquant inspect --json`: a dict describing a GGUF file or a safetensors folder."""
    from ggquant.formats.inspect import inspect as _inspect

    return _inspect(path)
