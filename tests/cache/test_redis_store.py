"""The Redis store against hostile data, refusals and races, on a real valkey-server.

Each test failed on the store before the fix it covers (a review of 2026-12-05 found them);
writes timed into a race window are real writes by a second cache, never mocks.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import redis

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder
from hnswcache.store.base import MAX_TTL, Refresh, format_id
from hnswcache.store.redis import RedisStore, _refuses_pexpire_gt, keys_for
from hnswcache.store.server import EmbeddedServer

from .cache_helpers import FakeClock, child_env


def _entry(r: redis.Redis, ns: str, key: str) -> dict[bytes, bytes]:
    return r.hgetall(keys_for(ns)["entry"] + key)  # type: ignore[return-value]


def test_hostile_entries_are_skipped_by_lookups_warm_start_and_clear(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    k = keys_for(ns)
    writer = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    good = writer.set("what is the capital of france", "Paris")
    hostile = {
        "deep metadata": {b"metadata": b"[" * 100_000},
        "deep scope": {b"scope_json": b"{\"a\":" * 50_000},
        "ageless": {b"created": b"inf"},
        "from before time": {b"created": b"-inf"},
        "expires before written": {b"expires": repr(time.time() - 10).encode()},
        "expires past the longest ttl": {b"expires": repr(time.time() + 2 * MAX_TTL).encode()},
    }
    for prompt, changes in hostile.items():
        key = writer.set(prompt, "must never be served")
        fields = _entry(r, ns, key)
        fields.update(changes)
        r.hset(k["entry"] + key, mapping=fields)  # type: ignore[arg-type]
    r.hset(k["entry"].encode() + b"\xff\xfe", mapping={b"x": b"y"})  # a non-ASCII key name

    reader = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    hit = reader.get("what is the capital of france")  # warm start scans every key
    assert hit is not None and hit.response == "Paris" and hit.key == good
    for prompt in hostile:
        assert reader.get(prompt) is None, prompt
    assert reader.stats()["invalid_entries"] >= len(hostile) + 1
    assert len(reader) == 1

    async def async_reader() -> Any:
        c = AsyncSemanticCache(HashEmbedder(32), store=url, namespace=ns)
        try:
            return await c.get("what is the capital of france"), await c.get("ageless")
        finally:
            await c.close()

    found, ageless = asyncio.run(async_reader())
    assert found is not None and found.response == "Paris" and ageless is None
    assert writer.clear() >= 1 + len(hostile)  # the bad key name does not stop it
    assert not r.exists(k["entry"] + good)


def test_a_ttl_no_server_can_hold_is_refused_before_anything_is_written(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    # PEXPIRE of ~1e16 s overflows the server's milliseconds: inside MULTI the rest of the
    # write committed, leaving an entry with no expiry while set() reported it dropped.
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    with pytest.raises(ValueError, match="at most"):
        SemanticCache(HashEmbedder(32), store=url, namespace=ns, ttl=1e16)
    cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    with pytest.raises(ValueError, match="at most"):
        cache.set("forever and more", "x", ttl=1e16)
    assert not r.keys(keys_for(ns)["prefix"] + "*")
    key = cache.set("a century", "x", ttl=MAX_TTL)
    assert r.pttl(keys_for(ns)["entry"] + key) > 0
    assert cache.set("no expiry", "x", ttl=float("inf")) is not None
    assert cache.stats()["store_errors"] == 0


def test_a_bad_dimension_in_the_meta_key_is_ignored(valkey_server: EmbeddedServer,
                                                     ns: str) -> None:
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    for bad in (b"-1", b"0", b"99999999", b"abc"):
        r.hset(keys_for(ns)["meta"], "dim", bad)
        cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
        cache.set(f"question {bad!r}", "answer")  # raised ValueError for -1 and 0, for good
        assert cache.get(f"question {bad!r}") is not None


def _expired_entries(url: str, ns: str, clock: FakeClock, n: int) -> RedisStore:
    store = RedisStore.from_url(url, namespace=ns)
    cache = SemanticCache(HashEmbedder(8), store=store, namespace=ns, clock=clock)
    for s in range(0, n, 2000):
        cache.set_many([(f"q{i}", "a") for i in range(s, min(n, s + 2000))], ttl=3600)
    clock.advance(7200)  # expired on the cache's clock; the server still holds the keys
    return store


def test_every_expired_id_leaves_the_bookkeeping_past_one_batch(
    valkey_server: EmbeddedServer, ns: str, clock: FakeClock
) -> None:
    # The ids were read 10,000 at a time but removed from `exp` all at once, so ids past
    # the first 10,000 stayed in `lru` for good and counted toward max_entries.
    store = _expired_entries(valkey_server.url, ns, clock, 10_500)
    r = redis.Redis.from_url(valkey_server.url)
    evicted, gone = store.evict(None, clock())
    assert (evicted, gone) == ([], 10_500)
    assert r.zcard(keys_for(ns)["lru"]) == 0 and r.zcard(keys_for(ns)["exp"]) == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_expired_bookkeeping_that_names_no_entry_is_dropped_not_looped_on(
    valkey_server: EmbeddedServer, ns: str, clock: FakeClock, kind: str
) -> None:
    """From a review: one member of `exp` naming no entry (a stray ZADD), with nothing
    else expired, left the transaction pipeline unwatched: its read answered with the
    pipeline itself, whose iteration queued GETs for ever (a write over max_entries hung,
    1.4 GB; the async store raised TypeError to a cache that is not strict)."""
    url, k = valkey_server.url, keys_for(ns)
    r = redis.Redis.from_url(url)

    def run(fn: Any) -> None:
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        t.join(20)
        assert not t.is_alive(), "the write hung"

    if kind == "sync":
        cache = SemanticCache(HashEmbedder(64), store=url, namespace=ns, clock=clock,
                              max_entries=2)
        cache.set("one", "1")
        cache.set("two", "2")
        r.zadd(k["exp"], {"garbage!": 5})
        clock.advance(1)
        run(lambda: cache.set("three", "3"))
        assert cache.get("three") is not None and cache.stats()["store_errors"] == 0
        cache.close()
    else:
        async def main() -> None:
            cache = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns,
                                       clock=clock, max_entries=2)
            await cache.set("one", "1")
            await cache.set("two", "2")
            r.zadd(k["exp"], {"garbage!": 5})
            clock.advance(1)
            await asyncio.wait_for(cache.set("three", "3"), 20)
            assert await cache.get("three") is not None
            assert cache.stats()["store_errors"] == 0
            await cache.close()

        run(lambda: asyncio.run(main()))
    assert r.zscore(k["exp"], "garbage!") is None and r.zscore(k["lru"], "garbage!") is None
    assert r.zcard(k["lru"]) == 2


def test_an_eviction_keeps_a_newer_write_another_thread_read_meanwhile(
    valkey_server: EmbeddedServer, ns: str, clock: FakeClock
) -> None:
    """From a review: between the store's eviction and its local apply, another thread of
    the evicting process read the log: a newer write of the victim by another process. The
    local apply removed it all the same, for good (its semantic tier never answered it
    again). Evictions are now applied as own deletes, ahead of the log, skipped past it."""
    url = valkey_server.url
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((4, 64)).astype(np.float32)
    b = SemanticCache(HashEmbedder(64), store=url, namespace=ns, clock=clock)
    hooked: list[Any] = []

    class Meanwhile(RedisStore):
        def evict(self, max_entries: Any, now: float, *logged: Any) -> Any:
            out = super().evict(max_entries, now, *logged)
            if not hooked:  # the victim written again by b; a's other thread reads the log
                hooked.append(out)
                clock.advance(0.1)
                b.set("prompt 0", "v0-new", embedding=vecs[0])
                a.sync()
            return out

    a = SemanticCache(HashEmbedder(64), store=Meanwhile(redis.Redis.from_url(url), namespace=ns),
                      namespace=ns,
                      clock=clock, max_entries=3)
    for i in range(3):
        clock.advance(1)
        a.set(f"prompt {i}", f"v{i}", embedding=vecs[i])
    clock.advance(1)
    a.set("prompt 3", "v3", embedding=vecs[3])  # over the cap: prompt 0 is evicted
    assert hooked and len(hooked[0][0]) == 1
    for c in (a, b):
        c.sync()
        hit = c.get("a paraphrase", embedding=vecs[0])
        assert hit is not None and hit.response == "v0-new"
    stored = len(list(redis.Redis.from_url(url).scan_iter(f"hc:{{{ns}}}:e:*")))
    assert len(a) == len(b) == stored == 4  # (b, with no max_entries, went over a's cap)
    a.close()
    b.close()


class _Timed(RedisStore):
    """Runs ``hook`` once at a chosen step of forgetting expired ids (``"before watch"``,
    ``"after watch"``) or of an LRU eviction (``"chosen"``, ``"watched"``)."""

    hook: Any = None
    at = ""

    def _fire(self, step: str) -> None:
        if self.at == step and self.hook is not None:
            hook, self.hook = self.hook, None
            hook()

    def expired_keys(self, members: Any) -> list[str]:
        self._fire("before watch")
        return super().expired_keys(members)

    def expired_to_drop(self, first: Any, second: Any) -> list[Any]:
        self._fire("after watch")
        return super().expired_to_drop(first, second)

    def victim_keys(self, members: Any) -> list[str]:
        self._fire("chosen")
        return super().victim_keys(members)

    def still_oldest(self, first: Any, again: Any) -> bool:
        self._fire("watched")
        return super().still_oldest(first, again)


@pytest.mark.parametrize("at", ["before watch", "after watch"])
def test_an_entry_written_again_while_expired_ids_are_forgotten_keeps_its_lru_place(
    valkey_server: EmbeddedServer, ns: str, at: str
) -> None:
    # The ids were removed from `lru` by a command apart from their read: a write of the
    # same prompt in between lost its LRU score, so max_entries could never evict it.
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    store = _Timed(redis.Redis.from_url(url), namespace=ns)
    cache = SemanticCache(HashEmbedder(32), store=store, namespace=ns)
    other = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    key = cache.set("popular question", "v1", ttl=0.2)
    time.sleep(0.3)
    store.at = at
    store.hook = lambda: other.set("popular question", "v2, no ttl")
    store.evict(None, time.time())
    assert store.hook is None  # the write happened in the window
    assert r.zscore(keys_for(ns)["lru"], key) is not None
    for i in range(3):
        cache.set(f"other {i}", "x")
    store.evict(1, time.time())
    assert len(list(r.scan_iter(keys_for(ns)["entry"] + "*"))) == 1


@pytest.mark.parametrize("at", ["chosen", "watched"])
@pytest.mark.parametrize("meanwhile", ["rewrite", "another eviction"])
def test_an_eviction_racing_a_rewrite_or_another_eviction_deletes_only_the_oldest(
    valkey_server: EmbeddedServer, ns: str, at: str, meanwhile: str
) -> None:
    # ZPOPMIN took the oldest ids in one command and deleted them in another: an entry
    # written again in between (acknowledged, the newest in the LRU order) was deleted all
    # the same, and two processes evicting at once each popped their own share.
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    k = keys_for(ns)
    store = _Timed(redis.Redis.from_url(url), namespace=ns)
    cache = SemanticCache(HashEmbedder(32), store=store, namespace=ns)
    other = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    old = cache.set("the oldest question", "v1")
    time.sleep(0.01)
    second = cache.set("the second question", "x")
    time.sleep(0.01)
    newest = cache.set("the newest question", "y")
    store.at = at
    if meanwhile == "rewrite":
        store.hook = lambda: other.set("the oldest question", "v2")
    else:
        store.hook = lambda: RedisStore.from_url(url, namespace=ns).evict(2, time.time())
    evicted, _ = store.evict(2, time.time())
    assert store.hook is None  # it ran in the window
    left = {key.decode()[len(k["entry"]):] for key in r.scan_iter(k["entry"] + "*")}
    if meanwhile == "rewrite":
        # The rewritten entry is the newest now: the second one goes instead.
        assert [f"{i:016x}" for i in evicted] == [second]
        assert left == {old, newest}
        assert _entry(r, ns, old)[b"response"] == b"v2"
    else:
        assert evicted == []  # the other process evicted the oldest one already
        assert left == {second, newest}
    assert r.zcard(k["lru"]) == 2


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("which", ["lru", "exp", "log", "meta"])
def test_a_foreign_value_at_an_own_key_is_moved_aside_and_the_cache_goes_on(
    valkey_server: EmbeddedServer, ns: str, which: str, kind: str
) -> None:
    # A value of another type at `lru`, `exp`, `log` or `meta` (a stray SET into the
    # namespace) made every write fail with WRONGTYPE, counted, until someone removed it.
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    k = keys_for(ns)
    old = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    before = [old.set(f"question {i}", f"answer {i}", ttl=3600) for i in range(5)]
    r.delete(k[which])
    r.set(k[which], "not ours")

    async def run() -> tuple[str, dict[str, Any]]:
        cache = AsyncSemanticCache(HashEmbedder(32), store=url, namespace=ns,
                                   max_entries=5, strict=True)
        key = await cache.set("a new question", "a new answer", ttl=3600)
        assert (await cache.get("question 4")) is not None
        stats = cache.stats()
        await cache.close()
        return key, stats

    if kind == "async":
        key, stats = asyncio.run(run())
    else:
        cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns, max_entries=5,
                              strict=True)
        key = cache.set("a new question", "a new answer", ttl=3600)
        assert cache.get("question 4") is not None
        stats = cache.stats()
    assert stats["store_errors"] == 0
    aside = list(r.scan_iter(k[which] + ":foreign:*"))
    assert len(aside) == 1 and r.get(aside[0]) == b"not ours"
    assert r.type(k[which]) == {"lru": b"zset", "exp": b"zset", "log": b"stream",
                                "meta": b"hash"}[which]
    # The sorted sets were rebuilt from the entries: the cap still counts the old ones,
    # and the least recently written went.
    left = {key_.decode()[len(k["entry"]):] for key_ in r.scan_iter(k["entry"] + "*")}
    assert left == set(before[1:]) | {key}
    assert r.zcard(k["lru"]) == 5 and r.zcard(k["exp"]) == 5
    # Another process sees the new entry (through the log, or the store).
    other = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    hit = other.get("a new question")
    assert hit is not None and hit.response == "a new answer"
    assert old.get("a new question") is not None


def test_repairs_never_lose_a_foreign_value_nor_move_our_own(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    # Review of the repair (2026-12-05): TYPE and RENAME were two steps and RENAME
    # overwrote `<key>:foreign`. A second process, repairing on a stale TYPE reply, moved
    # the first one's rebuilt LRU over the stray value (lost), and a second incident
    # overwrote the first one's value.
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    k = keys_for(ns)
    writer = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    for i in range(3):
        writer.set(f"question {i}", f"answer {i}")
    a = RedisStore.from_url(url, namespace=ns)
    b = RedisStore.from_url(url, namespace=ns)
    for incident in (b"first stray value", b"second stray value"):
        r.delete(k["lru"])
        r.set(k["lru"], incident)
        a._types_checked = b._types_checked = float("-inf")  # (due again: a new incident)
        assert a._repair_types()  # moves it aside and rebuilds the LRU
        # b read TYPE before a's repair (a stale "string"): its move re-checks under WATCH
        # and leaves the rebuilt LRU where it is.
        assert not b._move_aside(k["lru"], b"zset")
        assert not b._repair_types()  # nothing foreign any more
        assert r.type(k["lru"]) == b"zset" and r.zcard(k["lru"]) == 3
    kept = sorted(r.get(x) for x in r.scan_iter(k["lru"] + ":foreign:*"))
    assert kept == [b"first stray value", b"second stray value"]


def test_a_delete_and_a_clear_sent_again_after_a_repair_count_what_they_deleted(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    # MULTI/EXEC runs the commands that are not refused: the first attempt's DELs ran, and
    # the attempt sent after the repair counted 0 of them (delete() said False).
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    k = keys_for(ns)
    cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    key = cache.set("to be deleted", "x")
    for i in range(4):
        cache.set(f"question {i}", f"answer {i}")
    r.delete(k["exp"])
    r.set(k["exp"], "not ours")
    assert cache.delete(key) is True
    cache.store._types_checked = float("-inf")  # type: ignore[attr-defined]
    r.delete(k["log"])
    r.set(k["log"], "not ours either")
    assert cache.clear() == 4
    assert cache.stats()["store_errors"] == 0


class _CountHooked(redis.Redis):
    """A client that runs ``hook`` once, right after a ZCARD reply."""

    hook: Any = None

    def zcard(self, name: Any) -> Any:
        n = super().zcard(name)
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return n


def test_an_eviction_finished_by_another_process_meanwhile_is_not_done_twice(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    # Review (2026-12-05): `over` came from a ZCARD read before the choice and was not read
    # again under WATCH: when another process evicted in between, this one deleted the next
    # oldest entries too (cap 4, 6 entries: 2 left).
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    k = keys_for(ns)
    cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    for i in range(6):
        cache.set(f"question number {i}", f"a{i}")
        time.sleep(0.005)
    client = _CountHooked.from_url(url)
    other = RedisStore.from_url(url, namespace=ns)
    client.hook = lambda: other.evict(4, time.time())
    evicted, _ = RedisStore(client, namespace=ns).evict(4, time.time())
    assert client.hook is None
    assert evicted == []
    assert len(list(r.scan_iter(k["entry"] + "*"))) == 4 and r.zcard(k["lru"]) == 4


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_eviction_goes_through_while_other_writers_keep_adding(
    valkey_server: EmbeddedServer, ns: str, kind: str
) -> None:
    # Under WATCH an eviction required the entry count to be the one it had read, so with
    # writers adding all the time it lost its three rounds and left the store above
    # max_entries until the writes stopped (a peak of 316-477 for 100 with 3 processes x 24
    # writing threads, bench/evict_peak.py). New entries are the newest: they do not change
    # which are the oldest.
    from hnswcache.store.redis import AsyncRedisStore

    url = valkey_server.url
    r = redis.Redis.from_url(url)
    k = keys_for(ns)
    cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    keys = []
    for i in range(6):
        keys.append(cache.set(f"question number {i}", f"a{i}"))
        time.sleep(0.005)
    writer = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    added = []

    def write() -> None:  # another process's write, between each round's choice and WATCH
        time.sleep(0.005)
        added.append(writer.set(f"a newer question {len(added)}", "n"))

    class Writing:  # (victim_keys runs between a round's choice and its WATCH)
        def victim_keys(self, members: Any) -> list[str]:
            write()
            return super().victim_keys(members)  # type: ignore[misc]

    class Busy(Writing, RedisStore):
        pass

    class AsyncBusy(Writing, AsyncRedisStore):
        pass

    if kind == "sync":
        evicted, _ = Busy(redis.Redis.from_url(url), namespace=ns).evict(4, time.time())
    else:
        import redis.asyncio as aredis

        async def run() -> list[int]:
            client = aredis.Redis.from_url(url)
            try:
                return (await AsyncBusy(client, namespace=ns).evict(4, time.time()))[0]
            finally:
                await client.aclose()

        evicted = asyncio.run(run())
    assert len(added) >= 1
    assert sorted(f"{i:016x}" for i in evicted) == sorted(keys[:2])  # the two oldest
    left = {key.decode()[len(k["entry"]):] for key in r.scan_iter(k["entry"] + "*")}
    assert left == set(keys[2:]) | set(added)


def test_a_refresh_the_server_refuses_for_a_while_is_counted_and_kept(
    valkey_server: EmbeddedServer, ns: str, clock: FakeClock
) -> None:
    # Every refused refresh was taken for "PEXPIRE GT unsupported" and dropped silently;
    # an out-of-memory refusal is an outage: counted, kept, written once the server recovers.
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    cache = SemanticCache(HashEmbedder(32), store=url, namespace=ns, clock=clock)
    key = cache.set("hello there", "hi", ttl=100, sliding=True)
    clock.advance(50)
    policy = r.config_get("maxmemory-policy")["maxmemory-policy"]
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")
    try:
        hit = cache.get("hello there")  # moves the expiry by half the TTL: a write-back
        assert hit is not None
        assert cache.stats()["store_errors"] == 1
    finally:
        r.config_set("maxmemory", "0")
        r.config_set("maxmemory-policy", policy)
    cache.sync()
    assert any(f.startswith(b"until:") for f in _entry(r, ns, key))


def test_only_a_missing_pexpire_gt_is_taken_for_an_old_server() -> None:
    # The messages redis-py raises for a refused command inside MULTI.
    old = redis.exceptions.ResponseError(
        "Command # 3 (PEXPIRE hc:{x}:e:1 50000 GT) of pipeline caused error: wrong number "
        "of arguments for 'pexpire' command")
    oom = redis.exceptions.ResponseError(
        "Command # 3 (PEXPIRE hc:{x}:e:1 50000 GT) of pipeline caused error: OOM command "
        "not allowed when used memory > 'maxmemory'.")
    assert _refuses_pexpire_gt(old)
    assert not _refuses_pexpire_gt(oom)
    assert not _refuses_pexpire_gt(redis.exceptions.ResponseError("READONLY You can't write"))


class _WriteDuringClear(RedisStore):
    """Has ``write`` run once at the start or the end of a clear's SCAN pass."""

    write: Any = None
    at = ""

    def _scan_keys(self) -> Any:
        if self.at == "start" and self.write is not None:
            self.write, w = None, self.write
            w()
        yield from super()._scan_keys()
        if self.at == "end" and self.write is not None:
            self.write, w = None, self.write
            w()


