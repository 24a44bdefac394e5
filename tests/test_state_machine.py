"""Random sequences of add / delete / touch / advance the clock / consolidate / search, checked
step by step against a brute-force oracle over the live set."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hnswcache import Index
from index_helpers import FakeClock

DIM = 6
LABELS = st.integers(min_value=0, max_value=60)


class IndexVersusOracle(RuleBasedStateMachine):
    @initialize(metric=st.sampled_from(["cosine", "l2", "ip"]), M=st.integers(2, 8))
    def start(self, metric: str, M: int) -> None:
        self.clock = FakeClock()
        self.idx = Index(DIM, metric=metric, M=M, ef_construction=32, clock=self.clock,
                         auto_consolidate=None)
        self.metric = metric
        self.vectors: dict[int, np.ndarray] = {}
        self.expiry: dict[int, float] = {}  # ns, or inf for never
        self.rng = np.random.default_rng(0)

    # Expiry is kept at nanosecond resolution, as the index documents it: an entry is live
    # while its expiry (ns) is after now (ns); a positive ttl lasts at least 1 ns.
    def now_ns(self) -> int:
        return int(round(self.clock.t * 1e9))

    def expiry_ns(self, ttl: float) -> int:
        delta = int(np.rint(ttl * 1e9))
        return self.now_ns() + (max(delta, 1) if ttl > 0 else delta)

    def live(self) -> list[int]:
        return sorted(k for k, e in self.expiry.items() if e > self.now_ns())

    def distance(self, q: np.ndarray, v: np.ndarray) -> float:
        if self.metric == "l2":
            return float(((q.astype(np.float64) - v) ** 2).sum())
        if self.metric == "cosine":
            q = q / np.linalg.norm(q)
            v = v / np.linalg.norm(v)
        return 1.0 - float(q.astype(np.float64) @ v)

    @rule(labels=st.lists(LABELS, min_size=1, max_size=8, unique=True),
          ttl=st.one_of(st.none(), st.floats(0.5, 20)))
    def add(self, labels: list[int], ttl: float | None) -> None:
        x = self.rng.standard_normal((len(labels), DIM)).astype(np.float32)
        self.idx.add(x, labels, ttl=ttl)
        for lab, v in zip(labels, x):
            self.vectors[lab] = v
            self.expiry[lab] = np.inf if ttl is None else self.expiry_ns(ttl)

    @rule(labels=st.lists(LABELS, min_size=1, max_size=5))
    def delete(self, labels: list[int]) -> None:
        removed = self.idx.delete(labels)
        mapped = {lab for lab in labels if lab in self.expiry}
        # (counted: the live ones; an expired one not yet consolidated goes too, uncounted)
        assert removed == sum(1 for lab in mapped if self.expiry[lab] > self.now_ns())
        for lab in mapped:
            del self.expiry[lab]

    @rule(labels=st.lists(LABELS, min_size=1, max_size=5, unique=True), ttl=st.floats(0, 20))
    def touch(self, labels: list[int], ttl: float) -> None:
        changed = self.idx.touch(labels, ttl=ttl)
        live = [lab for lab in labels if self.expiry.get(lab, -np.inf) > self.now_ns()]
        assert changed == len(live)
        for lab in live:
            self.expiry[lab] = self.expiry_ns(ttl)

    @rule(seconds=st.floats(0, 10))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(seconds=st.floats(0, 10))
    def rewind(self, seconds: float) -> None:
        # A clock the caller sets back (a test clock, a wall clock stepped back): entries
        # that had expired are live again until consolidation frees them, and len() must
        # count them without a stale shortcut (it skips its scan while nothing mapped can
        # have expired).
        self.clock.advance(-seconds)

    @rule()
    def consolidate(self) -> None:
        self.idx.consolidate()
        # Dead entries are gone for good: a later touch cannot see them.
        for lab in [k for k, e in self.expiry.items() if e <= self.now_ns()]:
            del self.expiry[lab]
        check = self.idx.check_integrity()
        assert check["dead"] == 0 and check["unreachable_live"] == 0
        # With every live node reachable and ef covering the index, search is exact.
        live = self.live()
        if live:
            q = self.rng.standard_normal(DIM).astype(np.float32)
            labels, dists = self.idx.search(q, k=len(live), ef=64)
            want = sorted(self.distance(q, self.vectors[lab]) for lab in live)
            np.testing.assert_allclose(dists[0], want, rtol=1e-4, atol=1e-5)
            assert sorted(labels[0].tolist()) == live

    @rule(k=st.integers(1, 12))
    def search(self, k: int) -> None:
        q = self.rng.standard_normal(DIM).astype(np.float32)
        labels, dists = self.idx.search(q, k=k, ef=64)
        live = set(self.live())
        got = [lab for lab in labels[0].tolist() if lab != -1]
        assert set(got) <= live, "only live entries are returned"
        assert len(got) == min(k, len(live)), "padding only when fewer than k are live"
        for lab, d in zip(got, dists[0]):
            assert abs(self.distance(q, self.vectors[lab]) - d) <= 1e-4 + 1e-4 * abs(d)

    @invariant()
    def sizes_agree(self) -> None:
        if hasattr(self, "idx"):
            assert len(self.idx) == len(self.live())
            assert sorted(self.idx.labels().tolist()) == self.live()

    @precondition(lambda self: hasattr(self, "idx"))
    @rule()
    def round_trip(self) -> None:
        copy = Index.from_bytes(self.idx.to_bytes(), clock=self.clock, auto_consolidate=None)
        assert sorted(copy.labels().tolist()) == self.live()
        assert len(copy) == len(self.live())
        self.clock.advance(30)  # (past every ttl the rules give: all that has one expired)
        assert len(copy) == len(self.idx) == len(self.live())
        self.clock.advance(-30)


TestIndexVersusOracle = IndexVersusOracle.TestCase
TestIndexVersusOracle.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
