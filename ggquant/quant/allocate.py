"""Sensitivity-driven mixed precision: which GGML type each tensor gets under a size budget.

    items = sensitivity(reader, imatrix, types)        # per tensor: bytes and error of every type
    calibrate(items, {pair: probe.kl(*pair) for pair in probes(items)})  # optional: measured KL
    alloc = allocate(items, budget_bytes, "lagrange")  # the budget is met, never exceeded
    alloc.rules()                                      # exact-name --tensor-type rules

**Proxy.** For a weight W [rows, n] and the importance vector a (mean squared input activation per
column, the imatrix), the expected squared error a token's output suffers when W is replaced by its
quantization Q is E||x (W - Q)^T||^2 = sum_rows sum_j a_j (w_ij - q_ij)^2 for inputs with
uncorrelated columns: the imatrix-weighted error of the tensor's own rows (what llama.cpp's
quantizers minimise per block, and what llama.cpp PR #15550 ranks types by). The proxy divides it
by the output's own expected energy, sum_rows sum_j a_j w_ij^2: tensors feed norms, residual
streams and logits at very different scales, and a relative error compares them where an absolute
one does not (on Gemma 3 270M the absolute error traded a whole decoder for the tied embedding and
lost to Q3_K_L at its size: KL 0.132 vs 0.098; the relative error keeps the decoder: KL 0.021).
It is computed exactly, with ggquant's bit-exact quantizers, on an evenly spaced sample of rows
(rows are quantized independently). Tensors without an imatrix entry use a = 1.

**Measured.** The KL of the model's next-token distribution when only tensor t is quantized to a
reference type, on calibration text, through ggquant's runtime (a `KLProbe`), at two reference
types per tensor (its smallest option and the one nearest 4.5 bpw). For small perturbations KL is
quadratic in the output error, which the proxy already squares, so KL ~ err; larger ones bend
away, so each tensor gets a power law KL = k err^p through its two measured points, and every
option's cost is the KL it predicts. Predicted KL is additive over tensors (independent small
perturbations): the predicted KL of a mix is the sum of its tensors'.

**Allocation.** A multiple-choice knapsack: minimise the summed cost under sum(bytes) <= budget.
"lagrange": every tensor takes the point of its lower convex hull that minimises cost + lam*bytes,
lam bisected to the smallest value that fits, then the leftover bytes are spent greedily on the
single upgrades with the best cost reduction per byte; a tensor whose next hull point is a large
share of the budget is also tried at that point, with the rest re-solved beside it. "greedy": start every tensor at its
smallest option and repeatedly take the best cost reduction per byte that still fits. Both are
deterministic (ties broken by tensor order, then type order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as T

from ggquant.errors import GGQuantError
from ggquant.quant import presets
from ggquant.quant import types as qtypes
from ggquant.quant.policy import DEFAULT_CANDIDATES, DEFAULT_POLICY, Floor, floor_for

SAMPLE_ROWS = 256  # rows per tensor whose quantization error is measured (evenly spaced)


def bpw(qtype: T) -> float:
    e = qtypes.get(qtype)
    return 8.0 * e.type_size / e.block_size


@dataclass
class Option:
    qtype: T
    nbytes: int
    err: float  # imatrix-weighted relative squared error (proxy_errors)
    cost: float = 0.0  # what the allocator minimises (err, or predicted KL once calibrated)


@dataclass
class Item:
    """One quantizable tensor and its candidate types, sorted by size (smallest first)."""

    name: str
    shape: tuple[int, ...]
    options: list[Option]
    floor: Floor | None = None
    held: list[Option] = field(default_factory=list)  # below the floor: tried only if measured (calibrate)
    floor_overridden: bool = False
    measured: dict[T, float] = field(default_factory=dict)  # type -> measured KL (tensor alone)

    def option(self, qtype: T) -> Option:
        return next(o for o in self.options if o.qtype == qtype)

    def hull(self) -> list[Option]:
        """The options on the lower convex hull of (bytes, cost): the only ones a Lagrangian
        relaxation can pick; dominated options (more bytes, no less cost) are dropped."""
        pts: list[Option] = []
        for o in sorted(self.options, key=lambda o: (o.nbytes, o.cost)):
            if pts and o.cost >= pts[-1].cost:
                continue  # dominated
            while len(pts) >= 2:
                a, b = pts[-2], pts[-1]
                # drop b when it lies on or above the segment a -> o
                if (b.cost - a.cost) * (o.nbytes - a.nbytes) >= (o.cost - a.cost) * (b.nbytes - a.nbytes):
                    pts.pop()
                else:
                    break
            pts.append(o)
        return pts


@dataclass
class Allocation:
    items: list[Item]
    choice: dict[str, T]  # tensor name -> type, for every item
    nbytes: int  # of the items
    cost: float
    method: str

    def sizes(self) -> list[tuple[T, int]]:
        """(type, bytes) of every item as allocated."""
        return [(self.choice[it.name], it.option(self.choice[it.name]).nbytes) for it in self.items]

    def rules(self) -> list[presets.Rule]:
        return [presets.Rule.exact(n, t) for n, t in self.choice.items()]


# =============================================================================================
# Sensitivity
# =============================================================================================


def quantizable(reader) -> list:
    """The tensors llama-quantize would quantize (llama-quant.cpp tensor_allows_quantization)."""
    return [t for t in reader.tensors if presets.allows_quantization(t.name, len(t.shape))]


def candidate_types(name: str, shape: tuple[int, ...], types, has_imatrix: bool,
                    policy: tuple[Floor, ...] = DEFAULT_POLICY) -> tuple[list[T], list[T], Floor | None]:
    """(types a tensor may take, types its policy floor holds back, the floor). Candidates are the
    types whose blocks divide its rows and that do not need an imatrix it lacks
    (ggml_quantize_requires_imatrix, llama-quantize's checks)."""
    floor = floor_for(name, policy)
    ok, held = [], []
    for qtype in types:
        e = qtypes.get(qtype)
        if e.quantize_fn is None or shape[-1] % e.block_size:
            continue
        if qtype in presets.REQUIRES_IMATRIX and not has_imatrix:
            continue
        (held if floor is not None and not floor.allows(qtype, bpw(qtype)) else ok).append(qtype)
    return ok, held, floor


def _sample_rows(n_rows: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_rows - 1, min(n_rows, k)).round().astype(np.int64))


