"""Run Python code in a fresh interpreter that imports the installed lenvm_rt.

The child runs in the system temp directory: with `python -c`, the working directory comes first on
sys.path, and from the repository root it would shadow the installed package (which carries the
compiled `_core`) with the source folder (which does not).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile


def run_python(code: str, *, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir(), env=env)
