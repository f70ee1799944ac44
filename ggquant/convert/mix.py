"""Per-tensor types for `ggquant quantize` beyond the presets: a sensitivity-driven allocation under a
size budget (--target-bpw / --target-size), or the types of a template file (--like). Both end as
exact-name --tensor-type rules, so llama-quantize given the same rules (--tensor-type-file) writes
the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggquant.errors import GGQuantError
from ggquant.quant import allocate as al
from ggquant.quant import presets
from ggquant.quant import types as qtypes
from ggquant.quant.policy import DEFAULT_CANDIDATES


@dataclass
class Mix:
    """What to allocate: a budget (exactly one of target_bpw / target_size), the candidate types,
    the solver, and optionally calibration text for the measured mode."""

    target_bpw: float | None = None
    target_size: int | None = None
    types: tuple = DEFAULT_CANDIDATES
    allocator: str = "lagrange"
    calibration: str | None = None  # text; None: proxy errors only
    ctx: int = 128
    chunks: int = 2
    points: int = 2  # measured reference types per tensor (allocate.probes)
    sample: int = al.SAMPLE_ROWS
    threads: int | None = None
    device: str = "cpu"  # the runtime that measures (cpu, cuda)
    state: str | None = None  # --state FILE: measurements kept here, a rerun resumes from them
    ray: str | None = None  # --ray [ADDRESS]: measure on Ray ("local": a local runtime)
    workers: int | None = None  # Ray workers (default: one per CPU Ray offers)
    report: dict = field(default_factory=dict)  # filled by plan_mix, for --json / the summary


def plan_mix(path, reader, im_values: dict, mix: Mix, pinned: list[presets.Rule], progress: bool = False):
    """Exact-name rules allocating every quantizable tensor not pinned by a user rule (pinned ones
    keep their rule's type, and their bytes come off the budget)."""
    items = al.sensitivity(reader, im_values, mix.types, sample=mix.sample, progress=_Bar("sensitivity", progress))
    pins = {it.name: next((r.qtype for r in pinned if r.regex.search(it.name)), None) for it in items}
    free = [it for it in items if pins[it.name] is None]
    budget, fixed, n_total = al.budget_for(reader, free, target_bpw=mix.target_bpw, target_size=mix.target_size)
    stored = {t.name: t.nbytes for t in reader.tensors}
    pinned_delta = sum(qtypes.get(pins[it.name]).nbytes(it.shape) - stored[it.name] for it in items if it not in free)
    al.allocate(free, budget - pinned_delta, mix.allocator)  # fails now, not after the measurements, if too small
    if mix.calibration is not None:
        from ggquant.convert.kl_probes import measure_kl

        pairs = al.probes(free, mix.points)
        al.calibrate(free, measure_kl(path, pairs, mix, im_values, _Bar("measured KL", progress)), mix.points)
    alloc = al.allocate(free, budget - pinned_delta, mix.allocator)
    total = fixed + pinned_delta + alloc.nbytes
    mix.report = {
        "method": alloc.method, "measured": mix.calibration is not None,
        "budget_bytes": budget + fixed, "bytes": total, "bpw": 8 * total / n_total,
        "predicted_cost": alloc.cost, "cost_unit": "KL" if mix.calibration is not None else "weighted squared error",
        "proxy_vs_measured": al.proxy_agreement(free) if mix.calibration is not None else None,
        "tensors": [{"name": it.name, "type": alloc.choice[it.name].name,
                     "cost": it.option(alloc.choice[it.name]).cost,
                     "floor": it.floor.why if it.floor else None, "floor_overridden": it.floor_overridden,
                     "measured_kl": {q.name: v for q, v in it.measured.items()},
                     "options": {o.qtype.name: [o.nbytes, o.cost] for o in it.options}} for it in free],
        "allocation": alloc,
    }
    return alloc.rules(), alloc


def explain(plan, alloc: al.Allocation) -> None:
    """--dry-run's `why` for allocated tensors: the allocation, and the policy floor it respected."""
    items = {it.name: it for it in alloc.items}
    for c in plan:
        it = items.get(c.name)
        if it is not None and c.dst_type == alloc.choice[c.name]:
            floor = ""
            if it.floor is not None:
                floor = f"; floor {it.floor.min_bpw:g} bpw ({it.floor.why})"
                if it.floor_overridden:
                    floor += " overridden: measured no more sensitive than a typical tensor"
            c.reason = f"allocated ({alloc.method}){floor}"


class _Bar:
    """A tqdm bar driven by the (done, total, name) callbacks of ggquant.quant.allocate."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tensor", desc=self.desc, leave=False)
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()


def recipe_lines(plan) -> list[str]:
    """llama.cpp's --tensor-type-file lines for a quantization plan: one exact-name `^name$=type` per
    tensor llama-quantize may quantize, so llama-quantize given them (same preset, same imatrix)
    makes every tensor the type the plan made it."""
    return [str(presets.Rule.exact(c.name, c.dst_type)) for c in plan
            if presets.allows_quantization(c.name, len(c.shape))]


def write_recipe(plan, path: Path, force: bool) -> None:
    from ggquant.files import check_overwrite

    path = Path(path)
    check_overwrite([path], force)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(recipe_lines(plan)) + "\n")
    tmp.replace(path)


def main_file_type(typed) -> int:
    """general.file_type for a mix of (type, bytes) pairs: that of the block type holding the most
    bytes (its registry entry's auto file type). A float file type would not do: llama-quantize
    applies --tensor-type rules only when the file type's default type is quantized."""
    by_type: dict = {}
    for q, nbytes in typed:
        by_type[q] = by_type.get(q, 0) + nbytes
    for q in sorted(by_type, key=lambda q: -by_type[q]):
        e = qtypes.get(q)
        if e.block_size > 1 and e.file_type is not None:
            return e.file_type
    return presets.preset("Q8_0")


def read_tensor_type_file(path, reader) -> list[presets.Rule]:
    """llama-quantize --tensor-type-file: REGEX=TYPE entries separated by whitespace (quantize.cpp
    parse_tensor_type_file reads them with `file >> arg`). A recipe is written for one model, so
    a rule matching none of its quantizable tensors, or giving one a type its rows cannot hold
    (where llama-quantize would silently fall back), is an error."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GGQuantError(f"--tensor-type-file {p}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    rules = []
    for arg in text.split():
        try:
            rules.append(presets.Rule.parse(arg))
        except GGQuantError as e:
            raise GGQuantError(f"--tensor-type-file {p}: {e}") from None
    if not rules:
        raise GGQuantError(f"--tensor-type-file {p}: no REGEX=TYPE entries in it")
    tensors = [t for t in reader.tensors if presets.allows_quantization(t.name, len(t.shape))]
    for r in rules:
        hits = [t for t in tensors if r.regex.search(t.name)]
        if not hits:
            raise GGQuantError(f"--tensor-type-file {p}: {r} matches no quantizable tensor of {reader.path}; "
                               f"is the recipe for another model?")
        e = qtypes.get(r.qtype)
        bad = next((t for t in hits if t.shape[-1] % e.block_size), None)
        if bad is not None:
            raise GGQuantError(f"--tensor-type-file {p}: {r} gives {bad.name} type {r.qtype.name}, whose "
                               f"{e.block_size}-element blocks do not divide its {bad.shape[-1]}-element rows")
    return rules


def like_rules(reader, template):
    """--like TEMPLATE: (exact rules giving every quantizable tensor the template's type, the file
    type to write). TEMPLATE is a GGUF quantization of the same model (its types and
    general.file_type), or another tool's mixed-precision checkpoint folder -- GLQ (its layer_bpw),
    MLX/OptiQ (its per-module bits), GPTQ/AWQ/compressed-tensors -- whose per-tensor GGML types are
    those `ggquant convert --outtype auto` picks for it: the type holding the layer's numbers
    exactly where one does, else the one at or above its bits per weight. The template must have
    this model's names and shapes, else an error names the first difference."""
    from gguf import LlamaFileType

    template = Path(template)
    if template.is_dir():
        from ggquant.convert.hf_to_gguf import plan_conversion

        conv, _ = plan_conversion(template, outtype="auto")
        theirs = {t.name: (tuple(t.shape), t.qtype) for f in conv.files if f.part == "text" for t in f.tensors}
        ftype = main_file_type((q, qtypes.get(q).nbytes(shape)) for shape, q in theirs.values())
    else:
        from ggquant.formats.gguf import GGUFReader

        with GGUFReader(template) as tr:
            theirs = {t.name: (tuple(t.shape), t.qtype) for t in tr.tensors}
            ftype = tr.get("general.file_type", None)
    rules = []
    for t in reader.tensors:
        if not presets.allows_quantization(t.name, len(t.shape)):
            continue
        shape, qtype = theirs.get(t.name, (None, None))
        if shape != tuple(t.shape):
            what = "has no tensor" if shape is None else f"has shape {list(shape)} for"
            raise GGQuantError(f"--like {template}: the template {what} {t.name} ({list(t.shape)} here); "
                               f"it is not a quantization of this model")
        rules.append(presets.Rule.exact(t.name, qtype))
    if ftype is None:
        raise GGQuantError(f"--like {template}: no general.file_type in the template; give --outtype")
    return rules, LlamaFileType(int(ftype))


def plot_pareto(path: Path, inp, mix: Mix, has_imatrix: bool, force: bool = False,
                ftypes=("Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")) -> None:
    """--plot: predicted cost vs bpw of allocations at several budgets and of llama.cpp's presets,
    on the items of the allocation just made (their costs as the allocation computed them)."""
    from ggquant.files import check_overwrite
    from ggquant.formats.gguf import GGUFReader

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GGQuantError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    path = Path(path)
    check_overwrite([path], force)
    with GGUFReader(inp) as reader:
        tensors = [(t.name, tuple(t.shape), t.qtype, t.nbytes) for t in reader.tensors]
        info = presets.ModelInfo.from_fields(reader.get)
    items = mix.report["allocation"].items
    by_name = {it.name: it for it in items}
    fixed = sum(nb for name, _, _, nb in tensors if name not in by_name)
    n_total = sum(int(np.prod(shape)) for _, shape, _, _ in tensors)
    pts = []
    for name in ftypes:
        plan = presets.Mixture(presets.preset(name), info, has_imatrix=has_imatrix).plan(
            [(n, shape, q) for n, shape, q, _ in tensors])
        try:
            cost = sum(by_name[c.name].option(c.dst_type).cost for c in plan if c.name in by_name)
        except StopIteration:
            continue  # the preset uses a type outside --types
        size = sum(qtypes.get(c.dst_type).nbytes(c.shape) for c in plan)
        pts.append((name, 8 * size / n_total, cost))
    lo = 8 * (fixed + sum(it.options[0].nbytes for it in items)) / n_total
    hi = max([p[1] for p in pts] + [8 * (fixed + sum(it.options[-1].nbytes for it in items)) / n_total])
    ours = []
    for b in np.linspace(lo, hi, 12):
        try:
            a = al.allocate(items, int(b * n_total / 8) - fixed, mix.allocator)
        except GGQuantError:
            continue
        ours.append((8 * (fixed + a.nbytes) / n_total, a.cost))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[0] for p in ours], [p[1] for p in ours], "o-", label=f"ggquant --target-bpw ({mix.allocator})")
    ax.scatter([p[1] for p in pts], [p[2] for p in pts], marker="s", color="C1", label="llama.cpp presets")
    for name, x, y in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel(f"predicted {mix.report['cost_unit']}")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def report_json(mix: Mix) -> dict:
    return {k: v for k, v in mix.report.items() if k != "allocation"}
