"""Activation statistics for the importance matrix, collected from ggquant's runtime.

What llama-imatrix accumulates (tools/imatrix/imatrix.cpp, IMatrixCollector::collect_imatrix;
research note imatrix-and-quants.md §1.1), reproduced here:

- only matmuls whose weight name starts with `blk.` (plus `output.weight` with
  --process-output); a tied output is a matmul with token_embd, so it is never collected;
- only batches of at least 16 tokens (`src1->ne[1] >= 16`);
- per input column j, sum over tokens of x[j]^2, accumulated in float32 token by token;
- one count per dense weight: the number of tokens seen;
- stacked experts (MUL_MAT_ID, a mixture of experts): every batch, whatever its size; one row
  of sums and one count per expert, a token's input added to the row of each expert it was
  routed to, slot by slot (for each of the k selected experts, every token in turn), in
  float32. An expert nobody was routed to keeps count 0 (llama-quantize then uses 1.0 for its
  imatrix, ggquant.imatrix.files.Imatrix.normalised).

The collector wraps the runtime backend's `matmul`/`matmuls`, so it sees exactly the float32
inputs the model multiplies with each weight.

MODEL is a GGUF or a Hugging Face folder. A folder runs as its F32 conversion, built in memory
(runtime/hf_source.py), so the statistics (and the file) equal those collected on the F32 GGUF
that `ggquant convert --outtype f32` writes; another converter outtype can be asked for.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ggquant.imatrix.files import Entry, Imatrix

MIN_BATCH_TOKENS = 16  # imatrix.cpp: `if (src1->ne[1] < 16 || src1->type != GGML_TYPE_F32) return false`
OUTPUT_WEIGHT = "output.weight"
HF_FOLDER_OUTTYPE = "f32"  # llama-imatrix is meant to run on the unquantized model


@nb.njit(cache=True)
def _accumulate(acc, x):
    # imatrix.cpp: for each row (token) in order, acc[j] += x[j]*x[j] in float32
    for t in range(x.shape[0]):
        for j in range(x.shape[1]):
            acc[j] += x[t, j] * x[t, j]


@nb.njit(cache=True)
def _accumulate_experts(acc, counts, x, ids):
    # imatrix.cpp (MUL_MAT_ID): for idx in 0..n_used-1, for row in 0..n_tokens-1:
    #   ex = ids[row, idx]; acc[ex][j] += x[j]*x[j] with x = src1[row, idx % ne11], in float32
    T, k = ids.shape
    S = x.shape[1]
    for idx in range(k):
        for row in range(T):
            ex = ids[row, idx]
            counts[ex] += 1
            xr = x[row, idx % S]
            for j in range(x.shape[2]):
                acc[ex, j] += xr[j] * xr[j]


class Collector:
    def __init__(self, chunk_size: int, process_output: bool = False):
        self.chunk_size = chunk_size
        self.process_output = process_output
        self._sums: dict[str, np.ndarray] = {}
        self._dev: dict = {}  # name -> float32 torch accumulator on a GPU (observe_device)
        self._dev_counts: dict = {}  # name -> int64 torch per-expert counts on a GPU (observe_experts_device)
        self.counts: dict[str, int] = {}

    @property
    def sums(self) -> dict[str, np.ndarray]:
        """Per weight, the float32 sums of x^2 per input column (device accumulators copied back,
        with the per-expert counts kept on the device)."""
        for name, acc in self._dev.items():
            self._sums[name] = acc.detach().cpu().numpy().astype(np.float32)
        for name, c in self._dev_counts.items():
            self.counts[name] = c.cpu().numpy()
        return self._sums

    def wanted(self, name: str, n_tokens: int) -> bool:
        if n_tokens < MIN_BATCH_TOKENS:
            return False
        return name.startswith("blk.") or (self.process_output and name == OUTPUT_WEIGHT)

    def observe(self, name: str, x) -> None:
        """Record the float32 input x [n_tokens, n_in] of a matmul with weight `name`."""
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, np.shape(x)[-1]))
        if not self.wanted(name, x.shape[0]):
            return
        acc = self._sums.get(name)
        if acc is None:
            acc = self._sums[name] = np.zeros(x.shape[1], dtype=np.float32)
            self.counts[name] = 0
        _accumulate(acc, x)
        self.counts[name] += x.shape[0]

    def observe_experts(self, name: str, n_expert: int, x, ids) -> None:
        """Record the input x [T, K] (one for every selected expert) or [T, k, K] of a MUL_MAT_ID
        with the stacked experts `name` and the routing ids [T, k] (imatrix.cpp collects every
        such product, whatever the batch size)."""
        x = np.asarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(np.asarray(ids), dtype=np.int64)
        x = np.ascontiguousarray(x.reshape(ids.shape[0], -1, x.shape[-1]))
        acc = self._sums.get(name)
        if acc is None:
            acc = self._sums[name] = np.zeros((n_expert, x.shape[-1]), dtype=np.float32)
            self.counts[name] = np.zeros(n_expert, dtype=np.int64)
        _accumulate_experts(acc, self.counts[name], x, ids)

    def observe_experts_device(self, name: str, n_expert: int, x, ids) -> None:
        """observe_experts() for torch tensors on a GPU: each slot's x^2 row is added to its
        expert's float32 accumulator on the device (index_add_: atomics, so the order of the
        additions - and the float32 rounding, relative ~1e-6 - differs from imatrix.cpp's loop),
        and the counts stay there too; nothing is copied to the host per product."""
        T = ids.shape[0]
        ids = ids.reshape(T, -1)
        x = x.reshape(T, -1, x.shape[-1])
        flat = ids.reshape(-1).long()
        acc = self._dev.get(name)
        if acc is None:
            acc = self._dev[name] = x.new_zeros((n_expert, x.shape[-1]), dtype=x.dtype)
            self._dev_counts[name] = flat.new_zeros(n_expert)  # (copied into counts by sums)
        sq = (x * x).expand(T, ids.shape[1], x.shape[-1])  # gate/up: one row per token, read by each slot
        acc.index_add_(0, flat, sq.reshape(-1, x.shape[-1]))
        self._dev_counts[name].index_add_(0, flat, flat.new_ones(flat.shape))

    def observe_device(self, name: str, x) -> None:
        """observe() for a float32 torch tensor on a GPU: the sums stay on the device (no copy of
        the activations to the host per product). Each batch's column sums of x^2 are reduced by
        torch (a tree, not imatrix.cpp's token-by-token order), then added to the float32
        accumulator: equal to observe's sums up to float32 rounding (relative ~1e-6)."""
        x = x.reshape(-1, x.shape[-1])
        if not self.wanted(name, x.shape[0]):
            return
        acc = self._dev.get(name)
        if acc is None:
            acc = self._dev[name] = x.new_zeros(x.shape[1], dtype=x.dtype)
            self.counts[name] = 0
        acc += (x * x).sum(dim=0)
        self.counts[name] += x.shape[0]

    def attach(self, backend) -> None:
        """Hook a runtime backend: every matmul input is observed before it is multiplied (on the
        device where the backend's tensors live on a GPU, see observe_device)."""
        matmul, matmuls, to_numpy = backend.matmul, backend.matmuls, backend.to_numpy
        on_gpu = getattr(getattr(backend, "device", None), "type", None) == "cuda"
        observe = self.observe_device if on_gpu else self.observe
        host = (lambda x: x) if on_gpu else to_numpy
        mul_mat_id = getattr(backend, "mul_mat_id", None)
        if mul_mat_id is not None:
            def hooked_mul_mat_id(x, w, ids):
                if on_gpu:
                    self.observe_experts_device(w.name, w.shape[0], x, ids)
                else:
                    self.observe_experts(w.name, w.shape[0], to_numpy(x), to_numpy(ids))
                return mul_mat_id(x, w, ids)

            backend.mul_mat_id = hooked_mul_mat_id

        def hooked_matmul(x, w):
            observe(w.name, host(x))
            return matmul(x, w)

        def hooked_matmuls(x, ws):
            xn = host(x)
            for w in ws:
                observe(w.name, xn)
            return matmuls(x, ws)

        backend.matmul, backend.matmuls = hooked_matmul, hooked_matmuls

    def reset(self) -> None:
        """Empty accumulators (the hooks stay attached)."""
        self._sums, self._dev, self._dev_counts, self.counts = {}, {}, {}, {}

    def add(self, sums: dict[str, np.ndarray], counts: dict) -> None:
        """Add another collection's sums and counts (float32, in the order of the calls)."""
        for name, v in sums.items():
            if name in self._sums:
                self._sums[name] += v
                self.counts[name] = self.counts[name] + counts[name]  # a new array for expert counts
            else:
                self._sums[name] = np.array(v, dtype=np.float32)
                self.counts[name] = counts[name]

    @property
    def chunk_count(self) -> int:
        # m_last_chunk = max(count) / chunk_size (over every dense count and every expert's)
        self.sums  # the device counts, copied back
        return max((int(np.max(c)) for c in self.counts.values()), default=0) // self.chunk_size

    def to_imatrix(self, datasets: list[str]) -> Imatrix:
        sums = self.sums
        entries = {n: Entry(sums[n].reshape(-1, sums[n].shape[-1]).copy(),
                            np.array(self.counts[n], dtype=np.int64).reshape(-1))
                   for n in sums}
        return Imatrix(entries, list(datasets), self.chunk_count, self.chunk_size, False)


def read_text(path) -> str:
    from pathlib import Path

    from ggquant.errors import GGQuantError

    p = Path(path)
    if not p.is_file():
        raise GGQuantError(f"{p}: calibration text file not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGQuantError(f"{p}: not UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None
    if not text.strip():
        raise GGQuantError(f"{p}: the calibration text is empty")
    return text


def _chunks(reader, text: str, text_path, ctx: int, chunks: int | None) -> list[np.ndarray]:
    """imatrix.cpp compute_imatrix's chunks: the text tokenized once (BOS first if the vocabulary
    adds one), cut into `ctx`-token chunks (at least two), each chunk's first token replaced by
    BOS when the vocabulary adds BOS."""
    from ggquant.errors import GGQuantError
    from ggquant.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(reader)
    ids = np.asarray(tok.encode(text, add_special=True), dtype=np.int64)
    if len(ids) < 2 * ctx:
        raise GGQuantError(
            f"{text_path}: {len(ids)} tokens, but llama-imatrix needs at least 2 chunks of --ctx {ctx} "
            f"({2 * ctx} tokens); give more text or a smaller --ctx"
        )
    n_chunk = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    bos = tok.bos_id if getattr(tok, "add_bos", False) else None
    out = []
    for c in range(n_chunk):
        chunk = ids[c * ctx:(c + 1) * ctx].copy()
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def collect_imatrix(model_path, text_path, *, ctx: int = 512, chunks: int | None = None, device: str = "cpu",
                    threads: int | None = None, process_output: bool = False, progress: bool = True,
                    outtype: str | None = None, devices: list[str] | None = None):
    """llama-imatrix's compute_imatrix over ggquant's runtime; returns (Imatrix, stats dict).

    model_path: a GGUF, or a Hugging Face folder converted in memory to `outtype` (default f32;
    outtype is refused for a GGUF).

    Each chunk (_chunks) is evaluated from an empty KV cache. With `devices` (e.g. ["cuda:0",
    "cuda:1"] or ["cpu", "cpu"]) the chunks are spread over one worker process per entry, each
    holding a replica of the model (collect_parallel); `threads` is then per CPU worker.
    """
    import time
    from pathlib import Path

    from ggquant.errors import GGQuantError
    from ggquant.runtime.hf_source import weights_label
    from ggquant.runtime.model import Session, load_model, open_reader

    text = read_text(text_path)
    if outtype is None and Path(model_path).is_dir():
        outtype = HF_FOLDER_OUTTYPE
    if devices:
        reader = open_reader(model_path, outtype)
        model = None
    else:
        model = load_model(model_path, device=device, threads=threads, outtype=outtype)
        reader = model.reader
    todo = _chunks(reader, text, text_path, ctx, chunks)
    if not any(t.name.startswith("blk.") and len(t.shape) >= 2 for t in reader.tensors):
        raise GGQuantError(f"{model_path}: no blk.* matmul weights to collect statistics for")
    want = "all" if process_output else "none"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="chunk", desc="imatrix", leave=False)
    t0 = time.perf_counter()

    def tick(c):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tok_s=f"{(c + 1) * ctx / (time.perf_counter() - t0):.1f}")

    if devices:
        col = collect_parallel(model_path, outtype, todo, ctx, devices, threads, process_output, tick)
    else:
        col = Collector(ctx, process_output)
        col.attach(model.backend)
        sess = Session(model, n_ctx=ctx, n_batch=ctx)
        for c, chunk in enumerate(todo):
            sess.reset()
            sess.eval(chunk, logits=want)
            tick(c)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    im = col.to_imatrix([str(text_path)])
    n = len(todo)
    return im, {"chunks": n, "tokens": n * ctx, "seconds": seconds,
                "tokens_per_s": n * ctx / seconds if seconds else 0.0, "entries": len(im.entries),
                "weights": weights_label(reader), "workers": len(devices) if devices else 1}


