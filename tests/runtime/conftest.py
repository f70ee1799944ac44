"""Under TRITON_INTERPRET=1 the backend runs the Triton kernels on the CPU in every test that builds
a CUDABackend (test_cuda.py, test_cuda_prefill.py), not only in the kernel tests that call
test_cuda_kernels._kernels: the interpreter fix it applies (_interpreter_scalar_index_fix) must be
in place before any of them runs."""

from __future__ import annotations

import importlib.util
import os


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1" and all(importlib.util.find_spec(m) for m in ("triton", "torch")):
        from tests.runtime.test_cuda_kernels import _interpreter_scalar_index_fix

        _interpreter_scalar_index_fix()
