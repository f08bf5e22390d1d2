"""Where the kernel tests run, decided in one place for every kernel test file.

With CUDA every Triton case uses CUDA tensors (or a CUDA model) and the compiled kernel, in the
test process. Without CUDA the Triton kernel runs under Triton's interpreter on CPU tensors. The
interpreter is chosen when triton is imported (its own @jit functions are built then), so
TRITON_INTERPRET=1 must be in the environment before that; tests/conftest.py imports rope_ext,
which imports triton (through torch._dynamo), so a test process started without it cannot
interpret. Its Triton tests then skip (``triton_here``) and one test per file reruns them in a
fresh process with TRITON_INTERPRET=1 (``rerun_interpreted``). Without an importable triton the
Triton tests skip and say so; the torch path is tested without it (tests/test_rotary_torch.py).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent


def _triton_imports() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _interpreted() -> bool:
    """True when triton's own @jit functions (tl.sum ...) were built for the interpreter."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


TRITON = _triton_imports()
TRITON_HERE = TRITON and (CUDA or _interpreted())
NO_TRITON = "triton is not installed or does not import (pip install rope-ext[kernels]): the Triton kernel is not tested"
TOO_LATE = "triton was imported before TRITON_INTERPRET=1 could be set"
NOT_HERE = f"no CUDA, and {TOO_LATE}: this test runs in a fresh process under the interpreter (test_fresh_process_*)"

needs_triton = pytest.mark.skipif(not TRITON, reason=NO_TRITON)
triton_here = pytest.mark.skipif(not TRITON_HERE, reason=NO_TRITON if not TRITON else NOT_HERE)


def kernel_device() -> torch.device:
    """The device of every Triton case: CUDA (compiled kernel) when present, else CPU (interpreter)."""
    return torch.device("cuda" if CUDA else "cpu")


def gpu_only(what: str) -> Callable[[Callable], Callable]:
    """Mark a test ``gpu`` and skip it without CUDA; ``what`` says what it needs the GPU for."""

    def mark(test: Callable) -> Callable:
        return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason=f"needs a CUDA device ({what})")(test))

    return mark


def rerun_interpreted(target: str) -> None:
    """Run pytest on ``target`` (a file or node id) in a fresh process with TRITON_INTERPRET=1 and
    check that it passed without skipping anything for want of the interpreter."""
    if TRITON_HERE:
        pytest.skip("this process runs the Triton tests itself (CUDA, or TRITON_INTERPRET=1 set before triton was imported)")
    if not TRITON:
        pytest.skip(NO_TRITON)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", target, "-q", "-rs", "-p", "no:cacheprovider"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and TOO_LATE not in done.stdout, done.stdout[-4000:]
