"""Fixtures of the index tests: a controllable clock and real data when present."""

from __future__ import annotations

import numpy as np
import pytest

from index_helpers import SHARED, FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def sgd():
    """(base, queries, gt) from ../shared/data/sgd, or None on a machine without it."""
    d = SHARED / "sgd"
    if not (d / "base_f16.npy").exists():
        return None
    return (
        np.load(d / "base_f16.npy").astype(np.float32),
        np.load(d / "queries.npy").astype(np.float32),
        np.load(d / "gt.npy"),
    )
