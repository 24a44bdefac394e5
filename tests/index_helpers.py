"""Helpers of the index tests: a controllable clock, generated data, a brute-force oracle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class FakeClock:
    """A clock the test moves by hand: Index(clock=FakeClock()) reads time only from it."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds



def clustered(n: int, dim: int, *, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Gaussian clusters in a low-dimensional subspace, on the unit sphere: like real
    embeddings, whose intrinsic dimension is far below their width."""
    rng = np.random.default_rng(seed)
    latent = min(dim, 12)
    basis = np.random.default_rng(12345).standard_normal((latent, dim)).astype(np.float32)
    centers = np.random.default_rng(54321).standard_normal((clusters, latent)).astype(np.float32)
    z = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, latent)).astype(
        np.float32
    )
    x = z @ basis + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rare_topic(n: int, half: int = 499):
    """A rare topic among many rows (real all-MiniLM-L6-v2 vectors, unit length): the
    first ``n`` sgd requests, then the first ``half`` paraphrase questions (rows ``n`` to
    ``n + half - 1``). Returns ``(rows, order, asked, findable)``: an insertion order that
    spreads the questions through the build, each question's paraphrase, and where brute
    force answers that paraphrase with its own question at the cache's threshold (0.85)."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    base = unit(np.load(SHARED / "sgd" / "base_f16.npy", mmap_mode="r")[:n])
    questions = unit(np.load(SHARED / "paraphrases" / "q.npy")[:half])
    asked = unit(np.load(SHARED / "paraphrases" / "paraphrase.npy")[:half])
    rows = np.concatenate([base, questions])
    order = np.random.default_rng(0).permutation(len(rows))
    exact = asked @ rows.T
    findable = (exact.max(axis=1) >= 0.85) & (exact.argmax(axis=1) == n + np.arange(half))
    return rows, order, asked, findable


def brute_force(base: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine"):
    """Exact k nearest rows of base (indices, distances) under the index's distance."""
    if metric == "l2":
        d = (
            (queries**2).sum(1)[:, None]
            - 2 * queries.astype(np.float64) @ base.T.astype(np.float64)
            + (base**2).sum(1)[None, :]
        )
    elif metric == "cosine":
        bn = base / np.linalg.norm(base, axis=1, keepdims=True)
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        d = 1.0 - qn.astype(np.float64) @ bn.T.astype(np.float64)
    else:
        d = 1.0 - queries.astype(np.float64) @ base.T.astype(np.float64)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run ``code`` in a fresh interpreter (exits, forks, aborts stay out of the test
    process); fails the test on a non-zero exit, with the status and stderr."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout)
    assert out.returncode == 0, (out.returncode, out.stderr.decode(errors="replace"))
    return out
