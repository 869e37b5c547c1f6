"""Running a check script under Triton's CPU interpreter, for the Triton kernel tests."""

import os
import subprocess
import sys

import pytest


def run_under_interpreter(script: str) -> None:
    """Run `script` in a fresh process with TRITON_INTERPRET=1; it must print 'interpreter ok'."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    if "only 0-dimensional arrays can be converted" in result.stderr:
        pytest.skip("this Triton's interpreter does not run with this NumPy (it needs NumPy < 2.3)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interpreter ok" in result.stdout
