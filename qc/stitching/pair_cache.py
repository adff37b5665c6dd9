"""The incremental cache of FOV-pair registrations, as an interface.

:mod:`qc` never opens a database: :func:`qc.stitching.evaluate_stitching`
receives any object with ``get``/``put`` (the :class:`PairCache` protocol);
the service backs it with SQLite, tests and notebooks use
:class:`MemoryPairCache`.

Two kinds of entries share the key space, told apart by prefix:

``digest:<sha256 of the tile identity>``
    A tile's content digest (ASCII hex), memoised under its cheap identity
    (path, size, mtime...) so that a warm run hashes no pixels.
``pair:<sha256 of the pair's inputs>``
    One pair's registration (compact JSON), keyed by both tiles' content
    digests, the direction, the whole-pixel nominal offset the overlap was
    cut at, every parameter that changes a pair's result, and the pair
    algorithm's version (:func:`pair_key`). Scoring thresholds are not part
    of the key: changing them re-scores cached pairs without recomputing.

Entries are immutable facts about content: a key, once written, never needs
a different value, so implementations may keep them for as long as they like
and evict in any order.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from qc.io.model import file_identity

__all__ = [
    "MemoryPairCache",
    "PairCache",
    "cache_get_many",
    "cache_put_many",
    "digest_key",
    "memoised_file_digests",
    "pair_key",
]


@runtime_checkable
class PairCache(Protocol):
    """Key-value storage for pair results and tile digests.

    Implementations must be safe to call from several threads. ``get_many``
    and ``put_many`` are optional batch forms (used when present: one
    transaction for hundreds of keys); :func:`cache_get_many` and
    :func:`cache_put_many` fall back to the single forms.
    """

    def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or ``None``."""
        ...

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (overwriting is allowed)."""
        ...


class MemoryPairCache:
    """A thread-safe in-memory :class:`PairCache` (a dict), with hit counters."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.gets = 0
        self.hits = 0
        self.puts = 0

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self.gets += 1
            value = self._data.get(key)
            if value is not None:
                self.hits += 1
            return value

    def put(self, key: str, value: bytes) -> None:
        if not isinstance(value, bytes):
            msg = f"cache values are bytes, got {type(value).__name__} for key {key!r}"
            raise TypeError(msg)
        with self._lock:
            self.puts += 1
            self._data[key] = value

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Values of the keys that are present."""
        with self._lock:
            out = {}
            for k in keys:
                self.gets += 1
                v = self._data.get(k)
                if v is not None:
                    self.hits += 1
                    out[k] = v
            return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        for k, v in items.items():
            self.put(k, v)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._data)

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


def cache_get_many(cache: PairCache, keys: Iterable[str]) -> dict[str, bytes]:
    """Batch get through ``cache.get_many`` when it exists, else one by one."""
    keys = list(keys)
    if not keys:
        return {}
    getter = getattr(cache, "get_many", None)
    if callable(getter):
        return dict(getter(keys))
    out = {}
    for k in keys:
        v = cache.get(k)
        if v is not None:
            out[k] = v
    return out


def cache_put_many(cache: PairCache, items: Mapping[str, bytes]) -> None:
    """Batch put through ``cache.put_many`` when it exists, else one by one."""
    if not items:
        return
    putter = getattr(cache, "put_many", None)
    if callable(putter):
        putter(dict(items))
        return
    for k, v in items.items():
        cache.put(k, v)


def digest_key(identity: str) -> str:
    """Cache key under which a tile's content digest is memoised."""
    return "digest:" + hashlib.sha256(identity.encode("utf-8")).hexdigest()


def memoised_file_digests(cache: PairCache, paths: Iterable[Path]) -> dict[Path, str]:
    """The SHA-256 (hex) of each tile file whose digest the cache memoised under the file's identity now.

    Live QC and the stitching memoise every tile file's digest under
    :func:`qc.io.file_identity` (path, size, modification time); a file that
    changed since has another identity and is left out, as are files never
    read as tiles. One batch for all paths.
    """
    keys: dict[Path, str] = {}
    for p in paths:
        try:
            keys[p] = digest_key(file_identity(p))
        except OSError:
            continue  # gone or unreadable: the caller's own hashing says so
    found = cache_get_many(cache, keys.values())
    return {p: found[k].decode("ascii") for p, k in keys.items() if k in found}


def pair_key(
    digest_a: str,
    digest_b: str,
    direction: str,
    nominal_offset: tuple[int, int],
    params: Mapping[str, object],
    version: str,
) -> str:
    """Cache key of one pair registration.

    Parameters
    ----------
    digest_a, digest_b : str
        Content digests of the reference tile (left/top) and its neighbour.
    direction : str
        ``"right"`` or ``"down"``.
    nominal_offset : (int, int)
        Whole-pixel nominal offset of tile B from tile A at which the
        overlap was cut, ``(dx, dy)``.
    params : mapping
        Every parameter that changes the pair's result (JSON-serialisable).
    version : str
        The pair algorithm's version.
    """
    payload = json.dumps(
        [
            version,
            digest_a,
            digest_b,
            direction,
            [int(nominal_offset[0]), int(nominal_offset[1])],
            dict(sorted(params.items())),
        ],
        separators=(",", ":"),
        sort_keys=True,
        default=str,
    )
    return "pair:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()
