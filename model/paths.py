"""Where things live by default. Nothing here points outside the repository: the
data and cache folders come from the environment or the command line.

    IPDFER_DATA   folder holding the dataset folders (fer2013/, ckplus48/, muxspace/, ...);
                  `ipdfer prepare --data-root` and `ipdfer train --smoke --data-root` override it
    IPDFER_CACHE  root of everything cached: prepared faces (data/), runs (runs/);
                  default ~/.cache/ipdfer
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST_DIR = REPO / "model" / "manifests"   # committed dataset manifests
WEIGHTS_DIR = REPO / "weights"                  # the shipped weights


def cache_root() -> Path:
    """Root of everything this project caches (data, runs): env IPDFER_CACHE."""
    return Path(os.environ.get("IPDFER_CACHE", Path.home() / ".cache" / "ipdfer"))


def default_cache_dir() -> Path:
    return cache_root() / "data"


def data_root(explicit: str | Path | None = None) -> Path | None:
    """The datasets folder: `explicit`, else env IPDFER_DATA, else None (the caller
    says how to set it)."""
    value = explicit or os.environ.get("IPDFER_DATA")
    return Path(value).expanduser() if value else None


def require_data_root(explicit: str | Path | None = None) -> Path:
    root = data_root(explicit)
    if root is None:
        raise FileNotFoundError("no data folder: pass --data-root DIR or set IPDFER_DATA "
                                "(the folder holding fer2013/, ckplus48/, muxspace/ ...)")
    return root
