"""Triton kernel tests run on CUDA, or on the CPU under Triton's interpreter. The interpreter is
chosen when triton is first imported, so on a CPU machine one test per module re-runs that
module's `gpu` tests in a child pytest with TRITON_INTERPRET=1 (rerun_under_interpreter)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not installed (python3 -m pip install --no-deps triton)"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def kernel_device(rerun_by: str) -> str:
    """"cuda", or "cpu" under the interpreter; elsewhere the test is skipped (`rerun_by`, the
    test that re-runs it, is named)."""
    if not HAS_TRITON:
        pytest.skip(NO_TRITON)
    if has_cuda() and not INTERPRETING:
        return "cuda"
    if INTERPRETING:
        return "cpu"
    pytest.skip(f"no CUDA device; on CPU these run under TRITON_INTERPRET=1 (see {rerun_by})")


def rerun_under_interpreter(path: str, timeout: float) -> str:
    """The `gpu` tests of the module at `path` on CPU tensors under the interpreter: the child
    pytest's output, once it has passed."""
    if not HAS_TRITON:
        pytest.skip(NO_TRITON)
    if has_cuda() or INTERPRETING:
        pytest.skip("the gpu tests run directly here")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", path],
        check=False, env=env, capture_output=True, text=True, timeout=timeout)
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    return result.stdout
