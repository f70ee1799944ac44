"""The `ggquant run` and `ggquant parity` commands (registered on the main group in ggquant/cli.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ggquant.errors import GGQuantError
from ggquant.files import check_overwrite
from ggquant.runtime.hf_source import RUNTIME_OUTTYPES


def _default_text() -> tuple[str, str]:
    """Real text present on every machine with Python: the interpreter's own LICENSE file."""
    import sysconfig

    p = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if not p.is_file():
        raise GGQuantError("no --text given and the default text (Python's LICENSE.txt) is missing; pass --text FILE")
    return p.read_text(encoding="utf-8", errors="replace"), str(p)


@click.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", help="Prompt text.")
@click.option("--prompt-file", "-f", type=click.Path(path_type=Path), help="Read the prompt from a file.")
@click.option("-n", "--n-predict", "n_predict", type=int, default=128, show_default=True,
              help="Tokens to generate.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Temperature; 0 is greedy.")
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--min-p", type=float, default=0.05, show_default=True)
@click.option("--seed", "-s", type=int, default=None, help="Random seed for sampling.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--ctx-size", "-c", "ctx", type=int, default=None,
              help="Context size in tokens (default: prompt + n, at most the model's training context).")
@click.option("--batch-size", "-b", "n_batch", type=int, default=512, show_default=True,
              help="Prompt tokens per forward pass.")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token to the prompt.")
@click.option("--special", is_flag=True, help="Parse special tokens such as <start_of_turn> in the prompt.")
@click.option("--logits-out", type=click.Path(path_type=Path),
              help="Save the float32 logits of every prompt position, [n_tokens, n_vocab], as .npy.")
@click.option("--force", is_flag=True, help="Overwrite --logits-out if it exists.")
@click.option("--outtype", type=click.Choice([*RUNTIME_OUTTYPES, "auto"], case_sensitive=False),
              default=None, help="MODEL is a Hugging Face folder: the type its weights are converted to in memory, "
              "as `ggquant convert --outtype` would write them (default: the dtype they are stored in, bf16/f16/f32).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of streaming the text.")
def run_command(model, prompt, prompt_file, n_predict, temp, top_k, top_p, min_p, seed, device, threads, ctx,
                n_batch, no_bos, special, logits_out, force, outtype, as_json):
    """Generate text with ggquant's own runtime (streams the text). MODEL is a GGUF, or a Hugging Face
    folder (Gemma 4, Gemma 3) converted in memory exactly as `ggquant convert` would, without writing a GGUF."""
    import numpy as np

    from ggquant.runtime.generate import run
    from ggquant.runtime.hf_source import weights_label

    if prompt is not None and prompt_file is not None:
        raise GGQuantError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise GGQuantError(f"--prompt-file {prompt_file}: no such file")
        prompt = prompt_file.read_text(encoding="utf-8")
    if prompt is None:
        prompt = ""
    if logits_out is not None:
        check_overwrite([logits_out], force)
    out = sys.stdout
    started = []

    def on_text(s):  # the prompt is echoed once the model has loaded and tokenized it
        if as_json:
            return
        if not started:
            out.write(prompt)
            started.append(True)
        out.write(s)
        out.flush()

    gen, m, ids = run(model, prompt, n_predict, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                      device=device, threads=threads, ctx=ctx, n_batch=n_batch, add_bos=not no_bos, special=special,
                      outtype=outtype, all_logits=logits_out is not None, on_text=on_text)
    if not as_json and not started:
        out.write(prompt)
    if logits_out is not None:
        logits_out.parent.mkdir(parents=True, exist_ok=True)
        np.save(logits_out, gen.prompt_logits.astype(np.float32))
    summary = {"model": str(model), "device": device, "weights": weights_label(m.reader), "prompt_tokens": len(ids),
               "generated_tokens": len(gen.ids), "stop": gen.stop, "prompt_tokens_per_s": gen.prompt_tps,
               "decode_tokens_per_s": gen.decode_tps, "text": gen.text, "ids": gen.ids}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        out.write("\n")
        where = "" if summary["weights"] == "GGUF" else summary["weights"] + "; "
        click.echo(f"[{where}{len(ids)} prompt tokens at {gen.prompt_tps:.1f} tok/s, {len(gen.ids)} generated at "
                   f"{gen.decode_tps:.1f} tok/s, stop: {gen.stop}]", err=True)


@click.command("parity")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--against", required=True, help="llama.cpp, a Hugging Face folder, or another GGUF.")
@click.option("--text", "text_file", type=click.Path(path_type=Path),
              help="Text to evaluate (default: Python's LICENSE.txt).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, default=None, help="Stop after this many chunks.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", "-t", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG of KL per position and per chunk.")
def parity_command(model, against, text_file, ctx, chunks, device, threads, as_json, plot):
    """Compare ggquant's logits with llama.cpp, transformers or another GGUF, chunk by chunk. MODEL is a GGUF
    or a Hugging Face folder (run as its F32 conversion, built in memory; for --against llama.cpp the folder
    is also converted to a temporary F32 GGUF, removed afterwards)."""
    from ggquant.parity.run import format_result, read_text, run_parity
    from ggquant.parity.run import plot as do_plot

    if chunks is not None and chunks < 1:
        raise GGQuantError(f"--chunks must be at least 1, got {chunks}")
    if plot is not None:  # fail before the long run when matplotlib is missing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise GGQuantError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    text = read_text(text_file) if text_file is not None else _default_text()[0]

    def progress(i, n, stats):
        if not as_json:
            s = stats.summary()
            click.echo(f"chunk {i}/{n}: KL mean {s['kl_mean']:.3e}  top-1 {100 * s['top1_agreement']:.2f}%  "
                       f"max |dlogit| {s['max_abs_logit_diff']:.3e}", err=True)

    res = run_parity(model, against, text, ctx=ctx, chunks=chunks, device=device, threads=threads,
                     progress=progress, log=None if as_json else (lambda msg: click.echo(msg, err=True)))
    if plot is not None:
        do_plot(res, plot)
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=1))
    else:
        click.echo(format_result(res))
