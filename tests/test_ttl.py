"""Time inside the index: expiry, deletion, consolidation with repair, and persistence of time."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hnswcache import Index
from index_helpers import FakeClock, brute_force, clustered, recall, run_python


def live_oracle(x: np.ndarray, labels: np.ndarray, q: np.ndarray, k: int):
    """Exact k nearest labels among the given live rows."""
    idx, _ = brute_force(x, q, min(k, len(x)))
    return labels[idx]


def test_an_entry_is_returned_until_it_expires_and_never_after(clock):
    idx = Index(8, clock=clock, auto_consolidate=None)
    x = clustered(200, 8)
    idx.add(x[:100], np.arange(100))
    idx.add(x[100:], np.arange(100, 200), ttl=10)
    clock.advance(9.999)
    assert 150 in idx and len(idx) == 200
    labels, _ = idx.search(x[150], k=1)
    assert labels[0, 0] == 150
    clock.advance(0.001)  # expiry is exclusive: dead at exactly t = expires_at
    assert 150 not in idx and len(idx) == 100
    labels, _ = idx.search(x[100:], k=5)
    assert (labels < 100).all(), "no expired entry in any result, before any cleanup"
    with pytest.raises(KeyError):
        idx.get([150])
    # An explicit `now` wins over the clock: the past still sees the entry.
    labels, _ = idx.search(x[150], k=1, now=clock.t - 5)
    assert labels[0, 0] == 150


def test_expires_at_touch_and_delete(clock):
    idx = Index(4, metric="l2", clock=clock)
    idx.add(np.eye(4, dtype=np.float32), [1, 2, 3, 4], expires_at=clock.t + 5)
    np.testing.assert_allclose(idx.expiry([1]), [clock.t + 5])
    assert idx.touch([1, 99], ttl=100) == 1, "unknown labels are skipped"
    assert idx.touch([2], expires_at=clock.t + 1) == 1
    assert idx.touch([3]) == 1 and idx.expiry([3])[0] == np.inf, "no ttl means never"
    assert idx.delete([4, 4, 77]) == 1
    clock.advance(2)
    assert sorted(idx.labels()) == [1, 3]
    clock.advance(10)
    assert sorted(idx.labels()) == [1, 3]
    assert idx.touch([2], ttl=100) == 0, "an expired entry cannot be revived by touch"
    clock.advance(100)
    assert sorted(idx.labels()) == [3]


def test_search_returns_the_k_best_live_entries_among_many_dead(clock):
    x = clustered(3000, 32, seed=3)
    idx = Index(32, clock=clock, auto_consolidate=None)
    ttl = np.where(np.arange(3000) % 3 == 0, 1e9, 5.0)  # two thirds expire
    idx.add(x, np.arange(3000), ttl=ttl)
    clock.advance(6)
    live = np.arange(0, 3000, 3)
    q = clustered(100, 32, seed=4)
    found, _ = idx.search(q, k=10, ef=100)
    assert np.isin(found, live).all()
    assert recall(found, live_oracle(x[live], live, q, 10)) >= 0.95


def test_too_few_live_entries_fall_back_to_an_exact_scan(clock):
    x = clustered(2000, 16, seed=5)
    idx = Index(16, clock=clock, auto_consolidate=None)
    ttl = np.full(2000, 1.0)
    survivors = np.array([7, 500, 1999])
    ttl[survivors] = 1e6
    idx.add(x, np.arange(2000), ttl=ttl)
    clock.advance(2)
    labels, dists = idx.search(x[:5], k=10, ef=10)
    for row, d in zip(labels, dists):
        assert sorted(row[:3]) == sorted(survivors)
        assert (row[3:] == -1).all() and np.isinf(d[3:]).all()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_consolidate_removes_dead_slots_repairs_links_and_reuses_memory(clock, dtype):
    x = clustered(6000, 48, seed=6)
    idx = Index(48, clock=clock, auto_consolidate=None, dtype=dtype)
    idx.add(x[:4000], np.arange(4000), ttl=np.where(np.arange(4000) < 1000, 10.0, 1e9))
    idx.delete(np.arange(1000, 1200))
    clock.advance(11)
    report = idx.consolidate()
    assert report["removed"] == 1200 and report["repaired"] > 0 and report["distances"] > 0
    assert report["seconds"] >= 0
    check = idx.check_integrity()
    assert check["free"] == 1200 and check["allocated"] == 2800 and check["dead"] == 0
    assert check["unreachable_live"] == 0 and check["min_degree0"] >= 1
    high_water = check["allocated"] + check["free"]
    idx.add(x[4000:5200], np.arange(4000, 5200))
    check = idx.check_integrity()
    assert check["allocated"] + check["free"] == high_water, "freed slots were reused"
    live = np.r_[np.arange(1200, 4000), np.arange(4000, 5200)]
    q = clustered(100, 48, seed=7)
    found, _ = idx.search(q, k=10, ef=64)
    assert recall(found, live_oracle(x[live], live, q, 10)) >= 0.95


def test_auto_consolidation_keeps_slots_bounded(clock):
    x = clustered(5000, 16, seed=8)
    idx = Index(16, clock=clock, auto_consolidate=0.2)
    idx.add(x[:1000], np.arange(1000), ttl=1.0)
    for step in range(1, 5):
        clock.advance(2)  # the previous batch has expired
        batch = np.arange(1000 * step, 1000 * (step + 1))
        idx.add(x[batch], batch, ttl=1.0)
        s = idx.stats()
        assert s["live"] == 1000
        assert s["allocated"] + s["free"] <= 2 * 1000 + 64, "dead slots were recycled"
    idx.consolidate()
    assert idx.check_integrity()["unreachable_live"] == 0


def test_persistence_keeps_absolute_expiry(tmp_path, clock):
    idx = Index(8, clock=clock)
    x = clustered(300, 8, seed=9)
    idx.add(x[:200], np.arange(200), ttl=10)
    idx.add(x[200:], np.arange(200, 300))
    idx.save(tmp_path / "ttl.hnsw")
    later = FakeClock(clock.t + 20)
    loaded = Index.load(tmp_path / "ttl.hnsw", clock=later)
    assert len(loaded) == 100
    labels, _ = loaded.search(x[:50], k=5)
    assert (labels >= 200).all(), "an entry that expired while on disk is dead after load"
    earlier = Index.load(tmp_path / "ttl.hnsw", clock=FakeClock(clock.t + 5))
    assert len(earlier) == 300


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_churn_keeps_recall_reachability_and_memory(sgd, clock, dtype):
    """Cycles of 10% expiry + 10% insertion: recall stays within 0.01 of a fresh build on the
    same live set, no live node is unreachable, and slots stay bounded."""
    if sgd is not None:
        pool = sgd[0][:32_000]
        q = sgd[1][:200]
    else:
        pool = clustered(32_000, 64, seed=10)
        q = clustered(200, 64, seed=11)
    n, cycles, step, tau = 8_000, 30, 800, 0.10
    dim = pool.shape[1]
    idx = Index(dim, clock=clock, auto_consolidate=tau, seed=1, dtype=dtype)
    rng = np.random.default_rng(0)
    live = np.arange(n)
    idx.add(pool[live], live)
    nxt = n
    for _ in range(cycles):
        gone = rng.choice(live, step, replace=False)
        idx.touch(gone, ttl=0.5)  # they expire in half a second
        clock.advance(1)
        live = np.setdiff1d(live, gone)
        new = np.arange(nxt, nxt + step)
        nxt += step
        idx.add(pool[new], new)
        live = np.r_[live, new]
        s = idx.stats()
        assert s["allocated"] + s["free"] <= n * (1 + tau) + step + 64
        found, _ = idx.search(q, k=10, ef=48)
        assert not np.isin(found, np.setdiff1d(np.arange(nxt), live)).any()
    idx.consolidate()
    check = idx.check_integrity()
    assert check["unreachable_live"] == 0 and check["live"] == n
    truth = live_oracle(pool[live], live, q, 10)
    found, _ = idx.search(q, k=10, ef=48)
    fresh = Index(dim, seed=1, dtype=dtype)
    fresh.add(pool[live], live)
    fresh_found, _ = fresh.search(q, k=10, ef=48)
    assert recall(found, truth) >= recall(fresh_found, truth) - 0.01


def test_searches_inserts_deletes_and_consolidation_at_once_never_return_the_dead():
    clock = FakeClock()
    x = clustered(12_000, 32, seed=12)
    idx = Index(32, clock=clock, auto_consolidate=None)
    idx.add(x[:6000], np.arange(6000))
    dead: set[int] = set()
    dead_lock = threading.Lock()
    errors: list[BaseException] = []
    stop = threading.Event()

    def deleter() -> None:
        try:
            for lab in range(0, 3000, 30):
                batch = np.arange(lab, lab + 30)
                idx.delete(batch)
                with dead_lock:
                    dead.update(batch.tolist())
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def inserter() -> None:
        try:
            for s in range(6000, 12_000, 300):
                idx.add(x[s : s + 300], np.arange(s, s + 300))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def consolidator() -> None:
        try:
            while not stop.is_set():
                idx.consolidate()
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    def searcher(seed: int) -> None:
        try:
            r = np.random.default_rng(seed)
            while not stop.is_set():
                with dead_lock:
                    dead_before = np.fromiter(dead, dtype=np.int64)
                labels, _ = idx.search(x[r.integers(0, 6000, 8)], k=10)
                assert not np.isin(labels, dead_before).any(), "a deleted label was returned"
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    workers = [threading.Thread(target=deleter), threading.Thread(target=inserter)]
    background = [threading.Thread(target=consolidator)]
    background += [threading.Thread(target=searcher, args=(i,)) for i in range(2)]
    for t in workers + background:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in background:
        t.join()
    assert not errors, errors
    idx.consolidate()
    check = idx.check_integrity()
    assert check["live"] == 9000 and check["unreachable_live"] == 0
    assert not np.isin(idx.search(x[:3000:10], k=10)[0], np.arange(3000)).any()


def test_expiry_is_exact_to_the_nanosecond_on_a_wall_clock():
    # now is about 1.8e18 ns: the expiry must be added in integers, not in float64 (whose
    # spacing there is 256 ns).
    wall = 1_763_800_000.123456789
    idx = Index(3, clock=lambda: wall)
    idx.add(np.eye(3, dtype=np.float32), [1, 2, 3], ttl=[1e-6, 2.5e-7, 0.0])
    now_ns = int(round(wall * 1e9))
    exp = idx._native.expiry(np.array([1, 2], np.int64), now_ns - 1)
    assert list(exp - now_ns) == [1000, 250]
    # A positive ttl, however small, lasts at least 1 ns; ttl=0 expires on the spot.
    idx.touch([1], ttl=1e-12)
    assert 1 in idx and 3 not in idx


def test_a_touch_during_consolidation_is_never_reported_then_lost():
    # touch() could extend an entry that a running consolidate() had already found dead,
    # report it, and consolidate() freed it anyway (found by review, 2026-12-05).
    import threading

    t = [0.0]
    rng = np.random.default_rng(40)
    idx = Index(16, clock=lambda: t[0])
    idx.add(rng.standard_normal((20_000, 16)).astype(np.float32), np.arange(20_000),
            expires_at=100.0)
    idx.add(rng.standard_normal((20_000, 16)).astype(np.float32), np.arange(20_000, 40_000))
    t[0] = 99.9  # the touches' clock: the first 20,000 are live for them
    done = threading.Event()
    reported: list[int] = []

    def consolidate() -> None:
        try:
            idx.consolidate(now=100.5)  # a later clock: they are dead for it
        finally:
            done.set()

    th = threading.Thread(target=consolidate)
    th.start()
    lab = calls = 0
    while not done.is_set():
        calls += 1
        if idx.touch([lab], expires_at=10_000.0):
            reported.append(lab)
        lab = (lab + 1) % 20_000
    th.join()
    t[0] = 200.0
    assert calls > 10, "the touches did not overlap the consolidation"
    lost = [x for x in reported if x not in idx]
    assert not lost, f"{len(lost)} of {len(reported)} reported touches were freed"


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_mostly_dead_graph_is_answered_exactly_and_the_next_insert_consolidates(
        sgd, clock, dtype):
    """With nearly every entry expired and no consolidation yet (a quiet spell after the
    TTLs ran out), the level-0 walk passed through the whole graph looking for ef live
    nodes, then scanned every slot: 8-10 ms a query at 40k rows, 140x a normal one
    (`python bench/dead_search.py`). The walk now gives up after a budget and the exact scan
    of the live entries answers; the search also asks the next insert to check at once
    whether to consolidate, even one that reuses a free slot long before 1% more inserts."""
    pool = sgd[0][:12_000] if sgd is not None else clustered(12_000, 64, seed=20)
    q = sgd[1][:100] if sgd is not None else clustered(100, 64, seed=21)
    n = len(pool)
    idx = Index(pool.shape[1], clock=clock, auto_consolidate=0.1, dtype=dtype, seed=1)
    idx.add(pool[:n - 2], np.arange(n - 2))
    idx.delete([0])
    idx.consolidate()
    idx.add(pool[n - 2], [n - 2])  # (its check finds nothing dead and restarts the count)
    idx.delete([1])
    idx.consolidate()  # one free slot, for the insert below
    keep = np.arange(2, n - 1, 400)  # 30 stay live
    idx.touch(np.setdiff1d(np.arange(2, n - 1), keep), ttl=1.0)
    clock.advance(2)
    assert len(idx) == len(keep) and idx.stats()["dead"] == n - 3 - len(keep)
    exact = 1.0 if dtype == "float32" else 0.99  # (8-bit rows: near ties at rank k swap)
    found, _ = idx.search(q, k=10)
    assert recall(found, live_oracle(pool[keep], keep, q, 10)) >= exact
    allowed = keep[::3]
    found, _ = idx.search(q, k=5, filter=allowed)
    assert recall(found, live_oracle(pool[allowed], allowed, q, 5)) >= exact
    idx.add(pool[n - 1], [n - 1])  # takes the free slot: no growth, 1 insert since
    s = idx.stats()
    assert s["dead"] == 0 and s["live"] == len(keep) + 1, s
    live = np.r_[keep, n - 1]
    found, _ = idx.search(q, k=10)
    assert recall(found, live_oracle(pool[live], live, q, 10)) >= exact
    assert idx.check_integrity()["unreachable_live"] == 0


def test_expiry_is_the_first_instant_the_entry_is_dead_on_a_wall_clock():
    """expiry() gave the nearest float to the stored nanoseconds, which at today's times
    (float64 steps of 238 ns) is often below them: 1,012 of 2,000 entries were still live
    at now == expiry(label). (Not "live at the float before": at these times several floats
    make one nanosecond count.)"""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    clock = FakeClock(1_763_800_000.123456789)
    idx = Index(8, clock=clock, auto_consolidate=None)
    idx.add(x, np.arange(2000), ttl=rng.uniform(1, 100, 2000))
    idx.add(x[:1], [5000])  # no expiry
    ends = idx.expiry(np.arange(2000))
    assert idx.expiry([5000])[0] == np.inf
    def live_at(lab: int, t: float) -> bool:
        clock.t = t
        return lab in idx

    live_at_end = [lab for lab in range(2000) if live_at(lab, float(ends[lab]))]
    dead_before = [lab for lab in range(2000) if not live_at(lab, float(ends[lab]) - 1e-6)]
    assert live_at_end == [] and dead_before == []
    found, _ = idx.search(x[7], k=1, now=float(ends[7]))
    assert found[0, 0] != 7


def test_delete_and_touch_count_the_distinct_live_entries_they_changed(clock):
    """delete() counted an expired entry (1 before consolidation, 0 after, for the same
    call) and touch() a label given twice as two."""
    idx = Index(8, clock=clock, auto_consolidate=None)
    x = clustered(10, 8)
    idx.add(x, np.arange(10))
    idx.touch([1, 2], ttl=1.0)
    clock.advance(2)
    assert idx.touch([3, 3], ttl=50) == 1
    assert idx.delete([4, 4]) == 1
    assert idx.delete([1]) == 0 and 1 not in idx  # expired: removed, not counted
    idx.consolidate()
    assert idx.delete([2]) == 0
    assert idx.delete([5, 6, 99]) == 2 and len(idx) == 5


def test_inserts_go_on_while_consolidation_computes_its_repairs(sgd):
    """A pass holds inserts back only while it counts the dead and publishes its repairs;
    the links inserts make meanwhile survive the publication, and nothing links to a freed
    slot (until the eighth session of 2026-12-05 inserts waited for the whole pass)."""
    x = sgd[0][:24_000] if sgd is not None else clustered(24_000, 384, seed=40)
    n = 20_000
    idx = Index(x.shape[1], dtype="int8", auto_consolidate=None)
    idx.add(x[:n], np.arange(n))
    gone = np.random.default_rng(41).choice(n, n // 10, replace=False)
    idx.delete(gone)
    report: dict = {}
    t = threading.Thread(target=lambda: report.update(idx.consolidate(num_threads=1)))
    t.start()
    k = n
    while t.is_alive() and k < len(x):
        idx.add(x[k : k + 1], [k])
        k += 1
    t.join()
    during = k - n
    # (Before: the ~20 inserts made before the pass took its lock, then none.)
    assert during >= 200, f"only {during} inserts ran during the pass"
    assert report["removed"] == n // 10 and report["merged"] > 0
    assert report["inserts_blocked_seconds"] < 0.5 * report["seconds"]
    check = idx.check_integrity()
    assert check["unreachable_live"] == 0 and check["dead"] == 0
    live = np.setdiff1d(np.arange(k), gone)
    assert check["live"] == len(live) and len(idx) == len(live)
    # Every live entry, old or inserted during the pass, is found as its own nearest.
    q = np.concatenate([live[:: max(1, len(live) // 1500)], np.arange(n, k)])
    found, _ = idx.search(x[q], k=1, ef=64)
    assert (found[:, 0] == q).mean() >= 0.99
    assert not np.isin(idx.search(x[gone[:500]], k=10)[0], gone).any()
    # The new entries' slots came from the free list or the end: a later pass keeps them.
    idx.delete(np.arange(n, k))
    assert idx.consolidate()["removed"] == during
    assert idx.check_integrity()["unreachable_live"] == 0


def test_background_consolidation_runs_the_pass_outside_the_add(clock):
    """With background_consolidation the add that finds the dead share past the threshold
    hands the pass to a thread (the clock says which thread asked for the time), and the
    slots are reclaimed once it is done."""
    askers: set[str] = set()

    def timed() -> float:
        askers.add(threading.current_thread().name)
        return clock()

    x = clustered(6000, 16, seed=42)
    idx = Index(16, clock=timed, auto_consolidate=0.2, background_consolidation=True)
    assert idx.background_consolidation
    idx.add(x[:3000], np.arange(3000), ttl=1.0)
    clock.advance(2)  # all of them expired
    idx.add(x[3000:6000], np.arange(3000, 6000))  # grows past the free slots: counts the dead
    assert idx.wait_for_consolidation(timeout=60)
    assert "hnswcache-consolidate" in askers
    s = idx.stats()
    assert s["live"] == 3000 and s["dead"] == 0 and s["free"] == 3000
    assert idx.check_integrity()["unreachable_live"] == 0
    found, _ = idx.search(x[3000:6000:10], k=1)
    assert (found[:, 0] == np.arange(3000, 6000, 10)).mean() >= 0.99
    # Several indexes due at once (a cache's scopes) take turns: each pass still runs.
    many = [Index(16, clock=clock, auto_consolidate=0.2, background_consolidation=True)
            for _ in range(3)]
    for i in many:
        i.add(x[:2000], np.arange(2000), ttl=1.0)
    clock.advance(2)
    for i in many:
        i.add(x[2000:4000], np.arange(2000, 4000))
    for i in many:
        assert i.wait_for_consolidation(timeout=60)
        assert i.stats()["dead"] == 0 and len(i) == 2000
    off = Index(16, clock=clock, auto_consolidate=0.2)
    assert not off.background_consolidation
    with pytest.raises(TypeError):
        off.background_consolidation = 1  # type: ignore[assignment]


def test_a_fork_during_a_background_pass_leaves_the_child_an_index_it_can_write():
    """The fork waits for a background pass under way: the child does not inherit native
    locks held by a thread it does not have (its first insert or pass would wait for ever)."""
    code = (
        "import os, sys, numpy as np, hnswcache\n"
        "t = [0.0]\n"
        "x = np.random.default_rng(0).standard_normal((30000, 32)).astype(np.float32)\n"
        "i = hnswcache.Index(32, clock=lambda: t[0], auto_consolidate=0.1,\n"
        "                    background_consolidation=True)\n"
        "i.add(x[:20000], np.arange(20000), ttl=1.0)\n"
        "t[0] = 2.0\n"
        "i.add(x[20000:30000], np.arange(20000, 30000))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    i.add(x[:100], np.arange(100))\n"
        "    i.consolidate()\n"
        "    ok = len(i) == 10100 and i.check_integrity()['unreachable_live'] == 0\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    run_python(code, timeout=300)


def test_a_fork_waits_for_a_pass_or_save_under_way_in_another_thread():
    """A fork while another thread is inside an explicit consolidate() (or a save, or a
    background pass that starts while the fork waits for another) would leave the child
    native locks held by a thread it does not have: its next pass waited for ever."""
    code = (
        "import os, signal, sys, threading, time, numpy as np, hnswcache\n"
        "t = [0.0]\n"
        "x = np.random.default_rng(0).standard_normal((60000, 32)).astype(np.float32)\n"
        "def make():\n"
        "    i = hnswcache.Index(32, clock=lambda: t[0], auto_consolidate=None)\n"
        "    i.add(x[:30000], np.arange(30000), ttl=np.where(np.arange(30000) % 5, 1e9, 1.0))\n"
        "    return i\n"
        "a, b = make(), make()\n"
        "t[0] = 2.0\n"
        "th = threading.Thread(target=a.consolidate); th.start()\n"
        "time.sleep(0.05)  # a's pass is under way\n"
        "saver = threading.Thread(target=lambda: (time.sleep(0.02), b.to_bytes()))\n"
        "saver.start()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(30)  # (a hang ends the child with SIGALRM)\n"
        "    a.add(x[30000:30100], np.arange(30000, 30100))\n"
        "    a.consolidate(); b.consolidate(); b.to_bytes()\n"
        "    os._exit(0 if len(a) == 24100 and len(b) == 24000 else 3)\n"
        "th.join(); saver.join()\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    run_python(code, timeout=300)


def test_a_fork_while_other_threads_search_delete_and_touch_leaves_the_child_working():
    """Searches, deletes and touches hold the index's locks too: a fork while another
    thread was inside one left the child's next pass or save waiting for ever (19 forks in
    20 under a searching thread). Every call into the core now passes a gate a fork waits
    on; the parent's threads go on after it."""
    code = (
        "import os, signal, sys, threading, numpy as np, hnswcache\n"
        "x = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)\n"
        "i = hnswcache.Index(64)\n"
        "i.add(x, np.arange(20000))\n"
        "stop = False\n"
        "def searcher():\n"
        "    while not stop:\n"
        "        i.search(x[:64], k=10)\n"
        "def toucher():\n"
        "    k = 0\n"
        "    while not stop:\n"
        "        i.touch([k % 20000], ttl=1e6); i.delete([20000 + k % 50]); k += 1\n"
        "ths = [threading.Thread(target=f) for f in (searcher, searcher, toucher)]\n"
        "for th in ths: th.start()\n"
        "for n in range(10):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        signal.alarm(20)  # (a hang ends the child with SIGALRM)\n"
        "        i.add(x[:1] + 0.01, [100000 + n]); i.delete([7 + n])\n"
        "        i.consolidate(); i.to_bytes()\n"
        "        os._exit(0 if len(i) == 20000 else 3)\n"
        "    _, status = os.waitpid(pid, 0)\n"
        "    if os.waitstatus_to_exitcode(status) != 0:\n"
        "        stop = True; sys.exit(f'child {n}: {os.waitstatus_to_exitcode(status)}')\n"
        "stop = True\n"
        "for th in ths: th.join()\n"
        "assert len(i) == 20000 and i.search(x[5], k=1)[0][0] == 5\n"
    )
    run_python(code, timeout=300)
