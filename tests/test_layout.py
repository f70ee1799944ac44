"""The repo's folders must not shadow PyPI packages when Python runs from the repo root.

kernels/ and fixtures/ are plain folders holding ggquant.kernels and ggquant.fixtures
(pyproject [tool.setuptools.package-dir]). A top-level `kernels` package broke transformers
>= 5.25, which imports the PyPI package `kernels` at start-up (huggingface/transformers#42004).
pytest runs from the repo root with it on sys.path (rootdir conftest), as `make test` and the
Makefile's `python -c` do, so these checks see what those see.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["kernels", "fixtures"])
def test_repo_folder_does_not_shadow_pypi_package(name):
    spec = importlib.util.find_spec(name)
    # absent, a namespace spec (a plain folder: origin None), or a real install outside the repo
    if spec is not None and spec.origin is not None:
        assert REPO / name not in Path(spec.origin).resolve().parents, f"{name} resolves to the repo: {spec.origin}"


def test_packages_inside_the_folders_are_ggquant_subpackages():
    import ggquant.fixtures
    import ggquant.kernels

    assert Path(ggquant.kernels.__file__).parent == REPO / "kernels" / "ggquant_kernels"
    assert Path(ggquant.fixtures.__file__).parent == REPO / "fixtures" / "ggquant_fixtures"


def test_transformers_gemma4_imports_from_repo_root():
    # a fresh interpreter started in the repo root, as the Makefile's `python -c` lines are
    code = "import transformers.models.gemma4.modeling_gemma4, transformers.models.gemma3.modeling_gemma3"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_pyproject_lists_every_package():
    """A wheel (`pip install ggquant`, not editable) ships only the packages pyproject lists."""
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    roots = {"ggquant": REPO / "ggquant"} | {name: REPO / d for name, d in cfg["package-dir"].items()}
    found = set()
    for prefix, root in roots.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            if "__pycache__" not in rel and not any(p.startswith(".") for p in rel):
                found.add(".".join((prefix, *rel)))
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"
