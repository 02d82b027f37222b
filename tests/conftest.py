"""Shared fixtures: the real annotated data in ../shared/data (skipped with a reason where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """The shared real-data folder: $FSDIFF_SHARED_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("FSDIFF_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips the test where the folder is missing (a user's machine)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data folder ../shared/data is absent (set FSDIFF_SHARED_DATA to run these tests)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny tensors: one intra-op thread avoids thread contention that makes them far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