def proxy_errors(t, types, imatrix: np.ndarray | None, sample: int = SAMPLE_ROWS) -> dict[T, float]:
    """imatrix-weighted relative squared error of quantizing GGUF tensor t to each type (module
    docstring), on the sampled rows."""
    n = t.shape[-1]
    rows = _sample_rows(t.n_rows, sample)
    src = qtypes.get(t.qtype)
    x = src.dequantize(np.ascontiguousarray(t.raw()[rows]), (len(rows), n)).astype(np.float32)
    w = np.ones(n, np.float64) if imatrix is None else np.asarray(imatrix, np.float64)[:n]
    energy = float((x.astype(np.float64) ** 2 @ w).sum())
    scale = 1.0 / energy if energy > 0 else 0.0
    out = {}
    for qtype in types:
        e = qtypes.get(qtype)
        if qtype == t.qtype:  # kept as is: no new error (the source's own error is not ours to count)
            out[qtype] = 0.0
            continue
        q = e.dequantize(e.quantize(x, imatrix if e.uses_imatrix else None, t.name), x.shape)
        d = (x.astype(np.float64) - q) ** 2
        out[qtype] = float((d @ w).sum() * scale)
    return out


def sensitivity(reader, imatrix: dict[str, np.ndarray] | None, types=DEFAULT_CANDIDATES,
                policy: tuple[Floor, ...] = DEFAULT_POLICY, sample: int = SAMPLE_ROWS,
                progress=None) -> list[Item]:
    """Proxy errors of every quantizable tensor for every type it may take."""
    items = []
    tensors = quantizable(reader)
    for i, t in enumerate(tensors):
        vec = (imatrix or {}).get(t.name)
        cands, held, floor = candidate_types(t.name, tuple(t.shape), types, vec is not None, policy)
        if not cands:
            raise GGQuantError(f"{t.name}: none of the candidate types ({', '.join(q.name for q in types)}) can "
                               f"hold its {t.shape[-1]}-element rows under the policy; add a type with --types")
        errs = proxy_errors(t, cands + held, vec, sample)

        def options(qs):
            opts = [Option(q, qtypes.get(q).nbytes(t.shape), errs[q], errs[q]) for q in qs]
            return sorted(opts, key=lambda o: (o.nbytes, list(types).index(o.qtype)))

        items.append(Item(t.name, tuple(t.shape), options(cands), floor, options(held)))
        if progress is not None:
            progress(i + 1, len(tensors), t.name)
    return items


