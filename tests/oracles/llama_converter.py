"""llama.cpp's own HF -> GGUF converter, run as the reference for `ggquant convert`.

The converter is not vendored in this repository. At test time the llama.cpp tree is taken
from the llama-cpp-python 0.3.36 sdist (the same llama.cpp the installed llama_cpp library
was built from): `pip download` fetches the sdist once into the fixture cache and the parts
the converter needs are unpacked next to it. Set GGQUANT_LLAMA_CPP_DIR to use an existing
llama.cpp checkout instead, or GGQUANT_LLAMA_SDIST to a local copy of the sdist tarball.

The converter runs in a subprocess of this venv's python with PYTHONPATH=<tree>/gguf-py, so it
imports the gguf-py that ships with that llama.cpp, not the installed gguf package (they
differ; research note gemma4-architecture-and-parity.md §8.8).

- run_reference_converter(hf_dir, outfile, outtype, mmproj): one `python convert_hf_to_gguf.py`.
- run_reference_converter_many(jobs): several conversions in one interpreter (same bytes,
  checked; a tiny conversion is mostly the torch/transformers import, so this is ~5x faster).
- cached_reference_ggufs(requests): converted files cached under the fixture cache.

The Gemma 3 converter reads tokenizer.model through the `sentencepiece` package, which must be
installed in the venv for Gemma 3 conversions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ggquant.fixtures.cache import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"

# What convert_hf_to_gguf.py needs: the script, its `conversion` package, gguf-py, and the
# chat templates some converters read from models/templates. The rest of the tree (ggml
# sources, 75 MB of vocab test files) is not unpacked.
_NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "LICENSE")

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "tq1_0", "tq2_0", "auto")


class ReferenceConverterError(RuntimeError):
    pass


def _sdist(download_dir: Path) -> Path:
    local = os.environ.get("GGQUANT_LLAMA_SDIST")
    if local:
        p = Path(local)
        if not p.is_file():
            raise FileNotFoundError(f"GGQUANT_LLAMA_SDIST={local} is not a file")
        return p
    path = download_dir / _SDIST_NAME
    if path.is_file():
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(download_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not path.is_file():
        raise ReferenceConverterError(
            f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
            f"(set GGQUANT_LLAMA_SDIST to a local copy):\n{res.stderr[-4000:]}")
    return path


def llama_cpp_source() -> Path:
    """The llama.cpp tree (converter + gguf-py) matching llama-cpp-python 0.3.36."""
    env = os.environ.get("GGQUANT_LLAMA_CPP_DIR")
    if env:
        tree = Path(env)
        if not (tree / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"GGQUANT_LLAMA_CPP_DIR={env} has no convert_hf_to_gguf.py")
        return tree
    root = cache_root()
    tree = root / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    sdist = _sdist(root / "sdist")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=root))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(_VENDOR):
                    continue
                rel = m.name[len(_VENDOR):]
                if not any(rel == n or rel.startswith(n) for n in _NEEDED):
                    continue
                if not (m.isfile() or m.isdir()):
                    continue
                m.name = rel
                members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise ReferenceConverterError(f"{sdist} has no {_VENDOR}convert_hf_to_gguf.py")
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            tmp.rename(tree)
        except OSError:  # another process finished first
            if not (tree / "convert_hf_to_gguf.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


@dataclass(frozen=True)
class ConvertJob:
    """One convert_hf_to_gguf.py invocation."""

    hf_dir: Path
    outfile: Path
    outtype: str = "f32"
    mmproj: bool = False
    extra_args: tuple[str, ...] = ()

    def argv(self, tmp_out: Path) -> list[str]:
        args = [str(self.hf_dir), "--outfile", str(tmp_out), "--outtype", self.outtype, *self.extra_args]
        return args + (["--mmproj"] if self.mmproj else [])

    def describe(self) -> str:
        return f"convert_hf_to_gguf.py {self.hf_dir} --outtype {self.outtype}{' --mmproj' if self.mmproj else ''}"


# Runs convert_hf_to_gguf.py once per job inside one interpreter, as `python script args`
# would (runpy with run_name="__main__", the script's folder first on sys.path), so torch and
# transformers are imported once instead of once per conversion (most of a tiny conversion's
# time). Each job's stderr section is delimited by marker lines.
_DRIVER = r"""
import json, os, runpy, sys, traceback
script, jobs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(script))
for i, argv in enumerate(jobs):
    print(f"@@ggquant-job {i} begin", file=sys.stderr, flush=True)
    sys.argv = [script, *argv]
    rc = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    print(f"@@ggquant-job {i} end {rc}", file=sys.stderr, flush=True)
