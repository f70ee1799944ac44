"""MLX affine quantization (mlx-lm, mlx-optiq): packed uint32 weights with per-group scales and biases.

Layout (mlx core `quantize(w, group_size, bits, mode="affine")`; mlx/backend/cpu/quantized.cpp):
  P.weight U32 [out, in*bits/32]   codes u in [0, 2^bits - 1], one dense little-endian bit stream per
                                   row (2/4/8 bit: 32/bits codes per word at bits*j; 3/5/6 bit: 8 or 4
                                   codes per 3/5 bytes, the same stream read byte-wise)
  P.scales, P.biases [out, in/group_size]  in the model dtype (bf16/fp16/f32)
  stacked experts (mlx-lm's QuantizedSwitchLinear, e.g. Gemma 4's experts.switch_glu.gate_proj):
  P.weight [experts, out, in*bits/32], P.scales / P.biases [experts, out, in/group_size]; the
  record has one row per expert (its matrix flattened) and `expert_rows` = out
  w = scales * u + biases          (scales may be negative: mlx picks the edge of larger magnitude)
config.json "quantization" (mlx-lm also copies it to "quantization_config"):
  {"group_size": 64, "bits": 4, "mode": "affine", "<module path>": {"group_size", "bits"[, "mode"]}, ...}
Per-module entries (mixed precision, e.g. mlx-optiq's 4/8-bit models) override the defaults;
a module is quantized exactly when `<path>.scales` exists. Tensor names are mlx-lm's own, which
may differ from the Hugging Face names (the arch map handles that).

Exact GGML mapping: w = d*u + m per 32-column block is Q4_1 for bits <= 4 and Q5_1 for bits <= 5,
when the scale and bias are fp16 values (bf16 scales in [2^-17, 65504] always are); 6- and 8-bit
codes have more levels than any GGML offset type holds.
"""

from __future__ import annotations

import numpy as np

from ggquant.errors import FormatError, GGQuantError
from ggquant.formats.quantized import reader
from ggquant.formats.quantized.records import AffineQuantTensor, QuantizedModel, Source, unpack_stream

__all__ = ["read", "SUPPORTED_BITS"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


def _params(d: dict, default: dict, where: str) -> tuple[int, int]:
    mode = d.get("mode", default.get("mode", "affine"))
    if mode != "affine":
        raise GGQuantError(f"{where}: MLX quantization mode {mode!r} is not supported (affine only)")
    bits = int(d.get("bits", default.get("bits", 4)))
    gs = int(d.get("group_size", default.get("group_size", 64)))
    if bits not in SUPPORTED_BITS:
        raise GGQuantError(f"{where}: MLX {bits}-bit quantization is not supported ({SUPPORTED_BITS})")
    if gs not in GROUP_SIZES:
        raise GGQuantError(f"{where}: MLX group size {gs} is not supported ({GROUP_SIZES})")
    return bits, gs


@reader("mlx")
def read(config: dict, src: Source, method: str) -> QuantizedModel:
    qc = config.get("quantization")
    if not isinstance(qc, dict):
        qc = config["quantization_config"]
    default = {k: qc[k] for k in ("bits", "group_size", "mode") if k in qc}
    _params({}, default, "config.json quantization")
    tensors = {}
    consumed: set[str] = set()
    per_bits: dict[int, int] = {}
    for name in src.names:
        if not name.endswith(".scales"):
            continue
        mod = name[: -len(".scales")]
        where = f"module '{mod}' (MLX affine)"
        over = qc.get(mod, {})
        if over is False:
            raise FormatError(f"{where}: config.json says it is not quantized, but '{name}' exists")
        if not isinstance(over, dict):
            over = {}
        bits, gs = _params(over, default, where)
        w_name, b_name = f"{mod}.weight", f"{mod}.biases"
        for need in (w_name, b_name):
            if need not in src:
                raise FormatError(f"{where}: tensor '{need}' is missing (affine mode stores weight, scales, biases)")
        wshape, sshape = src.shape(w_name), src.shape(name)
        if len(wshape) not in (2, 3):
            raise FormatError(f"{where}: weight has shape {list(wshape)}; expected [out, in*bits/32] or, for "
                              f"stacked experts (QuantizedSwitchLinear), [experts, out, in*bits/32]")
        *lead, words = wshape
        n = words * 32 // bits
        if (words * 32) % bits or tuple(sshape) != (*lead, n // gs) or n % gs:
            raise FormatError(f"{where}: weight {list(wshape)} and scales {list(sshape)} do not fit {bits}-bit "
                              f"codes in groups of {gs} (is the per-module bits/group_size right?)")
        if src.shape(b_name) != tuple(sshape):
            raise FormatError(f"{where}: biases {list(src.shape(b_name))} differ from scales {list(sshape)}")
        if src.dtype(w_name) not in ("U32", "I32"):
            raise FormatError(f"{where}: weight has dtype {src.dtype(w_name)}, expected U32")

        # Stacked experts [E, out, ...] are one record of E rows of out*n values (row e = expert e's
        # matrix flattened): a group never straddles two of its rows since n % group_size == 0.
        width = n * (lead[1] if len(lead) == 2 else 1)

        def load(rr, w_name=w_name, s_name=name, b_name=b_name, bits=bits, n=n, width=width):
            arr, _ = src.raw(w_name, rr)
            arr = np.asarray(arr)
            u = unpack_stream(arr.reshape(-1, arr.shape[-1]), bits, n).reshape(-1, width)
            r = len(u)
            return u, src.floats(s_name, rr).reshape(r, -1), src.floats(b_name, rr).reshape(r, -1)

        enc = f"MLX affine {bits}-bit group{gs}"
        tensors[w_name] = AffineQuantTensor(w_name, (lead[0], width), enc, "mlx/affine", (w_name, name, b_name), bits,
                                            gs, load, expert_rows=lead[1] if len(lead) == 2 else None)
        consumed.update((w_name, name, b_name))
        per_bits[bits] = per_bits.get(bits, 0) + 1
    mix = ", ".join(f"{c}x{b}-bit" for b, c in sorted(per_bits.items()))
    desc = f"MLX affine {default.get('bits', 4)}-bit group{default.get('group_size', 64)}" + (f" ({mix})" if mix else "")
    return QuantizedModel("mlx", desc, tensors, frozenset(consumed), [], dict(qc))