def _reference_options(it: Item, points: int) -> list[Option]:
    """Where to measure: the smallest option, then (points >= 2) the one nearest 4.5 bpw; those
    with no new error (kept as stored) are never probed."""
    opts = [o for o in it.options if o.err > 0]
    if not opts:
        return []
    refs = [opts[0]]
    if points >= 2:
        mid = min(opts, key=lambda o: abs(bpw(o.qtype) - 4.5))
        if mid is not refs[0]:
            refs.append(mid)
    return refs


def _fit(measured: list[tuple[float, float]]):
    """Predicted KL as a function of the proxy error, through the measured (err, KL) points: a
    power law KL = k (err / e)^p (p from two points, clamped to [0.5, 2]; 1 from one point:
    KL is quadratic in the output error, which err already squares)."""
    (e1, k1) = measured[0]
    p = 1.0
    if len(measured) > 1:
        (e2, k2) = measured[1]
        if k1 > 0 and k2 > 0 and e1 != e2:
            p = min(2.0, max(0.5, math.log(k1 / k2) / math.log(e1 / e2)))
    return lambda e: 0.0 if e <= 0 or k1 <= 0 else k1 * (e / e1) ** p


def probes(items: list[Item], points: int = 2) -> list[tuple[str, T]]:
    """The (tensor, type) pairs the measured mode runs: `points` reference types per tensor, and
    for a floored tensor the largest type its floor holds back."""
    out = [(it.name, o.qtype) for it in items for o in _reference_options(it, points)]
    return out + [(it.name, it.held[-1].qtype) for it in items if it.held]


