"""HF -> GGUF conversion: ggquant vs llama.cpp's convert_hf_to_gguf.py, wall time and peak RSS, same run.

    .venv/bin/python bench/convert.py [--outtypes bf16,q8_0] [--repeat 1] [--json] [--keep]
    .venv/bin/python bench/convert.py --ple-table [--outtypes bf16,q8_0]
    .venv/bin/python bench/convert.py --moe [--moe-llama-cpp] [--outtypes bf16,q8_0]
    .venv/bin/python bench/convert.py --llama [--outtypes bf16,q8_0]

Model (built once, cached under .cache/bench/): a random-weight Gemma4ForCausalLM with E4B's
real layer dimensions (research note anchor-llamacpp-convert.md): hidden 2560, FFN 10240,
8 query / 2 KV heads, head dims 256 (sliding) / 512 (full), per-layer embeddings 256, vocab
32768; 12 layers (sliding x7, full, sliding x3, full; the last 4 KV-shared), tied
embeddings, softcap 30. 1.32 B parameters, 2.64 GB of bf16 in two shards.

Each conversion runs in a fresh process started by a small wrapper that reports the wall time
of the conversion and `getrusage(RUSAGE_CHILDREN)` (peak RSS of the converter process, its
CPU time); llama.cpp runs through tests/reference.py run_reference_converter (the converter
of the llama-cpp-python 0.3.36 sdist, with its own gguf-py). Both outputs are compared byte
for byte. Anchor (same machine, note above): llama.cpp 20-22 s and 0.98-1.12 GiB peak.
Targets (issue 3): ggquant <= 0.5x llama.cpp's wall time and <= 1.5 GiB peak.

--ple-table: the memory bound on an E4B-size per-layer embedding table. A Gemma 4 whose PLE
table has E4B's real size, 262144 x (42 layers x 256) = 2.82 G elements (5.6 GB of bf16, a
sparse file: mostly holes, every 4096th row random), and tiny everything else (hidden 64),
converted by `ggquant convert`. llama.cpp's converter materialises the table as float32 (about
7.6 bytes per element in bf16, 5.5 in q8_0: ~20 / ~15 GiB predicted) and is not run on it
unless --ple-llama-cpp is given (on a machine with that much memory to spare).

--moe: the memory bound on Gemma 4 26B-A4B's largest tensors (MOE_DIMS below): its stacked
experts are streamed in row chunks within each expert, never materialised whole.

--llama: a random-weight LlamaForCausalLM with Llama 3.2 1B's real config (LLAMA_CONFIG below:
hidden 2048, 16 layers, FFN 8192, 32 query / 8 KV heads of 64, vocab 128256, tied embeddings,
rope_type llama3), 1.24 B parameters, 2.47 GB of bf16 in two shards, with Meta's Llama 3
tokenizer as the llama3 fixture writes it (fixtures/llama_vocab.py); ggquant and llama.cpp's
converter, outputs compared byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_DIR = ROOT / ".cache" / "bench"
BUILDER_VERSION = 1  # bump to rebuild cached models

SLIDING, FULL = "sliding_attention", "full_attention"
# E4B's per-layer dimensions, 12 layers. The second full layer sits at index 7 so that the two
# layers before the first KV-shared one are sliding then full (llama.cpp's reuse map, research
# note gemma4-architecture-and-parity.md section 3).
E4B_DIMS = dict(hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=2,
                head_dim=256, global_head_dim=512, hidden_size_per_layer_input=256)
BIG_LAYERS = [SLIDING] * 7 + [FULL] + [SLIDING] * 3 + [FULL]
BIG_SHARED = 4
BIG_VOCAB = 32768
SHARD_BYTES = 2 * 10**9  # save_pretrained(max_shard_size="2GB")

# --ple-table: E4B's layer count and PLE width, real vocabulary size, tiny everything else
PLE_LAYERS = ([SLIDING] * 5 + [FULL]) * 7
PLE_SHARED = 18
PLE_VOCAB = 262144
PLE_DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1,
                head_dim=32, global_head_dim=64, hidden_size_per_layer_input=256)
PLE_RANDOM_ROW_EVERY = 4096

# --moe: google/gemma-4-26B-A4B's real layer dimensions (hidden 2816, 128 experts of width 704,
# top 8, dense MLP 2112, 16 query / 8 KV heads, 2 KV heads on full layers with K = V, no PLE) and
# real vocabulary, two layers (sliding, full): the largest tensors of the real model, the stacked
# experts gate_up_proj [128, 1408, 2816] (0.95 GiB of bf16) and down_proj [128, 2816, 704], and
# the token embeddings [262144, 2816] (1.4 GiB), stored as sparse files
MOE_LAYERS = [SLIDING, FULL]
MOE_VOCAB = 262144
MOE_DIMS = dict(hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
                num_global_key_value_heads=2, head_dim=256, global_head_dim=512, hidden_size_per_layer_input=0,
                attention_k_eq_v=True, enable_moe_block=True, num_experts=128, top_k_experts=8,
                moe_intermediate_size=704)
# --llama: meta-llama/Llama-3.2-1B's config.json (transformers 4.45 layout: rope_theta + rope_scaling)
LLAMA_CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16", vocab_size=128256,
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=131072,
    tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0, mlp_bias=False, pretraining_tp=1,
    initializer_range=0.02, use_cache=True, bos_token_id=128000, eos_token_id=128001, rope_theta=500000.0,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
MOE_SPARSE = ("model.embed_tokens.weight",) + tuple(
    f"model.layers.{i}.experts.{p}" for i in range(len(MOE_LAYERS)) for p in ("gate_up_proj", "down_proj"))


# =============================================================================================
# Building the models
# =============================================================================================


def text_config(dims: dict, layer_types: list[str], n_shared: int, vocab: int) -> dict:
    dims = {"attention_k_eq_v": False, "enable_moe_block": False, **dims}
    return dict(
        architectures=["Gemma4ForCausalLM"], model_type="gemma4_text", dtype="bfloat16",
        vocab_size=vocab, vocab_size_per_layer_input=vocab, num_hidden_layers=len(layer_types),
        layer_types=list(layer_types), num_kv_shared_layers=n_shared, sliding_window=512,
        max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=30.0, tie_word_embeddings=True, use_double_wide_mlp=False, bos_token_id=2,
        eos_token_id=1, pad_token_id=0,
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                         FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}},
        **dims,
    )


def write_tokenizer(out: Path, config: dict) -> None:
    """The tokenizer folder files for config: Gemma 4's below, Llama 3's from the llama3 fixture."""
    if config["architectures"][0] == "LlamaForCausalLM":
        from ggquant.fixtures.llama_vocab import write_llama3_tokenizer

        ids = write_llama3_tokenizer(out)
        if ids["vocab_size"] != config["vocab_size"]:
            raise SystemExit(f"Llama 3 tokenizer has {ids['vocab_size']} tokens, config {config['vocab_size']}")
        return
    write_gemma4_tokenizer(out, config["vocab_size"])


def write_gemma4_tokenizer(out: Path, vocab_size: int) -> None:
    """A Gemma 4 style byte-fallback BPE of exactly vocab_size tokens: the Gemma 4 specials, the
    256 byte pieces, n single CJK characters and then their pairs (one merge each), written by
    the fixture tokenizer writer (tokenizer.json, tokenizer_config.json with a chat template)."""
    import ggquant.fixtures.tokenizer as tk

    n_trained = vocab_size - len(tk.GEMMA4_SPECIALS) - len(tk.BYTE_PIECES)
    n_chars = next(n for n in range(1, 4096) if n + n * n >= n_trained)
    chars = [chr(0x4E00 + i) for i in range(n_chars)]
    pairs = [(a, b) for a in chars for b in chars][: n_trained - n_chars]
    tokens = tuple(tk.GEMMA4_SPECIALS) + tk.BYTE_PIECES + tuple(chars) + tuple(a + b for a, b in pairs)
    vocab = tk.TinyVocab("gemma4", tokens, tuple(pairs), tuple(tk.GEMMA4_SPECIALS), n_chars)
    assert vocab.size == vocab_size
    with mock.patch.object(tk, "build_vocab", lambda family, size: vocab):
        tk.write_tokenizer(out, "gemma4", vocab_size=vocab_size, chat_template="config")


def tensor_shapes(config: dict, folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, from ggquant's own shape table for its architecture."""
    from ggquant.arch import arch_class

    arch = arch_class(config["architectures"][0])(folder, config, None)
    return {n: s for n, (s, required) in sorted(arch.expected_shapes().items()) if required}


