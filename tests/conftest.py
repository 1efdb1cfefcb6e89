"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def raw_data_dir() -> Path:
    """Raw data folder: ``$S2M_RAW_DATA``, else ``../shared/data`` beside the repository."""
    candidates = []
    if os.environ.get("S2M_RAW_DATA"):
        candidates.append(Path(os.environ["S2M_RAW_DATA"]))
    fallback = REPOSITORY_ROOT.parent / "shared" / "data"
    candidates.append(fallback)

    for candidate in candidates:
        if candidate.is_dir():
            return candidate

    pytest.fail(
        f"raw data folder not found: S2M_RAW_DATA is {os.environ.get('S2M_RAW_DATA')!r} and "
        f"the fallback {fallback} does not exist. Set S2M_RAW_DATA to the folder that "
        "contains mobilenet_v2/."
    )
