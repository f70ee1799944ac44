"""Data-parallel imatrix collection (`ggquant imatrix --devices ...`, issue 18): chunks spread over
worker processes, each holding a replica of the model, merged in chunk order so that the file does
not depend on the number of workers. Here on CPU workers (CI has no GPU); the same path runs one
worker per GPU with --devices cuda:0,cuda:1,..."""

import json

import numpy as np
from click.testing import CliRunner

from ggquant.cli import main
from ggquant.imatrix.collect import collect_imatrix
from ggquant.imatrix.files import load
from tests.oracles import real_text


def _imatrix(model, cal, out, *extra):
    res = CliRunner().invoke(main, ["imatrix", str(model), "-f", str(cal), "-o", str(out), "-c", "32",
                                    "--chunks", "5", "-t", "1", *extra])
    assert res.exit_code == 0, res.output
    return out.read_bytes(), json.loads(res.output)


def test_one_and_two_workers_write_the_same_file(reference_gguf, tmp_path):
    model = reference_gguf("gemma4_a4b", "f32")  # dense weights and per-expert (MUL_MAT_ID) sums
    cal = real_text.write(tmp_path / "cal.txt", real_text.calibration_text()[:20000])
    one, s1 = _imatrix(model, cal, tmp_path / "one.gguf", "--devices", "cpu", "--json")
    two, s2 = _imatrix(model, cal, tmp_path / "two.gguf", "--devices", "cpu,cpu", "--json")
    assert (s1["workers"], s2["workers"], s2["chunks"]) == (1, 2, 5)
    assert one == two
    # against the one-process collection (token by token across chunks, as imatrix.cpp): the
    # same entries and counts, sums equal up to float32 summation order
    seq, _ = collect_imatrix(model, cal, ctx=32, chunks=5, threads=1, progress=False)
    par = load(tmp_path / "two.gguf")
    assert sorted(par.entries) == sorted(seq.entries) and par.chunk_count == seq.chunk_count == 5
    experts = 0
    for name, e in seq.entries.items():
        p = par.entries[name]
        assert np.array_equal(p.counts, e.counts), name
        np.testing.assert_allclose(p.sums, e.sums, rtol=2e-6, atol=0, err_msg=name)
        experts += e.sums.shape[0] > 1
    assert experts > 0


def test_unknown_device_is_refused(reference_gguf, tmp_path):
    cal = real_text.write(tmp_path / "cal.txt", real_text.calibration_text()[:20000])
    res = CliRunner().invoke(main, ["imatrix", str(reference_gguf("gemma4_e4b", "f32")), "-f", str(cal),
                                    "-o", str(tmp_path / "x.gguf"), "-c", "32", "--devices", "cpu,gpu1"])
    assert res.exit_code == 1 and "gpu1" in res.output and not (tmp_path / "x.gguf").exists()
