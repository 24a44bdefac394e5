"""A tiny deterministic embedder for the CLI tests (no model, no torch).

It knows the demo's question bank: every text of one intent lands near that intent's centre,
and a hard-negative intent's centre lies close to its partner's (so look-alike questions can
score above the threshold, as they do with a real model). Case and spacing are ignored (like
the exact tier); unknown texts get a random direction from a hash of their words.
Used through the documented hook ``HNSWCACHE_DEMO_EMBEDDER=hc_cli_fake_embedder:make``.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hnswcache.demo import load_questions
from hnswcache.store.base import normalize_prompt

DIM = 32


def _rand(key: str, scale: float = 1.0) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return scale * np.random.default_rng(seed).standard_normal(DIM)


class IntentEmbedder:
    name = "fake-intent-embedder"
    dim = DIM

    def __init__(self) -> None:
        qs = load_questions()
        centre: dict[str, np.ndarray] = {}
        for q in qs:  # partners after their originals: the bank lists originals first
            c = _rand("intent:" + q.intent)
            if q.negative_of and q.negative_of in centre:
                c = centre[q.negative_of] + 0.6 * c / np.linalg.norm(c) * np.linalg.norm(
                    centre[q.negative_of])
            centre.setdefault(q.intent, c)
        self.vec: dict[str, np.ndarray] = {}
        for q in qs:
            c = centre[q.intent] / np.linalg.norm(centre[q.intent])
            v = c + 0.35 * _rand("text:" + q.text) / np.sqrt(DIM)
            self.vec[normalize_prompt(q.text)] = v / np.linalg.norm(v)
        self.calls = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = []
        for t in texts:
            v = self.vec.get(normalize_prompt(t))
            if v is None:
                v = _rand("unknown:" + normalize_prompt(t))
                v = v / np.linalg.norm(v)
            out.append(v)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), DIM)


def make() -> IntentEmbedder:
    return IntentEmbedder()