@pytest.mark.parametrize("at", ["start", "end"])
def test_an_entry_written_during_a_clear_is_where_the_store_says(
    valkey_server: EmbeddedServer, ns: str, at: str
) -> None:
    # The clear event was logged after the SCAN+DEL pass: an entry written during the pass
    # and kept by the store was dropped by every replica that had seen its `set` first.
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    emb = HashEmbedder(64)
    writer = SemanticCache(emb, store=url, namespace=ns)
    writer.set("old entry to be cleared", "x")
    store = _WriteDuringClear(redis.Redis.from_url(url), namespace=ns)
    clearer = SemanticCache(emb, store=store, namespace=ns)
    assert clearer.get("old entry to be cleared") is not None
    store.at = at
    store.write = lambda: writer.set("how do I reset my router password please", "hold it")
    clearer.clear()
    assert store.write is None
    # At the start SCAN still finds the new entry and deletes it; at the end it survives.
    kept = at == "end"
    assert len(list(r.scan_iter(keys_for(ns)["entry"] + "*"))) == int(kept)
    q = "how do I reset my router password"
    for cache in (writer, clearer, SemanticCache(emb, store=url, namespace=ns)):
        cache.sync()
        hit = cache.get(q)
        assert (hit is not None and hit.response == "hold it") == kept
        assert len(cache) == int(kept)
    assert writer.get("old entry to be cleared") is None


