"""The measured mode's forward passes: one KL probe per (tensor, type), in this process or on Ray.

Each probe is independent (the model with one tensor swapped for its quantization, on the same
calibration chunks), so the work is embarrassingly parallel: `--ray [ADDRESS]` runs it on Ray,
one actor per worker holding the model once (a local Ray runtime by default, an existing cluster
when ADDRESS is given; the GGUF path must be readable on every node). Results are merged by
(tensor, type), so they do not depend on which worker ran what, and every result is written to
`--state FILE` as it arrives: a rerun with the same model, calibration, imatrix and settings
measures only what is missing (llama.cpp's --target-bpw PR keeps a --state-file for the same
reason). A state file made for other inputs is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from ggquant.errors import GGQuantError

STATE_VERSION = 1


def fingerprint(path, mix, im_values: dict) -> dict:
    """What a measurement depends on: the model bytes (size and a hash of its head and tail), the
    calibration text, the chunking, the imatrix."""
    p = Path(path)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, p.stat().st_size - (1 << 20)))
        h.update(f.read())
    im = hashlib.sha256()
    for name in sorted(im_values):
        im.update(name.encode())
        im.update(np.ascontiguousarray(im_values[name], np.float32).tobytes())
    return {"version": STATE_VERSION, "model": p.name, "model_bytes": p.stat().st_size, "model_sha": h.hexdigest(),
            "calibration_sha": hashlib.sha256(mix.calibration.encode()).hexdigest(), "ctx": mix.ctx,
            "chunks": mix.chunks, "imatrix_sha": im.hexdigest()}


class State:
    """--state FILE: {"fingerprint": ..., "kl": {tensor: {type: KL}}}, rewritten atomically."""

    def __init__(self, path, fp: dict):
        self.path = Path(path) if path else None
        self.fp = fp
        self.kl: dict[tuple[str, T], float] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                theirs = data["fingerprint"]
                kl = data["kl"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise GGQuantError(f"--state {self.path}: not a ggquant state file ({e}); give another path") from None
            if theirs != fp:
                diff = next(k for k in fp if theirs.get(k) != fp[k])
                raise GGQuantError(f"--state {self.path}: measured with another {diff} ({theirs.get(diff)!r}, now "
                                   f"{fp[diff]!r}); delete it or give another --state")
            self.kl = {(name, T[q]): float(v) for name, per in kl.items() for q, v in per.items()}

    def put(self, pair: tuple[str, T], kl: float) -> None:
        self.kl[pair] = kl
        if self.path is None:
            return
        per: dict = {}
        for (name, q), v in sorted(self.kl.items(), key=lambda kv: (kv[0][0], kv[0][1].name)):
            per.setdefault(name, {})[q.name] = v
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fp, "kl": per}, indent=0))
        tmp.replace(self.path)


def measure_kl(path, pairs: list[tuple[str, T]], mix, im_values: dict, progress=None) -> dict[tuple[str, T], float]:
    """KL of every (tensor, type) pair (ggquant.runtime.probe.KLProbe), from the state file where
    it has them, on Ray when mix.ray is set."""
    state = State(mix.state, fingerprint(path, mix, im_values))
    todo = [p for p in pairs if p not in state.kl]
    done = len(pairs) - len(todo)
    if progress is not None and done:
        progress(done, len(pairs), "from --state")
    if todo:
        run = _on_ray if mix.ray else _here
        for pair, kl in run(path, todo, mix, im_values):
            state.put(pair, kl)
            done += 1
            if progress is not None:
                progress(done, len(pairs), pair[0])
    return {p: state.kl[p] for p in pairs}


def _probe(path, mix, im_values, threads):
    from ggquant.runtime.model import load_model
    from ggquant.runtime.probe import KLProbe

    model = load_model(path, device=mix.device, threads=threads)
    return KLProbe.from_text(model, mix.calibration, mix.ctx, mix.chunks, im_values)


def _here(path, todo, mix, im_values):
    probe = _probe(path, mix, im_values, mix.threads)
    for name, qtype in todo:
        yield (name, qtype), probe.kl(name, qtype)


def _on_ray(path, todo, mix, im_values):
    try:
        import ray
    except ImportError:
        raise GGQuantError("--ray needs Ray, which is not installed (pip install 'ray==2.60.0')") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if mix.ray == "local" else mix.ray, include_dashboard=False, log_to_driver=False)
    try:
        cpus = int(ray.available_resources().get("CPU", 1))
        gpus = int(ray.available_resources().get("GPU", 0)) if mix.device == "cuda" else 0
        n = max(1, mix.workers or (gpus or cpus))
        threads = max(1, cpus // n) if mix.device == "cpu" else None

        @ray.remote(num_cpus=threads or 1, num_gpus=1 if mix.device == "cuda" else 0)
        class Prober:
            def __init__(self, path, mix, im_values, threads):
                self.probe = _probe(path, mix, im_values, threads)

            def kl(self, name, qname):
                return name, qname, self.probe.kl(name, T[qname])

        im_ref = ray.put(im_values)
        actors = [Prober.remote(str(path), mix, im_ref, threads) for _ in range(min(n, len(todo)))]
        # one task in flight per actor, refilled as each returns: a slow probe never holds a queue
        queue = list(todo)
        running = {}
        for a in actors:
            if queue:
                name, q = queue.pop(0)
                running[a.kl.remote(name, q.name)] = a
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            a = running.pop(ref)
            name, qname, kl = ray.get(ref)
            if queue:
                nxt = queue.pop(0)
                running[a.kl.remote(nxt[0], nxt[1].name)] = a
            yield (name, T[qname]), kl
    finally:
        if started:
            ray.shutdown()