def random_bf16(rng: np.random.Generator, n: int, name: str) -> np.ndarray:
    """Random bf16 bits: norm gains and layer scalars near 1, matrices N(0, 0.02)."""
    x = rng.standard_normal(n, dtype=np.float32)
    if name.endswith("norm.weight") or name.endswith("layer_scalar"):
        x = x * np.float32(0.05) + np.float32(1.0)
    else:
        x *= np.float32(0.02)
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def write_shards(folder: Path, shapes: dict[str, tuple[int, ...]], sparse: set[str] = frozenset(),
                 seed: int = 0) -> None:
    """bf16 safetensors shards (greedy, 2 GB) + index. Tensors in `sparse` get a shard of their
    own, stored as a sparse file: zeros, with a random row every PLE_RANDOM_ROW_EVERY rows."""
    rng = np.random.default_rng(seed)
    groups: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for n in [n for n in shapes if n not in sparse]:
        nb = int(np.prod(shapes[n])) * 2
        if cur and size + nb > SHARD_BYTES:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nb
    groups.append(cur)
    groups += [[n] for n in sorted(sparse)]
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        head, off = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            nb = int(np.prod(shapes[n])) * 2
            head[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[n] = fname
        raw = json.dumps(head).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            start = f.tell()
            for n in names:
                shape, count = shapes[n], int(np.prod(shapes[n]))
                if n in sparse:
                    rows, cols = shape[0], int(np.prod(shape[1:]))
                    f.truncate(start + count * 2)
                    for r in range(0, rows, PLE_RANDOM_ROW_EVERY):
                        f.seek(start + r * cols * 2)
                        f.write(random_bf16(rng, cols, n).tobytes())
                    f.seek(start + count * 2)
                else:
                    left = count
                    while left:
                        k = min(left, 1 << 24)
                        f.write(random_bf16(rng, k, n).tobytes())
                        left -= k
                start += count * 2
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in shapes.values())},
                    "weight_map": weight_map}, indent=2) + "\n")


