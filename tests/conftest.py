"""Fixtures of the index tests: a controllable clock and real data when present."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

from index_helpers import SHARED, FakeClock

# A cache made with no store and no data_dir keeps its embedded server's data under
# $HNSWCACHE_HOME (default ~/.cache/hnswcache): the tests' went to the user's own folder,
# where a later SemanticCache() met their 64-d test vectors and refused the real model.
_HOME = tempfile.mkdtemp(prefix="hnswcache-tests-home-")
os.environ["HNSWCACHE_HOME"] = _HOME
atexit.register(shutil.rmtree, _HOME, True)


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
