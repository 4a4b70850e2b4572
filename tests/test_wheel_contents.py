"""The wheel ships `lenvm_rt` with the compiled core, its stub and the kernels as `lenvm_rt.kernels`.

Builds offline with the running interpreter's scikit-build-core and pybind11 (no build isolation), into a
fresh build directory under tmp_path so the repository's build/ is left alone.
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(ROOT),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path / "dist"),
        f"--config-settings=build-dir={tmp_path / 'build'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr

    (wheel,) = (tmp_path / "dist").glob("lenvm_rt-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "lenvm_rt/kernels/__init__.py" in names
    assert "lenvm_rt/_core.pyi" in names
    for name in ("value_head.safetensors", "lenvm_config.json", "manifest.json"):  # the default model's head
        assert f"lenvm_rt/default_head/{name}" in names
    assert fnmatch.filter(names, "lenvm_rt/_core*.so")
    assert not [n for n in names if n.startswith("kernels/")]
