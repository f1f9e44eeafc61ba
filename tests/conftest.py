import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder beside the repo (../shared); env IPDFER_SHARED overrides."""
    default = Path(__file__).resolve().parents[1].parent / "shared"
    return Path(os.environ.get("IPDFER_SHARED", default))
