"""requirements.lock pins every distribution `make setup` installed, at the version installed.

A package that is here but not in the lock (or at another version) means the environment was not
built from the lock, or the lock is stale: run `make lock`, review, commit.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sysconfig
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 normalization


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[_key(name)] = version
    return pins


def test_lock_covers_every_installed_distribution():
    pins = _pins()
    missing, other = [], []
    # the environment's own site-packages, not sys.path: `import ray` puts its vendored copies
    # (ray/thirdparty_files: colorama, psutil) on sys.path, and they are part of the ray wheel
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in md.distributions(path=site):
        key = _key(dist.metadata["Name"])
        if key == "ggquant":
            continue
        if key not in pins:
            missing.append(f"{key}=={dist.version}")
        elif pins[key] != dist.version:
            other.append(f"{key}: installed {dist.version}, locked {pins[key]}")
    assert not missing and not other, (
        "the environment differs from requirements.lock (run `make lock` or `make setup`):\n"
        + "\n".join(sorted(missing) + sorted(other)))


def test_lock_pins_the_direct_dependencies():
    pins = _pins()
    for name in ("gguf", "numpy", "numba", "torch", "transformers", "llama-cpp-python", "compressed-tensors"):
        assert name in pins, name
