"""The IQ grids, and the search tables ggml's IQ quantizers build from them, derived at run time.

ggml-quants.c keeps each IQ grid twice: packed as `kgrid_*` uint16 level codes (the quantizer's
tables, expanded by `iq2xs_init_impl` / `iq3xs_init_impl`) and expanded as the dequantizer's
`iq*_grid` values (ggml-common.h). gguf-py 0.19 (`gguf/quants.py`) carries the second kind: per IQ
class, the level index of every grid element (into `grid_map`) packed in `grid_hex`. The
quantizer's level of an element is exactly that index (ggml maps level l to 2*l + 1 in its search
grid and to grid_map[l] in its dequantizer), so both tables come from gguf-py here, as the design
asks (never re-declare tables gguf already has); tests/quant/test_iq_quantize.py checks the
results byte for byte through ggml's own quantizer.

What `iq2xs_init_impl(type)` / `iq3xs_init_impl(grid_size)` build, and what `build(kind)` returns:

    grid        int8 [n_grid, G]   the search grid: 2*l + 1 per element (G = 8 for IQ2/IQ1, 4 for IQ3)
    kmap        int32 [kmap_size]  packed levels (2 bits per element for IQ2/IQ1, 3 for IQ3) ->
                                   grid index if the point is on the grid, else -(offset + 1)
    neighbours  uint16 [...]       at offset: the count n, then n grid indices: the grid points in
                                   the `nwant` nearest squared-distance shells of the off-grid point,
                                   by (distance, index) (ggml qsorts with iq2_compare_func, which
                                   breaks ties by index, so the lists are deterministic); then
                                   zeros up to a multiple of LIST_PAD entries

The offsets are ggquant's own (the C's depend on its OpenMP schedule only through a prefix sum,
never on the results); only each list's content matters, and it is the C's.

Only reachable points get a list. The IQ2/IQ1 quantizers clamp every level to [0, 2]
(kMaxQ - 1 = 2 for IQ2; IQ1's three levels), so of the 43692 packed codes the C visits, only the
3**8 = 6561 whose 2-bit fields are all <= 2 can ever be looked up: a code with a 3 in it keeps
kmap = UNREACHABLE here instead of a list the quantizer would never read. This cuts the IQ1_S
build (2048-point grid) by 6.7x. IQ3 levels span all 3-bit values, so all 4096 codes get lists.

Builds run in parallel (numba prange over codes; each list is independent) and are cached per
process (functools.cache); tables() reports the build time of each.
"""

import functools
import time

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

# iq2xs_init_impl: kmap_size = 43692 (16-bit codes of 8 x 2-bit levels, up to 0xAAAB);
# iq3xs_init_impl: kmap_size = 4096 (12-bit codes of 4 x 3-bit levels).
KMAP_SIZE_2BIT = 43692
KMAP_SIZE_3BIT = 4096
UNREACHABLE = np.iinfo(np.int32).min  # kmap value of a code no quantizer can produce
# Lists are stored padded to a multiple of this many points (one AVX-512 vector of float32
# distances): the search runs whole vectors, never a remainder loop.
LIST_PAD = 16

# kind -> (gguf-py class, bits per level, nwant): nwant as iq2xs_init_impl / iq3xs_init_impl set it
# (IQ1_S/IQ1_M 3, IQ2_S 1, IQ2_XXS/IQ2_XS 2; iq3 grid 256 -> 2, 512 -> 3). IQ1_S and IQ1_M share
# one table in ggml (iq2_data_index maps both to slot 2).
KINDS = {
    T.IQ2_XXS: (gq.IQ2_XXS, 2, 2),
    T.IQ2_XS: (gq.IQ2_XS, 2, 2),
    T.IQ2_S: (gq.IQ2_S, 2, 1),
    T.IQ1_S: (gq.IQ1_S, 2, 3),
    T.IQ1_M: (gq.IQ1_S, 2, 3),
    T.IQ3_XXS: (gq.IQ3_XXS, 3, 2),
    T.IQ3_S: (gq.IQ3_S, 3, 3),
}


def grid_levels(cls) -> np.ndarray:
    """uint8 [n_grid, G]: the level index of every element of gguf-py's grid for IQ class `cls`."""
    cls.init_grid()  # idempotent
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    grid_map = np.asarray(cls.grid_map, dtype=np.float32)
    order = np.argsort(grid_map)
    levels = order[np.searchsorted(grid_map[order], values)]
    assert np.array_equal(grid_map[levels], values), cls.__name__
    return levels.astype(np.uint8)


def kgrid(qtype) -> np.ndarray:
    """uint16 [n_grid]: ggml-quants.c's kgrid_* codes (level i at bits bits*i) for `qtype`."""
    cls, bits, _ = KINDS[qtype]
    levels = grid_levels(cls).astype(np.uint16)
    shifts = (bits * np.arange(levels.shape[1])).astype(np.uint16)
    return np.bitwise_or.reduce(levels << shifts, axis=1).astype(np.uint16)


@nb.njit(cache=True, inline="always")
def _dist2(code, grid, j, bits):
    """Squared distance between the off-grid point `code` (pos = 2*l + 1) and grid point j."""
    mask = (1 << bits) - 1
    d2 = 0
    for k in range(grid.shape[1]):
        pos = 2 * ((code >> (bits * k)) & mask) + 1
        diff = np.int64(grid[j, k]) - pos
        d2 += diff * diff
    return d2


