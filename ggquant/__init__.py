"""ggquant: move LLM weights into and out of GGUF, bit-exact with ggml, and prove each conversion.

The Python API mirrors the command line, one function per verb, with the CLI's flags as keyword
arguments (imports are lazy, so `import ggquant` stays cheap):

    ggquant.convert("gemma-3-270m/", outtype="q8_0", outfile="g.gguf")    # ggquant convert
    ggquant.quantize("g-F32.gguf", "g-Q4_K_M.gguf", "Q4_K_M", imatrix=...)  # ggquant quantize
    ggquant.imatrix("g-F32.gguf", "calib.txt", "imatrix.gguf", ctx=512)    # ggquant imatrix
    ggquant.run("g.gguf", "The capital of France is", n_predict=16)        # ggquant run
    ggquant.parity("g.gguf", "llama.cpp", text)                            # ggquant parity
    ggquant.inspect("g.gguf")                                              # ggquant inspect --json
    ggquant.verify("g-Q4_K_M.gguf", source="g-F32.gguf", imatrix=...)     # ggquant verify

Mixed precision is `quantize` with `mix=ggquant.Mix(target_bpw=4.5)` (--target-bpw), `like=` or
`tensor_type_file=`.
"""

__version__ = "0.1.0"


def convert(src, *, to: str = "gguf", **kwargs):
    """`ggquant convert SRC --to gguf|hf|glq`: see ggquant.convert.convert (HF folder -> GGUF),
    ggquant.convert.export_hf (GGUF -> HF; linears= for compressed-tensors) and
    ggquant.convert.to_glq.export_glq."""
    if to == "gguf":
        from ggquant.convert import convert as job
    elif to == "hf":
        from ggquant.convert import export_hf as job
    elif to == "glq":
        from ggquant.convert.to_glq import export_glq as job
    else:
        from ggquant.errors import GGQuantError

        raise GGQuantError(f"to={to!r}: expected gguf, hf or glq (compressed-tensors: to='hf', "
                           f"linears=ggquant.convert.to_compressed_tensors.CompressedTensorsLinears())")
    return job(src, **kwargs)


def quantize(inp, out, outtype=None, **kwargs):
    """`ggquant quantize`: see ggquant.convert.gguf_to_gguf.quantize_gguf."""
    from ggquant.convert import quantize_gguf

    return quantize_gguf(inp, out, outtype, **kwargs)


def Mix(**kwargs):  # noqa: N802 (the options record, constructed like a class)
    """--target-bpw / --target-size options for `quantize(mix=...)`: ggquant.convert.mix.Mix."""
    from ggquant.convert.mix import Mix as _Mix

    return _Mix(**kwargs)


def verify(quantized, *, source, imatrix=None, **kwargs):
    """`ggquant verify Q --source F [--imatrix I]`: see ggquant.convert.verify.verify_gguf."""
    from ggquant.convert.verify import verify_gguf

    return verify_gguf(quantized, source, imatrix=imatrix, **kwargs)


def imatrix(model, text_file, out=None, *, output_format: str = "gguf", force: bool = False, **kwargs):
    """`ggquant imatrix MODEL -f TEXT [-o OUT]`: collect; also save to `out` when given.
    Returns (Imatrix, stats); see ggquant.imatrix.collect.collect_imatrix."""
    from ggquant.imatrix.collect import collect_imatrix
    from ggquant.imatrix.files import save_dat, save_gguf

    im, stats = collect_imatrix(model, text_file, **kwargs)
    if out is not None:
        (save_gguf if output_format == "gguf" else save_dat)(im, out, force=force)
    return im, stats


def run(model, prompt: str = "", n_predict: int = 128, **kwargs):
    """`ggquant run`: returns the Generation (text, ids, speeds); see ggquant.runtime.generate.run."""
    from ggquant.runtime.generate import run as _run

    return _run(model, prompt, n_predict, **kwargs)[0]


def parity(model, against, text: str, **kwargs):
    """`ggquant parity MODEL --against REF`: see ggquant.parity.run.run_parity."""
    from ggquant.parity.run import run_parity

    return run_parity(model, against, text, **kwargs)


def inspect(path) -> dict:
    """`ggquant inspect --json`: a dict describing a GGUF file or a safetensors folder."""
    from ggquant.formats.inspect import inspect as _inspect

    return _inspect(path)