"""


def _converter_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree / "gguf-py")
    env.pop("NO_LOCAL_GGUF", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def run_reference_converter_many(jobs: list[ConvertJob], timeout: float = 900) -> list[Path | Exception]:
    """Run several conversions in one converter process; per job the outfile or the error.

    Outputs are written under temporary names and renamed only on success, so a failed job
    never leaves a partial outfile.
    """
    for job in jobs:
        if job.outtype not in OUTTYPES:
            raise ValueError(f"outtype must be one of {OUTTYPES}, got {job.outtype!r}")
    if not jobs:
        return []
    tree = llama_cpp_source()
    tmps = []
    for i, job in enumerate(jobs):
        job.outfile.parent.mkdir(parents=True, exist_ok=True)
        tmps.append(job.outfile.with_name(f".{job.outfile.name}.{os.getpid()}.{i}.tmp"))
    cmd = [sys.executable, "-c", _DRIVER, str(tree / "convert_hf_to_gguf.py"),
           json.dumps([job.argv(tmp) for job, tmp in zip(jobs, tmps)])]
    results: list[Path | Exception] = []
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=_converter_env(tree), timeout=timeout)
        sections: dict[int, tuple[str, int]] = {}
        for m in re.finditer(r"@@ggquant-job (\d+) begin\n(.*?)@@ggquant-job \1 end (-?\d+)\n", res.stderr, re.S):
            sections[int(m.group(1))] = (m.group(2), int(m.group(3)))
        for i, (job, tmp) in enumerate(zip(jobs, tmps)):
            log, rc = sections.get(i, (res.stderr, res.returncode or -1))
            if rc != 0:
                results.append(ReferenceConverterError(f"{job.describe()} failed (exit {rc}):\n{log[-8000:]}"))
            elif not tmp.is_file():
                results.append(ReferenceConverterError(f"{job.describe()} exited 0 but wrote no file:\n{log[-4000:]}"))
            else:
                os.replace(tmp, job.outfile)
                results.append(job.outfile)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()
    return results


def run_reference_converter(hf_dir: str | Path, outfile: str | Path, outtype: str = "f32",
                            mmproj: bool = False, extra_args: tuple[str, ...] = (),
                            timeout: float = 600) -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py on hf_dir; returns outfile.

    Runs `python convert_hf_to_gguf.py HF_DIR --outfile ... --outtype ...` in a subprocess.
    Raises ReferenceConverterError carrying the converter's stderr when it fails; the output
    is written under a temporary name first, so a failed run never leaves a partial outfile.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    tree = llama_cpp_source()
    job = ConvertJob(Path(hf_dir), Path(outfile), outtype, mmproj, tuple(extra_args))
    job.outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = job.outfile.with_name(f".{job.outfile.name}.{os.getpid()}.tmp")
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), *job.argv(tmp_out)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=_converter_env(tree), timeout=timeout)
        if res.returncode != 0:
            raise ReferenceConverterError(
                f"{job.describe()} failed with exit code {res.returncode}:\n{res.stderr[-8000:]}")
        if not tmp_out.is_file():
            raise ReferenceConverterError(f"{job.describe()} exited 0 but wrote no file:\n{res.stderr[-4000:]}")
        os.replace(tmp_out, job.outfile)
    finally:
        if tmp_out.exists():
            tmp_out.unlink()
    return job.outfile


def cached_reference_ggufs(requests: list[tuple[Path, str, bool]]) -> list[Path | Exception]:
    """Reference GGUFs for (hf_dir, outtype, mmproj) requests, converted once into the cache.

    Cached files are keyed by the checkpoint folder's path (fixture folders carry their own
    content key), the conversion options and the llama.cpp version. All missing files are
    converted in one converter process. Per request: the path, or the conversion's error.
    """
    from ggquant.fixtures.cache import cache_key

    targets = []
    for hf_dir, outtype, mmproj in requests:
        hf_dir = Path(hf_dir).resolve()
        key = cache_key("reference-gguf", {"hf_dir": str(hf_dir), "outtype": outtype, "mmproj": mmproj,
                                           "llama_cpp": LLAMA_CPP_PYTHON_VERSION})
        name = f"{hf_dir.name}-{'mmproj-' if mmproj else ''}{outtype}-{key}.gguf"
        targets.append(cache_root() / "gguf" / name)
    missing = {}
    for (hf_dir, outtype, mmproj), target in zip(requests, targets):
        if not target.is_file() and target not in missing:
            missing[target] = ConvertJob(Path(hf_dir), target, outtype, mmproj)
    done = dict(zip(missing, run_reference_converter_many(list(missing.values())))) if missing else {}
    return [done.get(t, t) for t in targets]
