"""The Triton kernels (kernels/triton) against the reference, via tests/triton_parity.py.

The parity checks run in a subprocess: the Triton interpreter has to be switched on
(TRITON_INTERPRET=1) before triton is imported, which this process may already have done
differently. Interpreted on the CPU always (when triton is installed); compiled on CUDA in
the ``gpu`` test when a device is present; compiled ahead of time for sm_90 without a GPU
in the ``slow`` test.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "triton_parity.py"

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install triton) — Triton kernels not tested")


def run_parity(device: str, *pytest_args: str) -> None:
    env = dict(os.environ, FASTDDPM_TRITON_DEVICE=device)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(PARITY), *pytest_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, f"Triton parity checks failed on {device} (exit {proc.returncode}):\n{output}"
    assert " passed" in proc.stdout, f"Triton parity checks ran nothing on {device}:\n{output}"


@needs_triton
def test_triton_kernels_match_reference_interpreted():
    """Every kernel under the Triton interpreter on the CPU (about half a minute on 2 cores)."""
    run_parity("cpu")


@pytest.mark.slow
@needs_triton
def test_triton_kernels_compile_for_cuda_without_a_gpu():
    """Every constexpr variant of every kernel compiled ahead of time to a sm_90 cubin (Triton's own
    compiler and ptxas, no GPU): what the interpreter accepts but the CUDA compiler would not.
    About two minutes on 2 cores the first time, seconds from Triton's cache."""
    run_parity("aot")


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_match_reference_compiled_on_cuda():
    run_parity("cuda")
