"""The fused Triton decode kernels (q8_0, q4_0, q4_1, plain rows, rotq) run in CI without a GPU, under Triton's
CPU interpreter: bit for bit the torch reference and the host reader (tests/adapters/kernels_interpreted.py).
A subprocess, because TRITON_INTERPRET is read when the kernels are defined."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")


def test_fused_kernels_equal_the_reference_under_the_interpreter():
    script = Path(__file__).with_name("kernels_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "145 decodes, 0 mismatches", "\n".join(lines[-20:])
