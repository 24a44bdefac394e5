"""HnswCacheVectorStore inside GPTCache's own flow: get_data_manager(CacheBase("sqlite"), store),
cache.init(...), adapter.api put/get, eviction, the consistency check and persistence."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gptcache")
pytest.importorskip("sqlalchemy")  # CacheBase("sqlite"); without it GPTCache would pip-install

from gptcache import Cache, Config  # noqa: E402
from gptcache.adapter.api import get, put  # noqa: E402
from gptcache.manager import CacheBase, get_data_manager  # noqa: E402
from gptcache.manager.vector_data.base import VectorBase, VectorData  # noqa: E402
from gptcache.processor.pre import get_prompt  # noqa: E402
from gptcache.similarity_evaluation import SearchDistanceEvaluation  # noqa: E402

from hnswcache.integrations.gptcache import HnswCacheVectorStore  # noqa: E402

DIM = 64


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def embed(text: str, **_: Any) -> np.ndarray:
    """A local, deterministic embedding: hashed bag of words (paraphrases share words)."""
    v = np.zeros(DIM, dtype=np.float32)
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        v[h % DIM] += 1.0 if (h >> 32) & 1 else -1.0
    return v


def make_cache(tmp_path: Path, store: HnswCacheVectorStore, **dm: Any) -> Cache:
    cache = Cache()
    cache.init(
        pre_embedding_func=get_prompt,
        embedding_func=embed,
        data_manager=get_data_manager(
            CacheBase("sqlite", sql_url=f"sqlite:///{tmp_path / 'gptcache.db'}"), store, **dm
        ),
        similarity_evaluation=SearchDistanceEvaluation(),
        config=Config(similarity_threshold=0.8),
    )
    return cache


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x)).astype(np.float32)


def test_is_a_gptcache_vector_base() -> None:
    assert isinstance(HnswCacheVectorStore(dimension=DIM), VectorBase)


def test_store_contract() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([unit(v) for v in rng.standard_normal((50, DIM))])
    store = HnswCacheVectorStore(dimension=DIM, top_k=3)
    assert store.search(x[0]) == [] and store.count() == 0
    store.mul_add([VectorData(id=i + 100, data=x[i]) for i in range(50)])
    assert store.count() == 50
    res = store.search(x[7])  # default top_k
    assert len(res) == 3
    assert all(type(d) is float and type(i) is int for d, i in res)
    assert res[0] == (0.0, 107)
    for d, i in res:  # squared L2 on unit vectors: 2 - 2 cos
        assert d == pytest.approx(2 - 2 * float(x[i - 100] @ x[7]), abs=1e-5)
    assert [d for d, _ in res] == sorted(d for d, _ in res)
    assert len(store.search(x[7], top_k=60)) == 50  # fewer live entries than asked: no padding
    np.testing.assert_array_equal(store.get_embeddings(107), x[7])
    assert store.get_embeddings(9999) is None
    assert store.delete([107, 108, 9999]) is True
    assert store.count() == 48 and 107 not in [i for _, i in store.search(x[7], top_k=5)]
    store.update_embeddings(110, x[7])
    assert store.search(x[7])[0] == (0.0, 110)
    assert store.rebuild(list(range(100, 120))) is True
    assert store.count() == 18
    assert store.rebuild() is True and store.count() == 18


def test_ttl_entries_expire_from_search() -> None:
    clock = Clock()
    store = HnswCacheVectorStore(dimension=4, ttl=10, clock=clock)
    store.mul_add([VectorData(id=1, data=unit(np.array([1.0, 0, 0, 0])))])
    store.mul_add([VectorData(id=2, data=unit(np.array([1.0, 0.1, 0, 0])))])
    assert store.set_ttl([2], None) == 1  # id 2 never expires
    clock.t += 9.9
    assert [i for _, i in store.search(np.array([1.0, 0, 0, 0]), top_k=2)] == [1, 2]
    store.update_embeddings(1, unit(np.array([1.0, 0, 0.01, 0])))  # keeps its expiry
    clock.t += 0.2
    assert [i for _, i in store.search(np.array([1.0, 0, 0, 0]), top_k=2)] == [2]
    assert store.count() == 1 and store.get_embeddings(1) is None
    # Expired: an update (GPTCache's health check after a hit) does not bring it back.
    store.update_embeddings(1, unit(np.array([1.0, 0, 0, 0])))
    assert [i for _, i in store.search(np.array([1.0, 0, 0, 0]), top_k=2)] == [2]
    assert store.count() == 1 and store.get_embeddings(1) is None


def test_gptcache_flow_end_to_end(tmp_path: Path) -> None:
    store = HnswCacheVectorStore(dimension=DIM, top_k=3, index_path=tmp_path / "index.bin")
    cache = make_cache(tmp_path, store)
    put("what is the capital of france", "Paris", cache_obj=cache)
    put("how tall is mount everest", "8849 m", cache_obj=cache)
    assert store.count() == 2
    assert get("what is the capital of france", cache_obj=cache) == "Paris"
    assert get("what is the capital of france ?", cache_obj=cache) == "Paris"  # near duplicate
    assert get("how tall is mount everest", cache_obj=cache) == "8849 m"
    assert get("recipe for banana bread", cache_obj=cache) is None

    # the consistency check reads our embeddings back: they match the scalar store exactly
    cache.config.data_check = True
    assert get("how tall is mount everest", cache_obj=cache) == "8849 m"

    cache.flush()
    assert (tmp_path / "index.bin").exists()
    reopened = HnswCacheVectorStore(dimension=DIM, top_k=3, index_path=tmp_path / "index.bin",
                                    ef_search=200)
    assert reopened.count() == 2
    assert reopened._index.ef_search == 200  # (the file's was ignored before: the saved one)
    cache2 = make_cache(tmp_path, reopened)
    assert get("what is the capital of france", cache_obj=cache2) == "Paris"


def test_a_text_with_no_words_is_a_miss_not_an_error(tmp_path: Path) -> None:
    """This embedder (as the docs' example) gives a zero vector for text with no latin
    word; GPTCache normalises it into NaN, and get() raised out of the store."""
    store = HnswCacheVectorStore(dimension=DIM, top_k=3)
    cache = make_cache(tmp_path, store)
    put("what is the capital of france", "Paris", cache_obj=cache)
    for text in ("北京是中国的首都吗", "???"):
        assert get(text, cache_obj=cache) is None
    assert store.search(np.full(DIM, np.nan, dtype=np.float32)) == []
    assert get("what is the capital of france", cache_obj=cache) == "Paris"


def test_gptcache_eviction_deletes_from_the_index(tmp_path: Path) -> None:
    store = HnswCacheVectorStore(dimension=DIM, top_k=1)
    cache = make_cache(tmp_path, store, max_size=5, clean_size=2)
    for i in range(12):
        put(f"question number {i} about topic{i}", f"answer {i}", cache_obj=cache)
    assert store.count() <= 12
    live = store.index.labels().tolist()
    # every id the index returns is still in GPTCache's scalar store
    scalar_ids = set(cache.data_manager.s.get_ids(deleted=False))
    assert set(live) <= scalar_ids | set(cache.data_manager.s.get_ids(deleted=True))
    assert get("question number 11 about topic11", cache_obj=cache) == "answer 11"


def test_gptcache_ttl_turns_hits_into_misses(tmp_path: Path) -> None:
    clock = Clock()
    store = HnswCacheVectorStore(dimension=DIM, ttl=60, clock=clock)
    cache = make_cache(tmp_path, store)
    put("is it raining in london", "yes", cache_obj=cache)
    assert get("is it raining in london", cache_obj=cache) == "yes"
    clock.t += 61
    assert get("is it raining in london", cache_obj=cache) is None
    put("is it raining in london", "no", cache_obj=cache)  # a fresh answer is stored
    assert get("is it raining in london", cache_obj=cache) == "no"


def test_rejects_wrong_dimensions(tmp_path: Path) -> None:
    store = HnswCacheVectorStore(dimension=4, index_path=tmp_path / "i.bin")
    with pytest.raises(ValueError, match="dimension"):
        store.mul_add([VectorData(id=1, data=np.ones(5))])
    store.mul_add([VectorData(id=1, data=np.ones(4))])
    store.close()
    with pytest.raises(ValueError, match="dimension"):
        HnswCacheVectorStore(dimension=8, index_path=tmp_path / "i.bin")


def test_the_store_takes_the_graphs_pruning_slack() -> None:
    assert HnswCacheVectorStore(DIM)._index.alpha == 1.2
    assert HnswCacheVectorStore(DIM, alpha=1.0)._index.alpha == 1.0
    with pytest.raises(ValueError, match="alpha"):
        HnswCacheVectorStore(DIM, alpha=3.0)


def test_one_vector_gptcache_made_nan_does_not_lose_a_whole_import(tmp_path: Path) -> None:
    """import_data of 100 questions and one with no latin word (a zero vector, NaN once
    GPTCache normalised it): mul_add raised, and none of the 100 reached the index."""
    store = HnswCacheVectorStore(dimension=DIM, top_k=3)
    cache = make_cache(tmp_path, store)
    questions = [f"question number {i} about topic{i}" for i in range(100)] + ["???"]
    cache.import_data(questions, [f"answer {i}" for i in range(101)])
    assert store.count() == 100
    assert get("question number 3 about topic3", cache_obj=cache) == "answer 3"
    assert get("???", cache_obj=cache) is None


def test_ids_are_integers_not_truncated_floats() -> None:
    store = HnswCacheVectorStore(dimension=4)
    store.mul_add([VectorData(id=1, data=np.ones(4)), VectorData(id=np.int64(2), data=-np.ones(4)),
                   VectorData(id="3", data=np.arange(4.0))])
    assert sorted(store.index.labels().tolist()) == [1, 2, 3]
    with pytest.raises(TypeError):
        store.mul_add([VectorData(id=1.5, data=np.zeros(4) + 2)])  # (replaced id 1)
    assert store.get_embeddings(1) is not None and store.count() == 3
    np.testing.assert_allclose(store.get_embeddings(1), np.ones(4))


def test_a_loaded_index_says_which_given_graph_parameters_it_ignores(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """M, ef_construction and alpha given for an existing index file were dropped without
    a word (alpha=1.0 came back as 1.2)."""
    path = tmp_path / "i.bin"
    first = HnswCacheVectorStore(dimension=4, index_path=path, M=12)
    first.mul_add([VectorData(id=1, data=np.ones(4))])
    first.close()
    with caplog.at_level("WARNING", logger="hnswcache.integrations.gptcache"):
        HnswCacheVectorStore(dimension=4, index_path=path, M=12)  # the same: nothing said
        assert "ignored" not in caplog.text
        again = HnswCacheVectorStore(dimension=4, index_path=path, M=32, alpha=1.0)
    assert again.index.M == 12 and again.index.alpha == 1.2
    assert "M=32" in caplog.text and "alpha=1.0" in caplog.text and "ignored" in caplog.text


def test_ids_of_get_and_update_embeddings_are_integers_too() -> None:
    store = HnswCacheVectorStore(dimension=4)
    store.mul_add([VectorData(id=1, data=np.ones(4))])
    with pytest.raises(TypeError):
        store.update_embeddings(1.5, np.zeros(4) + 2)  # (replaced id 1's vector)
    with pytest.raises(TypeError):
        store.get_embeddings(1.5)
    np.testing.assert_allclose(store.get_embeddings("1"), np.ones(4))
