"""Helpers of the cache tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PARAPHRASES = ROOT.parent / "shared" / "data" / "paraphrases"
if os.environ.get("HNSWCACHE_TEST_GENERATED_DATA"):  # run as a fresh clone would
    PARAPHRASES = ROOT / "no-shared-data"


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


def child_env() -> dict[str, str]:
    """Environment for a child Python process that imports the same hnswcache."""
    import hnswcache

    env = dict(os.environ)
    pkg_parent = str(Path(hnswcache.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return env


def past_outage(*caches: Any) -> None:
    """Wait until the caches' stores call their server again: after a connection failure
    they fail at once for ``outage_cooldown`` seconds (1 s) instead of waiting for it."""
    time.sleep(max(getattr(c.store, "outage_left", 0.0) for c in caches))
