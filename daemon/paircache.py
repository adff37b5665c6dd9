"""The FOV-pair cache of :mod:`qc.stitching`, backed by the store's key-value table.

Implements the ``PairCache`` protocol (``get``/``put`` plus the batch forms)
on the ``kv`` table, namespace ``pairs``, so a re-run of QC on the same tiles
computes no pair, and a set that gained tiles computes only the new pairs,
across service restarts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from daemon.store import Store

__all__ = ["NAMESPACE", "StorePairCache"]

NAMESPACE = "pairs"


class StorePairCache:
    """``PairCache`` on a :class:`Store` (thread-safe: the store serialises access)."""

    def __init__(self, store: Store, namespace: str = NAMESPACE) -> None:
        self.store = store
        self.namespace = namespace

    def get(self, key: str) -> bytes | None:
        return self.store.kv_get(self.namespace, key)

    def put(self, key: str, value: bytes) -> None:
        self.store.kv_put(self.namespace, key, value)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        return self.store.kv_get_many(self.namespace, list(keys))

    def put_many(self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        self.store.kv_put_many(self.namespace, list(pairs))

    def __len__(self) -> int:
        return self.store.kv_count(self.namespace)