def test_a_reader_that_warm_started_on_an_empty_log_sees_a_trim_past_it(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    # Its position was "0-0", which parse_log cannot check: events trimmed before its next
    # read were lost without a rebuild, and so were the entries they announced.
    r = redis.Redis.from_url(valkey_server.url)
    writer = SemanticCache(HashEmbedder(32), namespace=ns,
                           store=RedisStore(r, namespace=ns, log_maxlen=10))
    reader = SemanticCache(HashEmbedder(32), namespace=ns,
                           store=RedisStore(r, namespace=ns, log_maxlen=10))
    reader.sync()  # warm start on an empty log
    for i in range(300):
        writer.set(f"question number {i}", f"answer {i}")
    assert r.xlen(keys_for(ns)["log"]) < 300
    reader.sync()
    assert reader.stats()["resyncs"] == 1
    assert len(reader) == 300
    hit = reader.get("question number 7")
    assert hit is not None and hit.response == "answer 7"


class _LeaseTakenMeanwhile(RedisStore):
    """Lets our lease expire and another process take it right after release() read it."""

    def holds(self, value: Any, token: str) -> bool:
        mine = super().holds(value, token)
        if mine and self.take is not None:
            take, self.take = self.take, None
            take()
        return mine

    take: Any = None


def test_release_never_drops_a_lease_another_process_took_meanwhile(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    # release() read the key and deleted it in two commands: a lease that expired and was
    # taken by another process in between was deleted, and a third process then called
    # the LLM too.
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    store = _LeaseTakenMeanwhile(redis.Redis.from_url(url), namespace=ns)
    other = RedisStore.from_url(url, namespace=ns)
    assert store.lease(7, "a" * 32, 60)
    key = store.lkey(7)

    def expire_and_take() -> None:
        r.delete(key)  # (our lease ran out)
        assert other.lease(7, "b" * 32, 60)

    store.take = expire_and_take
    store.release(7, "a" * 32)
    assert store.take is None
    assert r.get(key) == b"b" * 32 and other.lease_held(7)
    store.release(7, "a" * 32)  # not ours: left alone
    assert r.get(key) == b"b" * 32
    other.release(7, "b" * 32)
    assert not r.exists(key)


class _CountingFetches(RedisStore):
    sizes: list[int]

    def fetch(self, ids: Any) -> Any:
        self.sizes.append(len(ids))
        return super().fetch(ids)


def test_a_reader_far_behind_fetches_the_log_in_bounded_pieces(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    # A log read hands over up to 1,000 stream entries of up to 500 ids each: a reader
    # behind a bulk load fetched all of them in one pipeline (500k entries, ~750 MB at 384-d).
    url = valkey_server.url
    reader_store = _CountingFetches(redis.Redis.from_url(url), namespace=ns)
    reader_store.sizes = []
    reader = SemanticCache(HashEmbedder(8), store=reader_store, namespace=ns)
    reader.sync()  # warm, at the head of the (empty) log
    writer = SemanticCache(HashEmbedder(8), store=url, namespace=ns)
    for s in range(0, 30_000, 5_000):
        writer.set_many([(f"bulk {i}", "x") for i in range(s, s + 5_000)])
    reader.sync()
    assert len(reader) == 30_000
    assert reader_store.sizes and max(reader_store.sizes) <= 10_500
    assert sum(reader_store.sizes) >= 30_000


_CLEARER = """
import sys
from hnswcache import SemanticCache
from hnswcache.embed import HashEmbedder
c = SemanticCache(HashEmbedder(32), store=sys.argv[1], namespace=sys.argv[2])
print("clearing", flush=True)
c.clear()
"""


def test_a_clear_cut_short_leaves_every_replica_as_the_store_is(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    """A clear is a pass over the store, batch by batch: killed halfway, it must leave the
    other processes' replicas holding what the store still holds. (It logged one clear
    event first, and every replica dropped the whole scope while the store kept most of
    it, for good: the semantic tier never found those entries again.)"""
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    k = keys_for(ns)
    n = 30_000
    prompts = [f"question number {i} about topic {i % 97}" for i in range(n)]
    writer = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    writer.set_many([(p, f"answer {i}") for i, p in enumerate(prompts)])
    reader = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    reader.sync()  # (its warm start)
    assert len(reader) == n
    head = r.xrevrange(k["log"], count=1)[0][0]  # type: ignore[index]
    child = subprocess.Popen([sys.executable, "-c", _CLEARER, url, ns], env=child_env(),
                             stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"clearing\n"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it at its first logged deletion
        last = r.xrevrange(k["log"], count=1)
        if last and last[0][0] != head:  # type: ignore[index]
            child.kill()
            break
    child.wait(30)
    left = sum(1 for _ in r.scan_iter(match=k["entry"] + "*", count=1000))
    assert left > 0  # (the pass was cut short)
    for c in (reader, writer):
        c.sync()
        assert len(c) == left
    fresh = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    fresh.sync()
    assert len(fresh) == left
    survivor = next(p for p in prompts
                    if r.exists(k["entry"] + format_id(writer._core.key(p, None)[0])))
    hit = reader.get("please " + survivor, threshold=0.8)  # (the semantic tier)
    assert hit is not None and hit.tier == "semantic" and hit.prompt == survivor


def test_clear_within_skips_entry_keys_of_another_type(valkey_server: EmbeddedServer,
                                                        ns: str) -> None:
    """A foreign type under the entry prefix answers HGET with an error: clear(within=True)
    raised TypeError to a non-strict caller."""
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    c = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    c.set("hello world", "hi", scope={"tenant": "a", "m": 1})
    c.set("hello there", "yo", scope={"tenant": "b"})
    r.set(keys_for(ns)["entry"] + "0123456789abcdef", b"stray string")
    assert c.clear({"tenant": "a"}, within=True) == 1
    assert c.get("hello there", scope={"tenant": "b"}) is not None
    assert r.get(keys_for(ns)["entry"] + "0123456789abcdef") == b"stray string"

    async def run() -> int:
        a = AsyncSemanticCache(HashEmbedder(32), store=url, namespace=ns)
        try:
            return await a.clear({"tenant": "b"}, within=True)
        finally:
            await a.close()

    assert asyncio.run(run()) == 1


def test_a_forged_log_event_of_a_million_ids_is_skipped(valkey_server: EmbeddedServer,
                                                         ns: str) -> None:
    """No writer puts more than 500 ids in one event: one naming a million made every
    replica's next lookup fetch a million keys in one pipeline (16 s here)."""
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    a = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    a.set("what is the capital of france", "Paris")
    r.xadd(keys_for(ns)["log"], {"op": "set", "ids": ",".join(f"{i:016x}" for i in
                                                             range(1, 1_000_001))})
    a.set("how tall is everest", "8849 m")  # (a real event after it still applies)
    b = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    b.sync()
    hit = a.get("what is the capital of france ?!")
    assert hit is not None and hit.response == "Paris"
    assert a.stats()["sync_events"] < 10  # (it applied the million, fetching them: 16 s)
    assert a.stats()["store_errors"] == 0
    c = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    c.sync()
    r.xadd(keys_for(ns)["log"], {"op": "set", "ids": ",".join(f"{i:016x}" for i in
                                                             range(1, 1_000_001))})
    b.set("a third question", "three")
    c.sync()
    assert len(c) == 3


def test_a_refresh_of_an_entry_key_of_another_type_is_dropped(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    """WRONGTYPE is no outage: kept for the next round trip, the refresh failed on every
    lookup for good (a store error each; raised by every get when strict)."""
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    with pytest.raises(TypeError, match="redis-py client"):
        RedisStore(url, namespace=ns)
    store = RedisStore(r, namespace=ns)
    r.set(keys_for(ns)["entry"] + "0123456789abcdef", b"junk")
    assert store.refresh([Refresh(0x0123456789ABCDEF, "v1", time.time() + 60)],
                         time.time()) == 0


def _stored(prompt: str, vector: np.ndarray) -> tuple[int, dict[str, bytes]]:
    """A record's id and hash fields as a writer stores them (the vector as given)."""
    from hnswcache.store.base import Record, encode_record, entry_id, normalize_prompt, scope_key

    sid, sjson = scope_key(None)
    eid = entry_id(sid, normalize_prompt(prompt))
    rec = Record(id=eid, prompt=prompt, response="r", vector=vector.astype(np.float32),
                 scope_id=sid, scope_json=sjson, metadata_json="{}", created=0.0,
                 expires=math.inf, version="v1")
    return eid, encode_record(rec)


def test_garbage_vectors_and_prompts_read_back_are_refused_or_repaired() -> None:
    """Found by fuzzing the decoder: a float32 of 3e19 overflowed the norm's float32 dot
    (raised out of get() with numpy's errors made fatal); a vector scaled by 1.0099 passed
    the unit check and inflated every similarity against it by 1% (a 0.845 near miss became
    a hit); a prompt of 16 MiB was normalised by every reader (NFKC made it 18 times
    longer: ~15 s and ~2 GB per read)."""
    from hnswcache.store.base import MAX_PROMPT_BYTES, Invalid, Record, decode_record

    unit = np.zeros(8, np.float32)
    unit[0] = 1.0
    eid, raw = _stored("a question", unit)
    big = np.frombuffer(raw["vector"], "<f4").copy()
    big[1] = 3e19
    raw_big = {**raw, "vector": big.astype("<f4").tobytes()}
    with np.errstate(all="raise"):
        got = decode_record(eid, raw_big, 8)
    assert isinstance(got, Invalid) and "unit vector" in got.reason
    scaled = {**raw, "vector": (unit * 1.0099).astype("<f4").tobytes()}
    got = decode_record(eid, scaled, 8)
    assert isinstance(got, Record)
    assert abs(float(np.linalg.norm(got.vector)) - 1.0) < 1e-6
    long_prompt = "word " * (MAX_PROMPT_BYTES // 5 + 10)
    eid2, raw2 = _stored(long_prompt, unit)
    got = decode_record(eid2, raw2, 8)
    assert isinstance(got, Invalid) and "too large" in got.reason
    # ... and what readers refuse is not written.
    cache = SemanticCache(HashEmbedder(8), store="memory")
    with pytest.raises(ValueError, match="prompt longer than"):
        cache.set(long_prompt, "an answer")
    assert cache.set("word " * 1000, "a long but fine prompt")


def test_log_lines_about_garbage_stay_short(valkey_server: EmbeddedServer, ns: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """A warning about a garbage change-log event printed the whole event (up to 512 MB
    per value) on every replica."""
    url = valkey_server.url
    cache = SemanticCache(HashEmbedder(8), store=url, namespace=ns)
    cache.set("a question", "an answer")
    store = cache.store
    r = redis.Redis.from_url(url)
    r.xadd(store.k_log, {"op": "x" * 1_000_000})  # type: ignore[attr-defined]
    r.xadd(store.k_log, {"op": "del", "ids": "y" * 1_000_000})  # type: ignore[attr-defined]
    other = SemanticCache(HashEmbedder(8), store=url, namespace=ns)
    assert other.get("a question") is not None
    with caplog.at_level("WARNING"):
        r.xadd(store.k_log, {"op": "x" * 1_000_000})  # type: ignore[attr-defined]
        r.xadd(store.k_log, {"op": "clear", "scope": "z" * 1_000_000})  # type: ignore[attr-defined]
        other.sync()
    lines = [rec.getMessage() for rec in caplog.records if "change-log" in rec.getMessage()
             or "clear event" in rec.getMessage()]
    assert lines and max(len(m) for m in lines) < 1000, [len(m) for m in lines]
    assert other.get("a question") is not None
    cache.close()
    other.close()


def test_a_forged_clear_event_leaves_replicas_as_the_store_is(valkey_server: EmbeddedServer,
                                                              ns: str) -> None:
    """A clear event of every scope written into the change log (no writer logs one) made
    every replica drop its index while the store kept the entries: the semantic tier missed
    them until a restart. Replicas now keep or drop each entry as the store holds it."""
    url = valkey_server.url
    emb = HashEmbedder(16)
    writer = SemanticCache(emb, store=url, namespace=ns)
    writer.set("how do I reset my password", "use the link", scope={"t": "a"})
    writer.set("what is the refund policy", "30 days", scope={"t": "b"})
    reader = SemanticCache(emb, store=url, namespace=ns, sync_interval=0)
    near = "how do I reset my password please"
    assert reader.get(near, scope={"t": "a"}, threshold=0.5) is not None
    r = redis.Redis.from_url(url)
    r.xadd(writer.store.k_log, {"op": "clear", "scope": "*"})  # type: ignore[attr-defined]
    # One entry really is deleted behind the event's back (as an older version's clear
    # would): the replica drops that one and keeps the other.
    r.delete(keys_for(ns)["entry"] + writer.get("what is the refund policy",  # type: ignore[union-attr]
                                                scope={"t": "b"}).key)
    reader.sync()
    hit = reader.get(near, scope={"t": "a"}, threshold=0.5)
    assert hit is not None and hit.tier == "semantic" and hit.response == "use the link"
    assert reader.get("what is the refund policy please", scope={"t": "b"},
                      threshold=0.5) is None
    assert len(reader) == 1
    writer.close()
    reader.close()


def test_from_url_takes_the_clients_own_options(valkey_server: Any) -> None:
    """The stores made from a URL build their pool themselves: a client option (not a
    connection's) must still reach the client, as redis-py's from_url lets it."""
    from hnswcache.store.redis import POOL_SIZE, AsyncRedisStore, RedisStore

    store = RedisStore.from_url(valkey_server.url, single_connection_client=True)
    assert store.client.ping() and store.client.connection is not None
    assert store.client.connection_pool.max_connections == POOL_SIZE
    store.close()
    bigger = RedisStore.from_url(valkey_server.url, max_connections=7)
    assert bigger.client.connection_pool.max_connections == 7
    bigger.close()

    async def run() -> None:
        a = AsyncRedisStore.from_url(valkey_server.url, single_connection_client=True)
        assert await a.client.ping()
        await a.close()

    asyncio.run(run())
