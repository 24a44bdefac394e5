"""Local snapshots of a cache's replica, for a fast warm start.

A warm start without one reads every stored entry and builds each scope's graph again
(~9-12k entries a second here). A snapshot holds what that produces: each scope's index
file, which entry id has which stored version, and the position of the store's change log
the replica had applied. A restart loads it (the graph is read, not rebuilt), then reads the
log from that position and applies what changed since, as a running replica does. The log
is the authority: a snapshot that no longer fits it (its position trimmed away, another
server's data, a flushed server) is not used, and the warm start reads the store.

Layout, one folder per namespace under the snapshot folder (the name is a hash of the
namespace, so any namespace is a safe file name), and in it one per variant of the index
settings (a hash of the dimension, M, ef_construction, alpha and dtype: deployments with
other settings sharing the folder keep their own snapshots instead of replacing each
other's at every start)::

    <root>/<ns hash>/<variant>/manifest.json            format, namespace, dimension, index
                                                        settings, log position, and per
                                                        scope: its index file, entry ids
                                                        and versions
    <root>/<ns hash>/<variant>/scope-<sid>-<token>.hci  Index.save() of scope <sid>

The manifest is replaced atomically after its index files are written, so a reader sees the
old snapshot or the new one. Everything read back is validated (the index files by the
core's loader, the manifest's fields here); a snapshot that fails is skipped with a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .index import Index

if TYPE_CHECKING:
    from ._cache_core import CacheCore

log = logging.getLogger("hnswcache")

#: /2 (ninth session of 2026-12-05): the manifest ends with a line of its checksum, and
#: names each index file's size. A /1 manifest is refused: one rebuild from the store.
FORMAT = "hnswcache-snapshot/2"
_MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 1 << 30
#: The largest index file a manifest may record (its own bound otherwise: _index_limit).
_MAX_INDEX_BYTES = 1 << 40
_DIGEST_PREFIX = "blake2b:"
#: Bytes any index file may have beyond its per-entry bound (see _index_limit).
_INDEX_SLACK = 64 << 20
_FILE_RE = re.compile(r"^scope-[0-9a-f]{16}-[0-9a-f]{8}\.hci$")
#: What a save leaves behind when it is killed: Index.save's and the manifest's temporaries.
#: (Index.save's were `<file>.tmp<pid>` until the sixth session of 2026-12-05, now
#: `.<file>.<16 hex>.tmp`: both are removed.)
_LEFTOVER_RE = re.compile(r"^(scope-[0-9a-f]{16}-[0-9a-f]{8}\.hci\.tmp\d+|"
                          r"\.scope-[0-9a-f]{16}-[0-9a-f]{8}\.hci\.[0-9a-f]{16}\.tmp|"
                          r"manifest\.json\.tmp\d+-[0-9a-f]{8})$")
_SID_RE = re.compile(r"^[0-9a-f]{16}$")
_POSITION_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
_VARIANT_RE = re.compile(r"^[0-9a-f]{16}$")
_U64_MAX = 2**64 - 1
#: Index files no manifest names are removed once this old (seconds): younger ones may be
#: another process's snapshot, written but not yet named by its manifest.
_STALE_AFTER = 600.0
#: The index files each of this process's saves wrote, per folder, latest last: a manifest
#: names only the files of the save that wrote it, so this process's own files older than
#: its previous save are named by no manifest and go at once (the previous save's stay for
#: a reader that read its manifest and is still loading). Only other processes' unnamed
#: files wait for ``_STALE_AFTER``: saves every second kept 600 copies of every index.
_own_saves: dict[Path, list[set[str]]] = {}
_own_saves_mu = threading.Lock()


class SnapshotError(Exception):
    """A snapshot that cannot be used (missing files, corrupt, another configuration)."""


@dataclass
class Loaded:
    """A snapshot read back: each scope's index, each entry's (scope, version), and the
    change-log position they reflect. Nothing of the cache is touched until the caller
    applies it (a cancelled async warm start then leaves nothing behind)."""

    indexes: dict[str, Index]
    where: dict[int, tuple[str, str]]
    position: str


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, which must be a regular file (no symlink, FIFO or device:
    opening those could block or never end) of at most ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) |
                     getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SnapshotError(f"cannot open {path.name}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # (checked on the descriptor: fdopen of a
            # directory raised before the `with` could close it, one descriptor per read)
            raise SnapshotError(f"{path.name} is not a regular file")
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        if st.st_size > limit:
            raise SnapshotError(f"{path.name} has {st.st_size} bytes, more than {limit}")
        # (sized by the file, not the limit: read(limit + 1) reserved the limit up front, a
        # MemoryError for a valid file where the limit passed what the host would grant)
        data = fh.read(min(st.st_size, limit) + 1)
    if len(data) > limit:
        raise SnapshotError(f"{path.name} grew past {limit} bytes while read")
    return data


#: Index file header: "HNSWCACH", u32 major, u32 minor, then u64 dim, metric, M,
#: ef_construction, ... (cpp/src/graph/serialize.cpp). Checked here first so that a crafted
#: header cannot make the native loader allocate for another dimension or degree.
_INDEX_PREFIX = struct.Struct("<8sII4Q")


def _index_limit(core: CacheCore, entries: int, recorded: Any = None) -> int:
    """Bytes an index file of a scope with ``entries`` live entries may have: 8x as many
    slots (dead ones wait for consolidation), each at most its links, row and metadata; or
    the size the manifest records for it. A scope that shrank keeps its slots (freed ones
    are written as zeros): its file outgrew the first bound, and the whole snapshot was
    refused for it."""
    M, dim = core.index_params["M"], core.dim or 0
    per_slot = 17 + 4 * (1 + 2 * M) + 4 * dim + 8 * (1 + M)
    bound = _INDEX_SLACK + 8 * (entries + 1) * per_slot
    if type(recorded) is int and 0 < recorded <= _MAX_INDEX_BYTES:
        bound = max(bound, recorded)
    return bound


def _private_dirs(root: Path, d: Path) -> None:
    """Create the snapshot folders under ``root`` down to ``d``, owner-only (a snapshot
    holds every entry's embedding and id); ``root`` itself is the caller's, left as it is."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in (d.parent, d):
        sub.mkdir(mode=0o700, exist_ok=True)
        try:
            os.chmod(sub, 0o700)  # (mkdir's mode passes the umask; and folders from before)
        except OSError:
            pass  # (another user's folder: saving there fails on its own, with its reason)


def folder(root: str | os.PathLike[str], namespace: str) -> Path:
    """The snapshot folder of ``namespace`` under ``root`` (one subfolder per variant of
    the index settings)."""
    digest = hashlib.blake2b(namespace.encode(), digest_size=8, person=b"hc-snap").hexdigest()
    return Path(root) / digest


def variant_folder(core: CacheCore, root: str | os.PathLike[str], namespace: str,
                   expected: dict[str, Any] | None = None) -> Path:
    """The folder of the snapshot a cache of ``core``'s settings writes and reads
    (``expected``: ``_expected(core)`` if the caller has it already)."""
    settings = _expected(core) if expected is None else expected
    key = json.dumps({"dim": core.dim, **settings}, sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"hc-snapv").hexdigest()
    return folder(root, namespace) / digest


def _check_position(position: Any) -> str:
    """A stream id the server accepts ("<ms>-<seq>", each at most 2^64 - 1), not 0-0."""
    if not isinstance(position, str) or not _POSITION_RE.match(position):
        raise SnapshotError("bad log position")
    if any(int(part) > _U64_MAX for part in position.split("-")):
        raise SnapshotError("bad log position")
    if position == "0-0":
        # (taken before the log had an entry: a read from there cannot tell whether the
        # log was trimmed since, so what the snapshot lacks could be lost)
        raise SnapshotError("taken before the change log had an entry")
    return position


def _expected(core: CacheCore) -> dict[str, Any]:
    """The index settings a snapshot must have been written with (alpha as resolved)."""
    p = core.index_params
    probe = Index(4, M=p["M"], ef_construction=p["ef_construction"], alpha=p["alpha"],
                  auto_consolidate=None)
    return {"M": probe.M, "ef_construction": probe.ef_construction, "alpha": probe.alpha,
            "dtype": core.dtype, "metric": "cosine"}


def save(core: CacheCore, root: str | os.PathLike[str], namespace: str,
         position: str | None = None,
         where: dict[int, tuple[str, str]] | None = None) -> Path:
    """Write the replica of ``core`` as the snapshot of ``namespace``: its entry list
    ``where`` (default: a copy of the replica's) at the log position ``position`` (default:
    the replica's), taken together, with no log batch applied between them, before the
    indexes are written; returns the folder.

    The replica may change while the indexes are written (this process's writes, log
    batches applied by lookups): every such change comes after the saved position, so the
    restart's replay applies it again (applying an event re-reads that entry's state), and
    :func:`load` first drops what the saved indexes and entry list disagree on."""
    position = core.position if position is None else position
    if position is None or core.dim is None:
        raise SnapshotError("nothing to save: the replica has not been loaded")
    expected = _expected(core)
    d = variant_folder(core, root, namespace, expected)
    _private_dirs(Path(root), d)
    token = secrets.token_hex(4)
    if where is None:
        where = dict(core.where)  # (a copy: other threads' lookups add and remove entries)
    by_scope: dict[str, tuple[list[int], list[str]]] = {}
    for i, (eid, (sid, version)) in enumerate(where.items()):
        if not i % _CHUNK:
            time.sleep(0)  # let a lookup waiting for the GIL run (see _json_chunks)
        ids, versions = by_scope.setdefault(sid, ([], []))
        ids.append(eid)
        versions.append(version)
    scopes: list[dict[str, Any]] = []
    files: set[str] = set()
    for sid, idx in list(core.indexes.items()):
        name = f"scope-{sid}-{token}.hci"
        idx.save(d / name)
        os.chmod(d / name, 0o600)  # (embeddings and ids: the owner's only)
        files.add(name)
        ids, versions = by_scope.get(sid, ([], []))
        scopes.append({"sid": sid, "file": name, "bytes": (d / name).stat().st_size,
                       "ids": ids, "versions": versions})
    manifest = {"format": FORMAT, "namespace": namespace, "dim": core.dim,
                "index": expected, "position": position, "written": time.time(),
                "scopes": scopes}
    tmp = d / f"{_MANIFEST}.tmp{os.getpid()}-{token}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.writelines(manifest_text(manifest))
            fh.flush()
            os.fsync(fh.fileno())  # (as the index files: the rename must not come first)
        os.replace(tmp, d / _MANIFEST)
    finally:
        tmp.unlink(missing_ok=True)
    with _own_saves_mu:
        saves = _own_saves.setdefault(d, [])
        saves.append(files)
        superseded = saves[:-2]
        del saves[:-2]
    for names in superseded:
        for name in names:
            try:
                (d / name).unlink(missing_ok=True)
            except OSError:
                pass  # (removed by hand, or the folder's permissions changed: left as is)
    _remove_stale(d, files)
    return d


#: Entries per piece of the manifest's JSON (about 0.25 ms of encoding each).
_CHUNK = 1024


def _json_chunks(manifest: dict[str, Any]) -> Iterator[str]:
    """The manifest's compact JSON text (what ``json.dumps(manifest, separators=(",", ":"))``
    gives) in pieces of ``_CHUNK`` ids or versions, yielding the GIL between them. One
    ``json.dumps`` of 100k entries holds the GIL for ~23 ms, and every lookup of the cache
    waited that long behind a periodic snapshot's thread; between pieces a waiting lookup
    runs at once, not after the interpreter's 5 ms switch interval."""
    dumps = functools.partial(json.dumps, separators=(",", ":"))
    head = {k: v for k, v in manifest.items() if k != "scopes"}
    yield dumps(head)[:-1] + ',"scopes":['
    for n, scope in enumerate(manifest["scopes"]):
        yield ("," if n else "") + dumps({k: v for k, v in scope.items()
                                         if k not in ("ids", "versions")})[:-1]
        for field in ("ids", "versions"):
            values = scope[field]
            yield f',"{field}":['
            for i in range(0, len(values), _CHUNK):
                time.sleep(0)
                yield ("," if i else "") + dumps(values[i:i + _CHUNK])[1:-1]
            yield "]"
        yield "}"
    yield "]}"


def manifest_text(manifest: dict[str, Any]) -> Iterator[str]:
    """The manifest as written: its JSON (in pieces, see :func:`_json_chunks`), then a line
    of its checksum. (A bit flipped in an id passed every check, and the loader then
    dropped the entry from the graph as one the list lacks, in every later save too.)"""
    digest = hashlib.blake2b(digest_size=16)
    for piece in _json_chunks(manifest):
        digest.update(piece.encode())
        yield piece
    yield f"\n{_DIGEST_PREFIX}{digest.hexdigest()}\n"


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """A manifest's JSON object, once its checksum line matches (else SnapshotError)."""
    body, sep, tail = raw.rstrip(b"\n").rpartition(b"\n")
    want = hashlib.blake2b(body, digest_size=16).hexdigest()
    if not sep or tail.decode("ascii", "replace") != _DIGEST_PREFIX + want:
        raise SnapshotError("manifest checksum does not match (damaged, or written by a "
                            "version before 2026-12-05's ninth session)")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotError(f"manifest is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise SnapshotError("manifest is not a JSON object")
    return value


def _remove_stale(d: Path, named: set[str]) -> None:
    """Delete index files not in ``named`` (those of the manifest just written), once old
    enough. (The manifest is not read back: parsing 100k entries' JSON held the GIL ~17 ms.
    Another process's newer manifest names files younger than ``_STALE_AFTER``, which stay.)"""
    now = time.time()
    for f in d.iterdir():
        stale = _FILE_RE.match(f.name) or _LEFTOVER_RE.match(f.name)
        try:
            if stale and f.name not in named and now - f.stat().st_mtime > _STALE_AFTER:
                f.unlink()
        except OSError:
            pass  # (another process removed it first)


def _read_manifest(d: Path) -> dict[str, Any]:
    path = d / _MANIFEST
    try:
        raw = _read_regular(path, _MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise SnapshotError("no snapshot") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from None
    return parse_manifest(raw)


def describe(root: str | os.PathLike[str], namespace: str) -> list[dict[str, Any]]:
    """The snapshots of ``namespace`` under ``root`` (one per variant of the index
    settings, newest first), for ``hnswcache inspect``; read-only, index files are not
    read. A manifest that fails the checks :func:`load` makes before reading index files
    is listed with its ``error``."""
    out = []
    base = folder(root, namespace)
    try:
        variants = sorted(base.iterdir()) if base.is_dir() else []
    except OSError:
        variants = []
    for d in variants:
        if not _VARIANT_RE.match(d.name) or not d.is_dir() or d.is_symlink():
            continue
        info: dict[str, Any] = {"folder": str(d)}
        try:
            m = _read_manifest(d)
            info["position"], checked = _check_manifest(m, namespace)
            written = m.get("written")
            if not isinstance(written, (int, float)) or not 0 <= written < 1e11:
                raise SnapshotError("bad time of writing")
            info.update(entries=sum(len(ids) for _, _, ids, _ in checked),
                        scopes=len(checked), written=float(written), dim=m.get("dim"),
                        index=m.get("index"))
        except SnapshotError as exc:
            if str(exc) == "no snapshot":
                continue
            info = {"folder": str(d), "error": str(exc)}
        size = 0
        for f in d.iterdir():
            try:
                st = f.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
        info["bytes"] = size
        out.append(info)
    out.sort(key=lambda x: -x.get("written", 0.0))
    return out


def _check_manifest(m: dict[str, Any], namespace: str
                    ) -> tuple[str, list[tuple[str, str, list[int], list[str]]]]:
    """The checks of a manifest that need no cache: format, namespace, log position and
    scope list; returns the position and the checked scopes."""
    if m.get("format") != FORMAT:
        raise SnapshotError(f"unknown format {str(m.get('format'))[:40]!r}")
    if m.get("namespace") != namespace:
        raise SnapshotError("written for another namespace")
    position = _check_position(m.get("position"))
    scopes = m.get("scopes")
    if not isinstance(scopes, list):
        raise SnapshotError("bad scope list")
    checked = [_check_scope(x) for x in scopes]
    if len({sid for sid, *_ in checked}) != len(checked):
        raise SnapshotError("a scope is listed twice")
    return position, checked


def _check_scope(s: Any) -> tuple[str, str, list[int], list[str]]:
    if not isinstance(s, dict):
        raise SnapshotError("a scope is not an object")
    sid, name, ids, versions = s.get("sid"), s.get("file"), s.get("ids"), s.get("versions")
    if not isinstance(sid, str) or not _SID_RE.match(sid):
        raise SnapshotError("bad scope id")
    if not isinstance(name, str) or not _FILE_RE.match(name) or sid not in name:
        raise SnapshotError("bad index file name")
    if not isinstance(ids, list) or not isinstance(versions, list) or len(ids) != len(versions):
        raise SnapshotError("bad entry list")
    for i in ids:
        if type(i) is not int or not 0 <= i <= 0x7FFF_FFFF_FFFF_FFFF:
            raise SnapshotError("bad entry id")
    for v in versions:
        if not isinstance(v, str) or not 0 < len(v) <= 64:
            raise SnapshotError("bad entry version")
    return sid, name, ids, versions


def load(core: CacheCore, root: str | os.PathLike[str], namespace: str) -> Loaded:
    """The snapshot of ``namespace``, read and checked (``core`` is not changed). Raises
    :class:`SnapshotError` when there is none or it does not fit: another namespace,
    dimension or index settings, or anything that fails validation."""
    try:
        return _load(core, Path(root), namespace)
    except SnapshotError:
        raise
    except Exception as exc:  # (MemoryError, RuntimeError... from a crafted file)
        raise SnapshotError(f"{type(exc).__name__}: {exc}") from None


def _load(core: CacheCore, root: Path, namespace: str) -> Loaded:
    if core.dim is None:
        raise SnapshotError("the store holds no dimension yet")
    want = _expected(core)
    d = variant_folder(core, root, namespace, want)
    m = _read_manifest(d)
    position, checked = _check_manifest(m, namespace)
    if m.get("dim") != core.dim:
        raise SnapshotError(f"dimension {m.get('dim')!r}, the store's is {core.dim!r}")
    if m.get("index") != want:
        raise SnapshotError(f"index settings {m.get('index')!r}, the cache's are {want!r}")
    indexes: dict[str, Index] = {}
    where: dict[int, tuple[str, str]] = {}
    p = core.index_params
    sizes = {x.get("sid"): x.get("bytes") for x in m["scopes"]}
    for sid, name, ids, versions in checked:
        try:
            data = _read_regular(d / name, _index_limit(core, len(ids), sizes.get(sid)))
        except OSError as exc:
            raise SnapshotError(f"index file {name}: {exc}") from None
        if len(data) < _INDEX_PREFIX.size:
            raise SnapshotError(f"index file {name} is too short")
        magic, _major, _minor, dim, _metric, m_links, efc = _INDEX_PREFIX.unpack_from(data)
        if magic != b"HNSWCACH" or (dim, m_links, efc) != (core.dim, want["M"],
                                                           want["ef_construction"]):
            raise SnapshotError(f"index file {name} is not an index of this cache's settings")
        try:
            idx = Index.from_bytes(data, clock=core.clock)
        except ValueError as exc:
            raise SnapshotError(f"index file {name}: {exc}") from None
        del data
        got = {"M": idx.M, "ef_construction": idx.ef_construction, "alpha": idx.alpha,
               "dtype": idx.dtype, "metric": idx.metric}
        if got != want or idx.dim != core.dim:
            raise SnapshotError(f"index file {name} has other settings: {got!r}")
        idx.ef_search = p["ef_search"]
        core.tune(idx)  # (as the replica's own indexes)
        # The entry list and the graph must agree: an entry only in the graph (written
        # while the save ran) would stay there for ever, as a later delete of an entry the
        # replica does not list is ignored; one only in the list would never be searched.
        # Both come back through the log replay if the store still has them.
        labels = set(idx.labels().tolist())
        listed = dict(zip(ids, versions))
        extra = [lab for lab in labels if lab not in listed]
        if extra:
            idx.delete(extra)
        for eid, version in listed.items():
            if eid in labels:
                if eid in where:  # (an entry's id is its scope's: listed twice is forged, and
                    # a lookup in one scope then deleted it from the other's graph)
                    raise SnapshotError(f"entry {eid:016x} is listed in two scopes")
                where[eid] = (sid, version)
        indexes[sid] = idx
    return Loaded(indexes, where, position)
