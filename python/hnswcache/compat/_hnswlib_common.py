"""What the hnswlib face shares: hnswlib's error messages, argument conversion as pybind11
does it, the file container of this package and readers of hnswlib's own file formats."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("hnswcache.compat.hnswlib")

_SPACES = ("l2", "ip", "cosine")
_MAX_LABEL = int(np.iinfo(np.int64).max) - 1  # the core's largest label

_E_SPACE = "Space name must be one of l2, ip, or cosine."
_E_NOT_INIT = "Index is not initialized: call init_index() or load_index() first"
_E_INITED = "The index is already initiated."
_E_DIM = "Wrong dimensionality of the vectors"
_E_FULL = "The number of elements exceeds the specified limit"
_E_FEW = "Cannot return the results in a contiguous 2D array. Probably ef or M is too small"
_E_NOT_FOUND = "Label not found"
_E_DELETED = "The requested to delete element is already deleted"
_E_NOT_DELETED = "The requested to undelete element is not deleted"
_E_NO_REPLACE = "Replacement of deleted elements is disabled in constructor"
_E_UPDATE_DELETED = (
    "Can't use addPoint to update deleted elements if replacement of deleted elements is enabled."
)
_E_RESIZE = "Cannot resize, max element is less than the current number of elements"
_E_CORRUPT = "Index seems to be corrupted or unsupported"

_MAGIC_HNSW = b"HNSWCACHE-COMPAT-HNSW\x00"
_MAGIC_BF = b"HNSWCACHE-COMPAT-BF\x00\x00\x00"
_FORMAT_VERSION = 1

Filter = Callable[[int], bool]
F32 = npt.NDArray[np.float32]
U64 = npt.NDArray[np.uint64]


# ---------------------------------------------------------------------- argument conversion
def _check_space(space: str) -> str:
    if space not in _SPACES:
        raise RuntimeError(_E_SPACE)
    return space


def _as_data(data: Any, dim: int) -> F32:
    """hnswlib's ``py::array_t<float, forcecast>`` plus its shape checks: ``(rows, dim)``."""
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim not in (1, 2):
        raise RuntimeError(
            f"Input vector data wrong shape. Number of dimensions {arr.ndim}. "
            "Data must be a 1D or 2D array."
        )
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.shape[1] != dim:
        raise RuntimeError(_E_DIM)
    return np.ascontiguousarray(arr)


def _normalized(x: F32) -> F32:
    """hnswlib's ``normalize_vector``: ``x / (|x| + 1e-30)`` (a zero vector stays zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    inv = np.float32(1.0) / (norms + np.float32(1e-30))
    return np.ascontiguousarray(x * inv[:, None], dtype=np.float32)


def _as_label_array(ids: Any) -> npt.NDArray[np.int64]:
    """Labels as hnswlib reads them (``py::array_t<size_t, forcecast>``), any shape."""
    arr = np.array(ids, dtype=np.uint64)  # negative Python ints raise OverflowError here
    if arr.size and int(arr.max()) > _MAX_LABEL:
        raise OverflowError("hnswcache labels must be below 2**63 - 1")
    return arr.astype(np.int64)


def _as_ids(ids: Any, rows: int) -> npt.NDArray[np.int64] | None:
    if ids is None:
        return None
    arr = _as_label_array(ids)
    if not ((arr.ndim == 1 and arr.shape[0] == rows) or (arr.ndim == 0 and rows == 1)):
        raise RuntimeError(
            f"The input label shape {arr.ndim} does not match the input data vector shape {rows}"
        )
    return arr.reshape(-1)


def _as_label(label: Any, method: str) -> int:
    """One label, as pybind11 converts a ``size_t`` argument (no floats, no negatives)."""
    if isinstance(label, (bool, float)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"{method}(): incompatible function arguments: label must be an int")
    value = int(label)
    if value < 0:
        raise TypeError(f"{method}(): incompatible function arguments: label must be >= 0")
    if value > _MAX_LABEL:
        raise OverflowError("hnswcache labels must be below 2**63 - 1")
    return value


def _as_size(value: Any, method: str, name: str) -> int:
    """A ``size_t`` argument as hnswlib's binding takes it (a TypeError otherwise, as
    pybind11's cast; 2**64 was accepted here and failed later, at a query)."""
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{method}(): incompatible function arguments: {name} must be an int")
    if not 0 <= int(value) < 2**64:
        raise TypeError(f"{method}(): incompatible function arguments: {name} must be in "
                        "[0, 2**64)")
    return int(value)


def _as_threads(value: Any, method: str) -> int:
    """An ``int`` argument as hnswlib's binding takes it (C int)."""
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{method}(): incompatible function arguments: num_threads must be int")
    if not -2**31 <= int(value) < 2**31:
        raise TypeError(f"{method}(): incompatible function arguments: num_threads must "
                        "fit a C int")
    return int(value)