def build(name: str, config: dict, sparse: tuple[str, ...] = ()) -> Path:
    """The model folder, built once into .cache/bench/<name>-v<BUILDER_VERSION>/<name>."""
    target = BENCH_DIR / f"{name}-v{BUILDER_VERSION}" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        t0 = time.perf_counter()
        folder = tmp / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_tokenizer(folder, config)
        shapes = tensor_shapes(config, folder)
        write_shards(folder, shapes, set(sparse))
        os.rename(folder, target)
        n = sum(int(np.prod(s)) for s in shapes.values())
        print(f"built {target} ({n / 1e9:.3f} B parameters) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# =============================================================================================
# Measuring
# =============================================================================================

# Runs one conversion in a child process and reports its wall time and its resources
# (RUSAGE_CHILDREN of this wrapper = the converter process and anything it started).
_WRAPPER = r"""
import json, resource, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
tool, src, out, outtype = sys.argv[2:6]
t = time.perf_counter()
if tool == "llama.cpp":
    from tests.oracles.llama_converter import run_reference_converter
    run_reference_converter(src, out, outtype, timeout=3600)
else:
    subprocess.run([sys.executable, "-m", "ggquant", "convert", src, "--outtype", outtype, "--outfile", out,
                    "--force"], check=True, stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": ru.ru_maxrss / 1024}))
"""


def measure(tool: str, src: Path, out: Path, outtype: str) -> dict:
    if out.exists():
        out.unlink()
    subprocess.run(["sync"], check=False)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", _WRAPPER, str(ROOT), tool, str(src), str(out), outtype],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{tool} --outtype {outtype} failed:\n{res.stderr[-4000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r.update(tool=tool, outtype=outtype, bytes=out.stat().st_size)
    return r


def run_pair_bench(args) -> dict:
    config = text_config(E4B_DIMS, BIG_LAYERS, BIG_SHARED, BIG_VOCAB)
    model = build("gemma4-e4b-dims-1.3b", config)
    out_dir = BENCH_DIR / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, ratios = [], {}
    for outtype in args.outtypes:
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for tool in ("llama.cpp", "ggquant"):  # interleaved: both see the same page cache state
                r = measure(tool, model, out_dir / f"{tool}-{outtype}.gguf", outtype)
                if tool not in best or r["wall_s"] < best[tool]["wall_s"]:
                    best[tool] = r
        ref, ours = out_dir / f"llama.cpp-{outtype}.gguf", out_dir / f"ggquant-{outtype}.gguf"
        same = filecmp.cmp(ref, ours, shallow=False)
        for tool in ("llama.cpp", "ggquant"):
            best[tool]["identical"] = same
            rows.append(best[tool])
        ratios[outtype] = ratio(best["ggquant"], best["llama.cpp"])
        if not args.keep:
            ref.unlink()
            ours.unlink()
    return {"model": str(model), "runs": rows, "ratios": ratios}


def ratio(ours: dict, anchor: dict) -> dict:
    """ggquant's wall time and peak RSS as multiples of llama.cpp's (the anchor), same run."""
    return {"wall": ours["wall_s"] / anchor["wall_s"], "peak_rss": ours["peak_rss_mib"] / anchor["peak_rss_mib"]}


def run_single(args, model: Path, prefix: str, with_llama_cpp: bool) -> tuple[list[dict], dict]:
    """ggquant (and llama.cpp's converter when asked) on one model, each outtype; outputs compared.
    Returns the runs and, with llama.cpp, the ratios per outtype."""
    out_dir = BENCH_DIR / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    tools = ("ggquant", "llama.cpp") if with_llama_cpp else ("ggquant",)
    rows, ratios = [], {}
    for outtype in args.outtypes:
        outs = {tool: out_dir / f"{prefix}-{tool}-{outtype}.gguf" for tool in tools}
        runs = [measure(tool, model, outs[tool], outtype) for tool in tools]
        if with_llama_cpp:
            same = filecmp.cmp(outs["ggquant"], outs["llama.cpp"], shallow=False)
            for r in runs:
                r["identical"] = same
            ratios[outtype] = ratio(runs[0], runs[1])
        rows += runs
        if not args.keep:
            for p in outs.values():
                p.unlink()
    return rows, ratios


def run_ple_bench(args) -> dict:
    config = text_config(PLE_DIMS, PLE_LAYERS, PLE_SHARED, PLE_VOCAB)
    model = build("gemma4-e4b-ple-table", config, sparse=("model.embed_tokens_per_layer.weight",))
    rows, ratios = run_single(args, model, "ple", args.ple_llama_cpp)
    n = PLE_VOCAB * len(PLE_LAYERS) * PLE_DIMS["hidden_size_per_layer_input"]
    return {"model": str(model), "ple_elements": n, "runs": rows, "ratios": ratios}


def run_moe_bench(args) -> dict:
    """Peak memory converting a 26B-A4B-shaped checkpoint's largest tensors (target: <= 1.5 GiB)."""
    config = text_config(MOE_DIMS, MOE_LAYERS, 0, MOE_VOCAB)
    model = build("gemma4-26b-a4b-moe-tensors", config, sparse=MOE_SPARSE)
    rows, ratios = run_single(args, model, "moe", args.moe_llama_cpp)
    E, H, F = MOE_DIMS["num_experts"], MOE_DIMS["hidden_size"], MOE_DIMS["moe_intermediate_size"]
    return {"model": str(model), "expert_elements": E * 2 * F * H, "runs": rows, "ratios": ratios}


def run_llama_bench(args) -> dict:
    """A Llama 3.2 1B-shaped checkpoint, ggquant and llama.cpp's converter."""
    model = build("llama3.2-1b-dims", LLAMA_CONFIG)
    rows, ratios = run_single(args, model, "llama", True)
    return {"model": str(model), "runs": rows, "ratios": ratios}


def print_table(result: dict, title: str) -> None:
    print(title)
    print(f"  model: {result['model']}")
    print(f"  {'outtype':<8} {'tool':<10} {'wall s':>8} {'cpu s':>8} {'peak RSS MiB':>13} {'output bytes':>15} "
          f"{'identical':>9}")
    for r in result["runs"]:
        ident = {True: "yes", False: "NO", None: ""}[r.get("identical")]
        print(f"  {r['outtype']:<8} {r['tool']:<10} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['peak_rss_mib']:>13.0f} "
              f"{r['bytes']:>15} {ident:>9}")
    for outtype, q in result.get("ratios", {}).items():
        print(f"  {outtype}: ggquant / llama.cpp wall {q['wall']:.2f}x, peak RSS {q['peak_rss']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outtypes", default="bf16,q8_0", type=lambda s: [x.strip() for x in s.split(",") if x.strip()])
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and outtype (best wall time kept)")
    ap.add_argument("--ple-table", action="store_true", help="convert the E4B-size PLE table model instead")
    ap.add_argument("--ple-llama-cpp", action="store_true",
                    help="with --ple-table: also run llama.cpp's converter (needs ~20 GiB of free memory)")
    ap.add_argument("--moe", action="store_true",
                    help="convert the 26B-A4B-shaped model (real expert, embedding and attention sizes, 2 layers)")
    ap.add_argument("--moe-llama-cpp", action="store_true", help="with --moe: also run llama.cpp's converter")
    ap.add_argument("--llama", action="store_true",
                    help="convert a random Llama 3.2 1B-shaped model (real config and tokenizer) with both tools")
    ap.add_argument("--keep", action="store_true", help="keep the converted GGUFs under .cache/bench/out")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.llama:
        result = run_llama_bench(args)
        title = "HF -> GGUF, random LlamaForCausalLM with Llama 3.2 1B's config (1.24 B parameters)"
    elif args.moe:
        result = run_moe_bench(args)
        title = (f"26B-A4B-shaped stacked experts ({result['expert_elements'] / 1e6:.0f} M elements per gate_up_proj, "
                 f"{result['expert_elements'] * 2 / 2**30:.2f} GiB bf16) and 262144 x 2816 embeddings, 2 layers")
    elif args.ple_table:
        result = run_ple_bench(args)
        title = (f"E4B-size per-layer embedding table ({result['ple_elements'] / 1e9:.2f} G elements, "
                 f"{result['ple_elements'] * 2 / 2**30:.2f} GiB bf16), ggquant convert")
    else:
        result = run_pair_bench(args)
        title = "HF -> GGUF, random Gemma 4 with E4B layer dimensions (1.32 B parameters)"
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result, title)


if __name__ == "__main__":
    main()