# --- data parallel: one model replica per worker process, chunk sums merged in chunk order ----------

_WORKER: dict = {}


def _worker_init(model_path, outtype, ctx, threads, process_output, device_queue) -> None:
    """Pool initializer: take a device ("cpu", "cuda", "cuda:N"), load the model there once."""
    import os

    dev = device_queue.get()
    if dev.startswith("cuda:"):  # this process sees only its GPU, as cuda
        os.environ["CUDA_VISIBLE_DEVICES"] = dev.split(":", 1)[1]
        dev = "cuda"
    from ggquant.runtime.model import Session, load_model

    model = load_model(model_path, device=dev, threads=threads, outtype=outtype)
    col = Collector(ctx, process_output)
    col.attach(model.backend)
    _WORKER.update(col=col, sess=Session(model, n_ctx=ctx, n_batch=ctx), want="all" if process_output else "none")


def _worker_chunk(job):
    """One chunk from an empty cache and empty accumulators: (index, sums, counts)."""
    c, chunk = job
    col, sess = _WORKER["col"], _WORKER["sess"]
    col.reset()
    sess.reset()
    sess.eval(chunk, logits=_WORKER["want"])
    return c, col.sums, col.counts


def collect_parallel(model_path, outtype, todo, ctx, devices, threads, process_output, tick=None) -> Collector:
    """The statistics of `todo` (chunks of token ids) over len(devices) worker processes.

    Every chunk's float32 sums start from zero and are added to the total in chunk order, so the
    result depends on the chunks alone, not on how many workers computed them or which finished
    first: the file is byte-identical for 1 and N workers. (It differs from the one-process
    collection, which sums token by token across chunks as imatrix.cpp does, by float32 rounding.)"""
    import multiprocessing as mp

    from ggquant.errors import GGQuantError

    for d in devices:
        if d != "cpu" and d != "cuda" and not (d.startswith("cuda:") and d[5:].isdigit()):
            raise GGQuantError(f"--devices: unknown device {d!r}; expected cpu, cuda or cuda:N")
    spawn = mp.get_context("spawn")  # fresh interpreters: CUDA and numba's threads do not survive fork
    queue = spawn.Queue()
    for d in devices:
        queue.put(d)
    total = Collector(ctx, process_output)
    with spawn.Pool(len(devices), _worker_init, (str(model_path), outtype, ctx, threads, process_output, queue),
                    maxtasksperchild=None) as pool:
        # imap hands chunks to whichever worker is free and yields the results in chunk order
        for c, sums, counts in pool.imap(_worker_chunk, enumerate(todo)):
            total.add(sums, counts)
            if tick is not None:
                tick(c)
    return total