def _last_occurrence(labels: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
    """Row indices keeping the last row of each label, in row order."""
    _, first_in_reversed = np.unique(labels[::-1], return_index=True)
    return np.sort(labels.shape[0] - 1 - first_in_reversed)


def _empty_result(rows: int, k: int) -> tuple[U64, F32]:
    return np.empty((rows, k), dtype=np.uint64), np.empty((rows, k), dtype=np.float32)


def _default_threads() -> int:
    return os.cpu_count() or 1


# ---------------------------------------------------------------------- file container
def _pack(magic: bytes, header: dict[str, Any], blobs: list[bytes]) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    out = io.BytesIO()
    out.write(magic)
    out.write(struct.pack("<IQ", _FORMAT_VERSION, len(head)))
    out.write(head)
    for blob in blobs:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
    return out.getvalue()


def _unpack(magic: bytes, data: bytes, nblobs: int) -> tuple[dict[str, Any], list[bytes]]:
    try:
        pos = len(magic)
        version, hlen = struct.unpack_from("<IQ", data, pos)
        if version > _FORMAT_VERSION:
            raise RuntimeError(f"{_E_CORRUPT}: format version {version} is newer than this one")
        pos += 12
        header = json.loads(data[pos : pos + hlen])
        pos += hlen
        blobs = []
        for _ in range(nblobs):
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8
            if pos + n > len(data):
                raise ValueError("truncated")
            blobs.append(data[pos : pos + n])
            pos += n
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise RuntimeError(f"{_E_CORRUPT}: {exc}") from exc
    if not isinstance(header, dict):
        raise RuntimeError(_E_CORRUPT)
    return header, blobs


def _read_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise RuntimeError("Cannot open file") from exc


def _write_file(path: str | os.PathLike[str], data: bytes) -> None:
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise RuntimeError(f"Cannot open file {os.fspath(path)!r} for writing: {exc}") from exc


def _read_hnswlib_file(
    data: bytes, dim: int
) -> tuple[dict[str, int], npt.NDArray[np.int64], F32, npt.NDArray[np.bool_]]:
    """Parse a file written by hnswlib's ``HierarchicalNSW::saveIndex``.

    Returns the header (``max_elements``, ``M``, ``ef_construction``), and per element the
    label, the stored vector and the deleted mark. The graph itself is not reused.
    """
    try:
        (offset_level0, max_elements, count, size_data, label_offset, offset_data) = (
            struct.unpack_from("<6Q", data, 0)
        )
        _maxlevel, _entry = struct.unpack_from("<iI", data, 48)
        _max_m, _max_m0, m, _mult, ef_construction = struct.unpack_from("<3QdQ", data, 56)
    except struct.error as exc:
        raise RuntimeError(_E_CORRUPT) from exc
    body = 96
    if (
        offset_level0 != 0
        or count > max_elements
        or label_offset != offset_data + 4 * dim
        or size_data != label_offset + 8
        or body + count * size_data > len(data)
    ):
        raise RuntimeError(
            f"{_E_CORRUPT} (not an hnswlib file of dimension {dim}, or damaged)"
        )
    rows = np.frombuffer(data, dtype=np.uint8, count=count * size_data, offset=body)
    rows = rows.reshape(count, size_data)
    vectors = np.ascontiguousarray(rows[:, offset_data:label_offset]).view(np.float32)
    labels = np.ascontiguousarray(rows[:, label_offset : label_offset + 8]).view(np.uint64)
    deleted = (rows[:, 2] & 1).astype(bool)
    lab = labels.reshape(-1)
    if lab.size and int(lab.max()) > _MAX_LABEL:
        raise OverflowError("hnswcache labels must be below 2**63 - 1")
    header = {"max_elements": max_elements, "M": m, "ef_construction": ef_construction}
    return header, lab.astype(np.int64), vectors.reshape(count, dim).copy(), deleted


def _read_hnswlib_bf_file(data: bytes, dim: int) -> tuple[int, npt.NDArray[np.int64], F32]:
    """Parse a file written by hnswlib's ``BruteforceSearch::saveIndex``."""
    try:
        max_elements, size_per_element, count = struct.unpack_from("<3Q", data, 0)
    except struct.error as exc:
        raise RuntimeError(_E_CORRUPT) from exc
    size = 24 + count * size_per_element
    if size_per_element != 4 * dim + 8 or count > max_elements or size > len(data):
        raise RuntimeError(f"{_E_CORRUPT} (not an hnswlib file of dimension {dim}, or damaged)")
    rows = np.frombuffer(data, dtype=np.uint8, count=count * size_per_element, offset=24)
    rows = rows.reshape(count, size_per_element)
    vectors = np.ascontiguousarray(rows[:, : 4 * dim]).view(np.float32).reshape(count, dim)
    labels = np.ascontiguousarray(rows[:, 4 * dim :]).view(np.uint64).reshape(-1)
    if labels.size and int(labels.max()) > _MAX_LABEL:
        raise OverflowError("hnswcache labels must be below 2**63 - 1")
    return int(max_elements), labels.astype(np.int64), vectors.copy()
