"""What a cache store is: the record format, its validation, and the store protocols.

A store is the durable, shared source of truth of a :class:`~hnswcache.cache.SemanticCache`.
It keeps one *record* per cache entry and a *change log* (set / delete / clear events) that
other processes read to keep their in-process index replicas in step.

Everything read back from a store is untrusted: :func:`decode_record` checks every field
(types, sizes, the vector's length and finiteness, that the entry id matches its content)
and returns an :class:`Invalid` marker instead of raising, so garbage in a store costs a miss,
never a crash. Nothing is ever unpickled: fields are UTF-8 text, JSON and raw float32 bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "FORMAT",
    "Invalid",
    "LogBatch",
    "LogEvent",
    "Record",
    "Refresh",
    "Store",
    "AsyncStore",
    "StoreError",
    "WriteResult",
    "decode_record",
    "encode_record",
    "entry_id",
    "format_id",
    "normalize_prompt",
    "parse_id",
    "scope_key",
    "validate_namespace",
]

#: Version of the record layout written in every entry's ``format`` field.
FORMAT = "1"

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_HEX16_RE = re.compile(r"^[0-9a-f]{16}$")
#: Fields every stored entry must have.
REQUIRED_FIELDS = (
    "format",
    "prompt",
    "response",
    "vector",
    "scope",
    "scope_json",
    "metadata",
    "created",
    "expires",
    "version",
)
#: Upper bounds on what a store may hand back (garbage protection).
MAX_TEXT_BYTES = 16 * 1024 * 1024
#: The longest prompt, in UTF-8 bytes (about 250k tokens of English). The exact tier's
#: NFKC can make a text 18 times longer (U+FDFA), and every reader of an entry normalises
#: its prompt to check the entry's id: a 16 MiB prompt of such characters cost each replica
#: ~15 s and ~2 GB per read (found by fuzzing); this bound makes it ~1/16 of that.
MAX_PROMPT_BYTES = 1024 * 1024
MAX_DIM = 65536
#: The longest TTL a cache takes (100 years): a server's millisecond expiry overflows past
#: ~2.9e8 years, and a refused PEXPIRE must never leave an entry without its expiry.
MAX_TTL = 100 * 365.25 * 86400.0


class StoreError(Exception):
    """A store operation failed (server unreachable, timed out, or refused a command)."""


class StoreContended(StoreError):
    """A WATCH/MULTI write lost to other writers of the same keys on every try, for about a
    second: the server is healthy, so it is not counted as a store error."""


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is 1-64 characters of ``[A-Za-z0-9._-]``, else raise."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"namespace must be 1-64 characters of letters, digits, '.', '_' or '-', "
            f"got {namespace!r}"
        )
    return namespace


def scope_holds(scope_json: Any, fields: Mapping[str, Any]) -> bool:
    """Whether a stored scope (canonical JSON) holds every one of ``fields``."""
    if not isinstance(scope_json, (str, bytes)):  # (a foreign key type: HGET's error)
        return False
    try:
        scope = json.loads(scope_json)
    except (ValueError, RecursionError):
        return False
    return isinstance(scope, dict) and all(k in scope and scope[k] == v
                                           for k, v in fields.items())


_WHITESPACE = re.compile(r"\s+")


def normalize_prompt(prompt: str) -> str:
    """The form the exact tier hashes: NFKC, case-folded, whitespace runs collapsed, and
    trailing ``.``, ``?`` and ``!`` dropped ("How do I X?" == "how do i x")."""
    folded = unicodedata.normalize("NFKC", prompt).casefold()
    if len(folded) > 65536:  # (one regex pass: split/join made millions of word objects)
        return _WHITESPACE.sub(" ", folded).strip().rstrip(".?! ")
    return " ".join(folded.split()).rstrip(".?! ")  # (faster on short texts: 0.5 against 1.8 µs)


def scope_key(scope: Mapping[str, Any] | None) -> tuple[str, str]:
    """``(scope_id, canonical_json)`` of a scope mapping; ``None`` and ``{}`` are one scope.

    The id is 16 hex digits of a BLAKE2b hash of the canonical JSON (sorted keys, no
    spaces), so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` are the same scope.
    """
    if not scope:
        if scope is None or isinstance(scope, Mapping):
            return _DEFAULT_SCOPE
    if not isinstance(scope, Mapping):
        raise TypeError(f"scope must be a mapping or None, got {type(scope).__name__}")
    for k in scope:
        if not isinstance(k, str):
            raise TypeError(f"scope keys must be strings, got {k!r}")
    try:
        canon = json.dumps(dict(scope), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"scope values must be JSON-serialisable: {exc}") from None
    digest = hashlib.blake2b(canon.encode(), digest_size=8, person=b"hc-scope").hexdigest()
    return digest, canon


_DEFAULT_SCOPE = (
    hashlib.blake2b(b"{}", digest_size=8, person=b"hc-scope").hexdigest(), "{}"
)


#: How prompts and responses become bytes (keys, the server's fields) and back: a lone
#: surrogate (half an emoji cut upstream) is kept as the distinct text it is. Strict UTF-8
#: made every get() and set() of such a prompt raise UnicodeEncodeError, and a response
#: with one was stored by the memory store and refused by a server's.
_TEXT_ERRORS = "surrogatepass"


def entry_id(scope_id: str, normalized_prompt: str) -> int:
    """The 63-bit id (and index label) of the entry for a scope and a normalised prompt."""
    h = hashlib.blake2b(
        scope_id.encode() + b"\0" + normalized_prompt.encode("utf-8", _TEXT_ERRORS),
        digest_size=8, person=b"hc-entry",
    ).digest()
    return int.from_bytes(h, "big") & 0x7FFF_FFFF_FFFF_FFFF


def format_id(eid: int) -> str:
    """An entry id as the 16 hex digits used in keys and in :class:`~hnswcache.cache.Hit`."""
    return f"{eid:016x}"


def parse_id(text: str | bytes) -> int | None:
    """The inverse of :func:`format_id`; ``None`` if ``text`` is not 16 lowercase hex digits."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not _HEX16_RE.match(text):
        return None
    value = int(text, 16)
    return value if value <= 0x7FFF_FFFF_FFFF_FFFF else None


@dataclass(frozen=True, slots=True)
class Record:
    """One cache entry as stored.

    ``vector`` is the unit-normalised float32 embedding of ``prompt``. Times are seconds on
    the cache clock; ``expires`` is ``inf`` for an entry that never expires. ``version`` is a
    random token that changes on every write of the entry (replicas compare it to skip
    re-inserting what they already have). ``slide`` > 0 makes the TTL sliding: a hit
    extends ``expires`` to ``now + slide`` (see :class:`Refresh`).
    """

    id: int
    prompt: str
    response: str
    vector: npt.NDArray[np.float32]
    scope_id: str
    scope_json: str
    metadata_json: str
    created: float
    expires: float
    version: str
    slide: float = 0.0
    #: Verdicts on this version's answer: ``(similarity, right)`` (see :func:`merge_verdicts`).
    verdicts: tuple[tuple[float, bool], ...] = ()
    #: The embedder read only the start of ``prompt``: the entry answers its own prompt
    #: (the exact tier) and is never a semantic candidate (replicas do not index it).
    exact_only: bool = False

    def expired(self, now: float) -> bool:
        return self.expires <= now

    @property
    def metadata(self) -> dict[str, Any]:
        if self.metadata_json == "{}":  # the common case, without the JSON parser
            return {}
        return _json_object(self.metadata_json)

    @property
    def scope(self) -> dict[str, Any]:
        if self.scope_json == "{}":
            return {}
        return _json_object(self.scope_json)


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object decode_record has checked; ``{}`` if it no longer parses here (a
    nesting deep enough to pass there can hit the recursion limit on a deeper stack)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class Invalid:
    """A stored entry that failed validation (garbage, wrong dimension, foreign format)."""

    id: int
    reason: str


Fetched = Record | Invalid | None


def encode_record(rec: Record) -> dict[str, bytes]:
    """The hash fields of a record (all values bytes; the vector as float32 little-endian)."""
    return {
        "format": FORMAT.encode(),
        "prompt": rec.prompt.encode("utf-8", _TEXT_ERRORS),
        "response": rec.response.encode("utf-8", _TEXT_ERRORS),
        "vector": np.ascontiguousarray(rec.vector, dtype="<f4").tobytes(),
        "scope": rec.scope_id.encode(),
        "scope_json": rec.scope_json.encode("utf-8"),
        "metadata": rec.metadata_json.encode("utf-8"),
        "created": repr(float(rec.created)).encode(),
        "expires": repr(float(rec.expires)).encode(),
        "version": rec.version.encode(),
        **({"slide": repr(float(rec.slide)).encode()} if rec.slide > 0 else {}),
        **({"exact_only": b"1"} if rec.exact_only else {}),
    }


#: A sliding entry's later expiry is written beside it as the field ``until:<version>``:
#: a refresh that loses a race with a new write of the entry lands on a field the new
#: version never reads, so it cannot extend an answer it was not given for.
UNTIL_PREFIX = b"until:"


@dataclass(frozen=True, slots=True)
class Refresh:
    """A hit on a sliding entry: extend entry ``id`` of ``version`` to ``until``."""

    id: int
    version: str
    until: float


#: Verdicts on an entry's answer are written beside it as the field ``verdicts:<version>``
#: (text: ``r<similarity>`` or ``w<similarity>`` separated by spaces, each similarity a
#: Python float ``repr``, so it reads back exactly): a new write of the entry (a new
#: answer) starts with none, and a verdict on an old answer cannot land on a new one.
VERDICTS_PREFIX = b"verdicts:"
#: Verdicts kept per entry (see merge_verdicts).
MAX_VERDICTS = 32

Verdict = tuple[float, bool]


#: Similarities closer than this are one prompt's: its similarity differs in the last
#: float32 bits between lookup paths (get and get_many) and hosts. An entry judged wrong at
#: s answers only above s + VERDICT_MARGIN; right verdicts closer than it count once.
VERDICT_MARGIN = 1e-6


def distinct_rights(sims: Iterable[float]) -> list[float]:
    """Right-verdict similarities, lowest first, one per prompt: values within
    ``VERDICT_MARGIN`` of the last kept one are the same prompt judged again (a retry, a
    repeated miss, get then get_many: each counted toward ``learn_after`` before)."""
    out: list[float] = []
    for s in sorted(sims):
        if not out or s > out[-1] + VERDICT_MARGIN:
            out.append(s)
    return out


def merge_verdicts(old: Sequence[Verdict], new: Verdict) -> tuple[Verdict, ...]:
    """``old`` with ``new`` added, pruned to what an entry's threshold depends on (see
    ``CacheCore.entry_threshold``): the highest similarity judged wrong, and the distinct
    right ones above it, lowest first, ``MAX_VERDICTS`` in all."""
    both = [*old, new]
    wrong = max((s for s, ok in both if not ok), default=None)
    rights = distinct_rights(s for s, ok in both if ok and (wrong is None or s > wrong))
    head: list[Verdict] = [] if wrong is None else [(wrong, False)]
    return (*head, *((s, True) for s in rights[:MAX_VERDICTS - len(head)]))


def encode_verdicts(verdicts: Sequence[Verdict]) -> bytes:
    return " ".join(("r" if ok else "w") + repr(float(s)) for s, ok in verdicts).encode()


def decode_verdicts(raw: Any) -> tuple[Verdict, ...]:
    """The verdicts of a ``verdicts:<version>`` field; ``ValueError`` if it is not one."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > 32 * MAX_VERDICTS:
        raise ValueError("field 'verdicts' is not bytes of a verdict list")
    out = []
    for token in bytes(raw).decode("ascii", "replace").split():
        if token[0] not in "rw":
            raise ValueError("field 'verdicts' holds something else than verdicts")
        try:
            sim = float(token[1:])
        except ValueError:
            raise ValueError("field 'verdicts' holds a similarity that is no number") from None
        if not -1.001 <= sim <= 1.001:  # (NaN fails too)
            raise ValueError("field 'verdicts' holds a similarity outside [-1, 1]")
        out.append((sim, token[0] == "r"))
    if len(out) > MAX_VERDICTS:
        raise ValueError("field 'verdicts' holds too many verdicts")
    return tuple(out)


def is_residue(raw: Mapping[Any, Any]) -> bool:
    """A hash holding only refresh fields: what a refresh of an earlier release could
    leave where its entry had been deleted (refreshes are version-checked transactions
    now). Read as no entry, not as garbage."""
    return bool(raw) and all(isinstance(k, bytes) and k.startswith(UNTIL_PREFIX) for k in raw)


def _text(raw: Mapping[Any, Any], name: str, limit: int = MAX_TEXT_BYTES) -> str:
    value = raw.get(_BKEYS[name])
    if value is None:
        value = raw.get(name)
        if value is None:
            raise ValueError(f"missing field {name!r}")
        if isinstance(value, str):
            value = value.encode("utf-8", _TEXT_ERRORS)
    if type(value) is not bytes:
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"field {name!r} is not bytes")
        value = bytes(value)
    if len(value) > limit:
        raise ValueError(f"field {name!r} is too large ({len(value)} bytes)")
    try:
        return value.decode("utf-8", _TEXT_ERRORS)
    except UnicodeDecodeError:
        raise ValueError(f"field {name!r} is not UTF-8") from None


_BKEYS = {n: n.encode() for n in (*REQUIRED_FIELDS, "slide", "until")}
#: (scope id, scope json) pairs already checked to match (scopes repeat across entries).
_VERIFIED_SCOPES: dict[tuple[str, str], bool] = {}


def _check_scope(scope_id: str, scope_json: str) -> None:
    if (scope_id, scope_json) in _VERIFIED_SCOPES:
        return
    if not _HEX16_RE.match(scope_id):
        raise ValueError("bad scope id")
    value = json.loads(scope_json)
    if not isinstance(value, dict):
        raise ValueError("field 'scope_json' is not a JSON object")
    if scope_key(value)[0] != scope_id:
        raise ValueError("scope id does not match scope_json")
    if len(_VERIFIED_SCOPES) >= 4096:
        _VERIFIED_SCOPES.clear()
    _VERIFIED_SCOPES[(scope_id, scope_json)] = True


def _float(raw: Mapping[Any, Any], name: str) -> float:
    text = _text(raw, name)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"field {name!r} is not a number: {text[:40]!r}") from None
    if math.isnan(value):
        raise ValueError(f"field {name!r} is NaN")
    return value


def as_unit_vector(vector: npt.NDArray[np.float32]
                   ) -> tuple[npt.NDArray[np.float32] | None, float]:
    """A float32 vector read back from the server, made exactly unit when its squared norm
    is within 2% of 1 (``None`` otherwise: NaN, infinity, overflow), and that squared norm.
    Rescaled because a stored vector 1% too long inflated the similarity of every lookup
    against it (a near miss at 0.845 became a hit); only when off by more than float32's
    rounding, so what the cache wrote is returned as is."""
    try:
        n2 = float(np.dot(vector, vector))  # NaN or inf if any value is
    except (FloatingPointError, RuntimeWarning):  # (a float32 of 3e19 overflows it, and
        n2 = math.inf  # NumPy's errors or warnings may be made fatal)
    if not 0.98 < n2 < 1.02:
        return None, n2
    if abs(n2 - 1.0) > 1e-5:
        vector = (vector.astype(np.float64) / math.sqrt(n2)).astype(np.float32)
    return vector, n2


def decode_record(eid: int, raw: Any, dim: int | None = None) -> Record | Invalid:
    """Validate the stored fields of entry ``eid``; a :class:`Record`, or :class:`Invalid`.

    Checks: a mapping with every required field, the format version, UTF-8 text, the
    vector's byte length (a multiple of 4, ``dim`` floats when ``dim`` is given), finite unit
    vector, JSON objects for scope and metadata, numeric times, and that ``eid`` is the id of
    (scope, normalised prompt): a record copied under a foreign key is rejected.
    """
    try:
        if not isinstance(raw, Mapping):
            raise ValueError(f"not a hash ({type(raw).__name__})")
        fmt = _text(raw, "format")
        if fmt != FORMAT:
            raise ValueError(f"unknown format {fmt[:20]!r}")
        prompt = _text(raw, "prompt", MAX_PROMPT_BYTES)
        response = _text(raw, "response")
        vec_bytes = raw.get(b"vector", raw.get("vector"))
        if not isinstance(vec_bytes, (bytes, bytearray)):
            raise ValueError("missing or non-bytes field 'vector'")
        if len(vec_bytes) == 0 or len(vec_bytes) % 4 or len(vec_bytes) > 4 * MAX_DIM:
            raise ValueError(f"vector has {len(vec_bytes)} bytes")
        vector = np.frombuffer(bytes(vec_bytes), dtype="<f4").astype(np.float32)
        if dim is not None and vector.shape[0] != dim:
            raise ValueError(f"vector has dimension {vector.shape[0]}, the cache has {dim}")
        unit, n2 = as_unit_vector(vector)
        if unit is None:
            raise ValueError(f"vector is not a finite unit vector (squared norm {n2:.3f})")
        vector = unit
        scope_id = _text(raw, "scope")
        scope_json = _text(raw, "scope_json")
        _check_scope(scope_id, scope_json)
        metadata_json = _text(raw, "metadata")
        if metadata_json != "{}" and not isinstance(json.loads(metadata_json), dict):
            raise ValueError("field 'metadata' is not a JSON object")
        created = _float(raw, "created")
        expires = _float(raw, "expires")
        # A write stores created = now and expires = now + ttl (ttl in (0, MAX_TTL]) or inf:
        # anything else would make an entry ageless (created = inf passes every max_age) or
        # give it an expiry no server can hold.
        if not math.isfinite(created):
            raise ValueError("field 'created' is not finite")
        if not (created <= expires <= created + MAX_TTL * 1.001 or expires == math.inf):
            raise ValueError("field 'expires' is not after 'created' within the longest TTL")
        version = _text(raw, "version")
        if not 0 < len(version) <= 64:
            raise ValueError("bad version")
        slide = 0.0
        if b"slide" in raw or "slide" in raw:
            slide = _float(raw, "slide")
            if not (0 < slide < math.inf and expires < math.inf):
                raise ValueError("field 'slide' must be a positive number of seconds, "
                                 "with a finite 'expires'")
            if slide > expires - created + 1e-3:  # a write sets slide = expires - created
                raise ValueError("field 'slide' is longer than the entry's TTL")
            until_raw = raw.get(UNTIL_PREFIX + version.encode())
            if until_raw is not None:
                until = _float({b"until": until_raw}, "until")
                if not until < math.inf:
                    raise ValueError("field 'until' is not finite")
                expires = max(expires, until)
        exact_raw = raw.get(b"exact_only", raw.get("exact_only"))
        if exact_raw not in (None, b"1", "1"):
            raise ValueError("field 'exact_only' is not 1")
        verdicts_raw = raw.get(VERDICTS_PREFIX + version.encode())
        verdicts = () if verdicts_raw is None else decode_verdicts(verdicts_raw)
        if entry_id(scope_id, normalize_prompt(prompt)) != eid:
            raise ValueError("entry id does not match its scope and prompt")
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        return Invalid(eid, str(exc))
    except RecursionError:  # JSON nested past the interpreter's limit
        return Invalid(eid, "scope or metadata JSON nested too deeply")
    return Record(
        id=eid,
        prompt=prompt,
        response=response,
        vector=vector,
        scope_id=scope_id,
        scope_json=scope_json,
        metadata_json=metadata_json,
        created=created,
        expires=expires,
        version=version,
        slide=slide,
        verdicts=verdicts,
        exact_only=exact_raw is not None,
    )


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One change: ``op`` is ``"set"`` or ``"del"`` (with ``id``) or ``"clear"`` (with
    ``scope``: a scope id, or ``"*"`` for the whole cache)."""

    op: str
    id: int | None = None
    scope: str = ""
    pos: str = ""  # the event's position in the log


@dataclass
class LogBatch:
    """Changes read from a store's log after a position.

    ``position`` is where the next read starts. ``reset`` means the reader's position is no
    longer in the log (trimmed past it, or the server lost its data): the reader must rebuild
    from a full :meth:`Store.scan`. ``after`` is the position it was read after (``None``:
    not told), so that a reader whose position has moved since (another thread applied a
    read of its own) can tell the batch is stale.
    """

    events: list[LogEvent] = field(default_factory=list)
    position: str = "0-0"
    reset: bool = False
    more: bool = False
    after: str | None = None


@dataclass(frozen=True)
class WriteResult:
    """What a write reported: entries in the cache now (including expired ones not yet
    cleaned up), expired entries waiting for :meth:`Store.evict`, and expired entries the
    write itself cleaned up."""

    count: int
    expired_pending: int = 0
    expired_removed: int = 0
    log_positions: tuple[str, ...] = ()  # positions of the log events this write appended


@dataclass(frozen=True)
class Cleared:
    """What a clear did: entries deleted, and the positions of the log events it appended
    (the cache that cleared skips them when it reads the log: it applied them already).

    ``batches``: a clear that deleted batch by batch (a scan of a server) gives each
    ``del`` event's position with the ids it deleted, which is all it logged; ``None``:
    ``log_positions[0]`` is one ``clear`` event (a store that clears atomically)."""

    deleted: int
    log_positions: tuple[str, ...] = ()
    batches: tuple[tuple[str, tuple[int, ...]], ...] | None = None


@runtime_checkable
class Store(Protocol):
    """A synchronous store. Every method may raise :class:`StoreError`."""

    namespace: str

    def read(
        self, ids: Sequence[int], *, log_after: str | None, touch: Sequence[int], now: float,
    ) -> tuple[list[Fetched], LogBatch | None]:
        """Fetch entries ``ids`` and, if ``log_after`` is given, the log after it, in one
        round trip; also mark ``touch`` as used now (LRU)."""
        ...

    def refresh(self, refresh: Sequence[Refresh], now: float) -> int:
        """Extend sliding entries (hits): each only while the entry still holds the version
        it names and is live at ``now``, atomically (never an entry recreated, nor a newer
        write extended); logged as ``set``. Returns how many were extended."""
        ...

    def fetch(self, ids: Sequence[int]) -> list[Fetched]:
        """The entries ``ids`` (``None`` where absent)."""
        ...

    def add_verdict(self, eid: int, version: str, verdict: Verdict) -> bool:
        """Add ``verdict`` to entry ``eid`` while it holds ``version`` (atomically: never
        to another answer, never recreating a deleted entry); False if it does not."""
        ...

    def write(
        self, records: Sequence[Record], ttls: Sequence[float | None], now: float,
        touch: Sequence[int] = (),
    ) -> WriteResult:
        """Store records atomically with their expiry (``ttl`` seconds, ``None`` = never)
        and their log events; also mark ``touch`` as used now (LRU)."""
        ...

    def delete(self, ids: Sequence[int]) -> int:
        """Delete entries (and log it); how many existed. A store may also have
        ``delete_logged(ids) -> Cleared`` (how many, and the log positions of the
        deletion): the cache then skips its local apply of a deletion the replica has
        already read from the log (a later write by another process stays)."""
        ...

    def evict(self, max_entries: int | None, now: float,
              logged: list[tuple[str, Sequence[int]]] | None = None) -> tuple[list[int], int]:
        """Drop expired bookkeeping, then least-recently-used entries beyond
        ``max_entries``; ``(evicted ids, expired entries removed)``. With ``logged``, appends
        ``(log position, ids)`` of each ``del`` event of the eviction (the caller applies it
        to its replica as its own deletes, ahead of the log)."""
        ...

    def clear(self, scope_id: str | None) -> Cleared:
        """Delete every entry (of one scope). Atomically, with one ``clear`` event; or batch
        by batch, each with its ``del`` event and nothing else logged (an entry written
        meanwhile is either deleted with a ``del`` event or kept), so that a pass cut short
        leaves every replica as the store is."""
        ...

    def clear_within(self, fields: Mapping[str, Any]) -> int:
        """Delete every entry whose scope holds all of ``fields`` (and maybe more), each
        batch with its ``del`` event; how many were deleted."""
        ...

    def scan(self) -> Iterator[list[Fetched]]:
        """Every entry, in batches (warm start)."""
        ...

    def log_head(self) -> str:
        """The position of the newest log event. A store whose readers cannot tell a trim
        past ``"0-0"`` (Redis) gives an empty log a no-op event first."""
        ...

    def check_meta(self, dim: int | None, embedder: str) -> tuple[int | None, str]:
        """Record ``dim``/``embedder`` if the cache has none yet (``dim=None``: only read);
        return what is stored."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncStore(Protocol):
    """The asynchronous twin of :class:`Store` (same methods, awaitable)."""

    namespace: str

    async def read(
        self, ids: Sequence[int], *, log_after: str | None, touch: Sequence[int], now: float,
    ) -> tuple[list[Fetched], LogBatch | None]: ...

    async def refresh(self, refresh: Sequence[Refresh], now: float) -> int: ...

    async def fetch(self, ids: Sequence[int]) -> list[Fetched]: ...

    async def add_verdict(self, eid: int, version: str, verdict: Verdict) -> bool: ...

    async def write(
        self, records: Sequence[Record], ttls: Sequence[float | None], now: float,
        touch: Sequence[int] = (),
    ) -> WriteResult: ...

    async def delete(self, ids: Sequence[int]) -> int: ...

    async def evict(self, max_entries: int | None, now: float,
                    logged: list[tuple[str, Sequence[int]]] | None = None
                    ) -> tuple[list[int], int]: ...

    async def clear(self, scope_id: str | None) -> Cleared: ...

    async def clear_within(self, fields: Mapping[str, Any]) -> int: ...

    def scan(self) -> AsyncIterator[list[Fetched]]: ...

    async def log_head(self) -> str: ...

    async def check_meta(self, dim: int | None, embedder: str) -> tuple[int | None, str]: ...

    async def close(self) -> None: ...
