"""Small file helpers every part of the project uses: content hashes and atomic
writes (a reader never sees half a file, an interrupted run never leaves one)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_sha256(path: str | Path, expected: str, fix: str = "") -> None:
    """Raise ValueError unless the file's sha256 is `expected` (`fix`: what to do then)."""
    digest = sha256_file(path)
    if digest != expected:
        raise ValueError(f"{path} sha256 {digest[:12]}… does not match the manifest's {expected[:12]}…{fix}")


def atomic_write(path: str | Path, write: Callable[[Path], object], suffix: str | None = None) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over
    `path`. `suffix` keeps the extension writers such as np.save/np.savez insist on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{suffix if suffix is not None else path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
