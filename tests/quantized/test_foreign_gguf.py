"""GGUFs ggquant did not write: auto-round 0.16.1's own GGUF export (`gguf:q4_k_m`)
of a tiny Llama with a real Llama 3 tokenizer. `inspect` reads them, `run` generates, and
`parity` against llama.cpp on the same file agrees exactly (KL 0, top-1 100 %)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("auto_round")
pytest.importorskip("llama_cpp")

from ggquant.cli import main  # noqa: E402
from ggquant.fixtures.cache import cached_build  # noqa: E402
from ggquant.fixtures.quantized import build_auto_round_gguf  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. " * 8


# gguf:q4_0 behaves the same (checked by hand); one format keeps CI time down (~2 min to build)
@pytest.mark.parametrize("fmt, ftype", [("gguf:q4_k_m", 15)])
def test_auto_round_gguf_inspect_run_parity(fmt, ftype):
    import auto_round

    from ggquant.formats.gguf import GGUFReader
    from ggquant.parity.run import run_parity

    d = cached_build(f"autoround_{fmt.replace(':', '_')}", build_auto_round_gguf, fmt=fmt,
                     autoround_version=auto_round.__version__)
    (path,) = d.glob("*.gguf")
    with GGUFReader(path) as r:
        assert r.get("general.file_type") == ftype
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0 and "llama.block_count" in res.output, res.output
    res = CliRunner().invoke(main, ["run", str(path), "--prompt", "hello", "-n", "4", "--temp", "0"])
    assert res.exit_code == 0 and "4 generated" in res.output, res.output
    p = run_parity(path, "llama.cpp", TEXT, ctx=32, chunks=1, threads=2)
    s = p.stats.summary()
    assert s["top1_agreement"] == 1.0 and s["kl_max"] == 0.0 and s["max_abs_logit_diff"] == 0.0, s