@nb.njit(cache=True, inline="always")
def _shell_limit(code, grid, bits, nwant):
    """The largest squared distance among the nwant smallest distinct distances from code."""
    limit = -1
    for _ in range(nwant):
        best = np.iinfo(np.int64).max
        for j in range(grid.shape[0]):
            d2 = _dist2(code, grid, j, bits)
            if limit < d2 < best:
                best = d2
        if best == np.iinfo(np.int64).max:  # fewer distinct distances than nwant: all of them
            break
        limit = best
    return limit


@nb.njit(parallel=True, cache=True)
def _count(codes, grid, bits, nwant, counts):
    for c in nb.prange(codes.size):
        code = codes[c]
        limit = _shell_limit(code, grid, bits, nwant)
        n = 0
        for j in range(grid.shape[0]):
            if _dist2(code, grid, j, bits) <= limit:
                n += 1
        counts[c] = n


@nb.njit(parallel=True, cache=True)
def _fill(codes, grid, bits, nwant, offsets, neighbours):
    """Each list by (distance, index): one pass per distinct distance, indices ascending."""
    for c in nb.prange(codes.size):
        code = codes[c]
        o = offsets[c]
        pos = o + 1
        prev = -1
        for _ in range(nwant):
            best = np.iinfo(np.int64).max
            for j in range(grid.shape[0]):
                d2 = _dist2(code, grid, j, bits)
                if prev < d2 < best:
                    best = d2
            if best == np.iinfo(np.int64).max:
                break
            for j in range(grid.shape[0]):
                if _dist2(code, grid, j, bits) == best:
                    neighbours[pos] = j
                    pos += 1
            prev = best
        neighbours[o] = pos - o - 1


def padded(n):
    """Entries a list of n points occupies after its count: n rounded up to a multiple of LIST_PAD."""
    return (n + LIST_PAD - 1) // LIST_PAD * LIST_PAD


@nb.njit(parallel=True, cache=True)
def _list_levels(neighbours, offsets, counts, levels, pad):
    g = levels.shape[1]
    out = np.zeros(neighbours.size * g, np.uint8)
    for c in nb.prange(offsets.size):
        o = offsets[c]
        n = counts[c]
        npad = (n + pad - 1) // pad * pad
        for i in range(g):
            for j in range(n):
                out[g * o + i * npad + j] = levels[np.int64(neighbours[o + 1 + j]), i]
    return out


class SearchTables:
    """grid / kmap / neighbours of one IQ kind (see the module docstring), plus the build time."""

    def __init__(self, qtype):
        t0 = time.perf_counter()
        cls, bits, nwant = KINDS[qtype]
        levels = grid_levels(cls)
        n_grid, g = levels.shape
        self.bits, self.nwant = bits, nwant
        self.grid = np.ascontiguousarray(2 * levels.astype(np.int8) + 1)  # [n_grid, g]
        codes_on_grid = kgrid(qtype).astype(np.int64)
        kmap_size = KMAP_SIZE_2BIT if bits == 2 else KMAP_SIZE_3BIT
        kmap = np.full(kmap_size, -1, dtype=np.int32)
        kmap[codes_on_grid] = np.arange(n_grid, dtype=np.int32)
        all_codes = np.arange(kmap_size, dtype=np.int64)
        # a 2-bit code is reachable when none of its fields is 3 (3-bit codes always are)
        fields = (all_codes[:, None] >> (bits * np.arange(g))) & ((1 << bits) - 1)
        reachable = (fields <= 2).all(axis=1) if bits == 2 else np.ones(kmap_size, dtype=bool)
        off = all_codes[(kmap < 0) & reachable]
        kmap[(kmap < 0) & ~reachable] = UNREACHABLE
        counts = np.empty(off.size, dtype=np.int64)
        _count(off, self.grid, bits, nwant, counts)
        # each list: its count, its points, then zeros up to a multiple of LIST_PAD points
        sizes = padded(counts) + 1
        offsets = np.zeros(off.size, dtype=np.int64)
        np.cumsum(sizes[:-1], out=offsets[1:])
        neighbours = np.zeros(int(sizes.sum()), dtype=np.uint16)
        _fill(off, self.grid, bits, nwant, offsets, neighbours)
        kmap[off] = -(offsets + 1).astype(np.int32)
        self.kmap = kmap
        self.neighbours = neighbours
        self.levels = np.ascontiguousarray(levels.astype(np.int8))  # [n_grid, g]: (grid - 1) / 2
        # The listed points' levels again, list by list and transposed, so that a search adds up
        # the distances of LIST_PAD points at once, one coordinate after the other: the list at
        # offset o with n points holds levels[idx_j, i] at lvt[g*o + i*padded(n) + j] (level 0
        # for the padding points j >= n, whose distances the search ignores).
        self.lvt = _list_levels(neighbours, offsets, counts, self.levels, LIST_PAD)
        self.seconds = time.perf_counter() - t0


@functools.cache
def tables(qtype) -> SearchTables:
    """The search tables of IQ type `qtype` (IQ1_M shares IQ1_S's), built once per process."""
    qtype = T(qtype)
    if qtype == T.IQ1_M:
        return tables(T.IQ1_S)
    return SearchTables(qtype)