def calibrate(items: list[Item], measured: dict[tuple[str, T], float], points: int = 2) -> None:
    """Measured mode, given the KL of every pair of `probes(items, points)` (each tensor alone
    quantized to that type): every option's cost becomes the KL predicted from its proxy error
    through the tensor's measured points (_fit).

    Policy floors: a floored tensor whose measured KL just below its floor (the largest held-back
    type) is no more than the median KL of the unfloored tensors at their smallest option -- it
    is not among the sensitive ones on this model -- gets its held-back types as options too
    (`floor_overridden`); otherwise the floor stands."""
    for (name, qtype), kl in measured.items():
        next(it for it in items if it.name == name).measured[qtype] = kl
    for it in items:
        pts = [(o.err, it.measured[o.qtype]) for o in _reference_options(it, points)]
        f = _fit(pts) if pts else (lambda e: 0.0)
        for o in it.options + it.held:
            o.cost = f(o.err)
    typical = sorted(it.measured[it.options[0].qtype] for it in items
                     if it.floor is None and it.options[0].qtype in it.measured)
    median = typical[len(typical) // 2] if typical else 0.0
    for it in items:
        if it.held and it.measured[it.held[-1].qtype] <= median:
            it.options = sorted(it.options + it.held, key=lambda o: o.nbytes)
            it.held = []
            it.floor_overridden = True


def proxy_agreement(items: list[Item]) -> dict:
    """How well the proxy predicts the measurement: over every measured (tensor, type) pair, the
    Spearman rank correlation of proxy error and measured KL, and the Pearson correlation of
    their logarithms (pairs with a zero on either side left out)."""
    pairs = [(o.err, it.measured[o.qtype]) for it in items for o in it.options + it.held
             if o.qtype in it.measured and o.err > 0 and it.measured[o.qtype] > 0]
    if len(pairs) < 3:
        return {"pairs": len(pairs)}
    e, k = np.log(np.array(pairs)).T
    rank = lambda x: np.argsort(np.argsort(x)).astype(np.float64)  # noqa: E731
    return {"pairs": len(pairs), "spearman": float(np.corrcoef(rank(e), rank(k))[0, 1]),
            "pearson_log": float(np.corrcoef(e, k)[0, 1])}


# =============================================================================================
# Allocation
# =============================================================================================


def _total(items, pick) -> tuple[int, float]:
    return sum(pick[i].nbytes for i in range(len(items))), sum(pick[i].cost for i in range(len(items)))


def _fill(items: list[Item], pick: list[Option], budget: int) -> None:
    """Spend what is left of the budget on the single upgrades with the best cost reduction per
    byte, one at a time, while any fits (deterministic order on ties)."""
    used = sum(o.nbytes for o in pick)
    while True:
        best = None
        for i, it in enumerate(items):
            cur = pick[i]
            for o in it.options:
                extra = o.nbytes - cur.nbytes
                gain = cur.cost - o.cost
                if extra <= 0 or gain <= 0 or used + extra > budget:
                    continue
                key = (gain / extra, gain)
                if best is None or key > best[0]:
                    best = (key, i, o)
        if best is None:
            return
        _, i, o = best
        used += o.nbytes - pick[i].nbytes
        pick[i] = o


def _relax(items: list[Item], budget: int) -> list[Option] | None:
    """The Lagrangian pick (smallest lam that fits) plus the greedy fill; None if nothing fits."""
    if sum(it.options[0].nbytes for it in items) > budget:
        return None
    hulls = [it.hull() for it in items]

    def choose(lam: float) -> list[Option]:
        return [min(h, key=lambda o: (o.cost + lam * o.nbytes, o.nbytes)) for h in hulls]

    lo, hi = 0.0, 1.0
    while sum(o.nbytes for o in choose(hi)) > budget:
        hi *= 4.0
        if hi > 1e300:
            break
    if sum(o.nbytes for o in choose(0.0)) <= budget:
        pick = choose(0.0)
    else:
        for _ in range(200):  # bisection to the smallest lam that fits
            mid = 0.5 * (lo + hi)
            if sum(o.nbytes for o in choose(mid)) <= budget:
                hi = mid
            else:
                lo = mid
        pick = choose(hi)
    _fill(items, pick, budget)
    return pick


BIG_STEP = 0.02  # of the budget: an upgrade this large can leave the relaxation's gap unspent


def _lagrange(items: list[Item], budget: int) -> list[Option]:
    """_relax, then its integrality gap closed for big tensors: a relaxation moves a tensor whose
    next hull point costs many bytes (Gemma 3's tied embedding: Q5_1 -> Q8_0 is 15% of the file)
    only as a whole, and the greedy fill only upgrades; so for every such upgrade that did not
    fit, the rest is re-solved in the bytes left beside it, and the cheaper of the two is kept."""
    pick = _relax(items, budget)
    cost = sum(o.cost for o in pick)
    for i, it in enumerate(items):
        cur = pick[i]
        for o in it.hull():
            if o.cost >= cur.cost or o.nbytes - cur.nbytes < BIG_STEP * budget:
                continue
            rest = _relax(items[:i] + items[i + 1:], budget - o.nbytes)
            if rest is None:
                continue
            cand = rest[:i] + [o] + rest[i:]
            c = sum(x.cost for x in cand)
            if c < cost:
                pick, cost = cand, c
    return pick


def _greedy(items: list[Item], budget: int) -> list[Option]:
    pick = [it.options[0] for it in items]
    _fill(items, pick, budget)
    return pick


METHODS = {"lagrange": _lagrange, "greedy": _greedy}


def allocate(items: list[Item], budget_bytes: int, method: str = "lagrange") -> Allocation:
    """The types that minimise the summed cost of `items` within budget_bytes (never above)."""
    if method not in METHODS:
        raise GGQuantError(f"--allocator {method!r}: choose one of {', '.join(METHODS)}")
    smallest = sum(it.options[0].nbytes for it in items)
    if budget_bytes < smallest:
        raise GGQuantError(f"the budget leaves {budget_bytes} bytes for the quantizable tensors, below the "
                           f"smallest mix of the candidate types ({smallest} bytes); raise the target or add "
                           f"smaller types with --types")
    pick = METHODS[method](items, budget_bytes)
    nbytes, cost = _total(items, pick)
    assert nbytes <= budget_bytes
    return Allocation(items, {it.name: o.qtype for it, o in zip(items, pick)}, nbytes, cost, method)


def budget_for(reader, items: list[Item], *, target_bpw: float | None = None, target_size: int | None = None):
    """(bytes available to the quantizable tensors, bytes of the rest kept as they are, total
    elements). --target-bpw counts every tensor of the file (as llama.cpp's reported BPW does)."""
    quant = {it.name for it in items}
    fixed = sum(t.nbytes for t in reader.tensors if t.name not in quant)
    n_total = sum(math.prod(t.shape) for t in reader.tensors)
    if (target_bpw is None) == (target_size is None):
        raise GGQuantError("give exactly one of --target-bpw and --target-size")
    total = int(target_bpw * n_total / 8) if target_bpw is not None else int(target_size)
    f32 = 4 * n_total
    if total > f32:
        raise GGQuantError(f"the target ({total} bytes, {8 * total / n_total:.2f} bpw) is above the model in F32 "
                           f"({f32} bytes): nothing to allocate")
    return total - fixed, fixed, n_total
