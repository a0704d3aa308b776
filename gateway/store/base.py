"""The store contract, shared by the SQLite store and the in-memory store.

Life of a record: ``commit`` gives it a ``seq`` (monotonic, never reused, even after the newest
record is deleted and the store reopened). ``lease`` hands out records that are not leased yet,
oldest ``seq`` first; a leased record stays stored until it is resolved:

- ``ack``: the broker accepted it (PUBACK reason code < 0x80) → deleted, ``records_acked_total``;
- ``retry``: not delivered this time → lease released, ``attempts`` + 1, leased again later;
- ``reject``: refused for good (payload too large, invalid topic) → moved to the dead-letter table,
  ``records_dead_lettered_total{reason}``.

Leases are not durable: after ``close`` and reopen (or a crash) every stored record is leasable.
Quota: when a commit would take the store over ``max_bytes`` or ``max_records``, the oldest records
of the lowest priority kind (telemetry, then health, then events; see ``KIND_PRIORITY``) that are
not leased are deleted first and counted in ``records_dropped_total{reason="quota"}``.

Checkpoints are opaque bytes by key (the edge core's per-pack estimator state), written in the
same transaction as the records of the same ``commit`` call, so a crash never separates them.
Meta is a small key → text map for runtime state (counter snapshots for ``status``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.model import Record, StoredRecord


@dataclass(frozen=True, slots=True)
class StoreStats:
    records: int
    bytes: int
    oldest_unsent_ts: float | None
    committed_total: int
    acked_total: int
    dropped_total: Mapping[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    last_seq: int = 0


class Store(Protocol):
    def commit(self, records: Sequence[Record],
               checkpoints: Mapping[str, bytes] | None = None) -> list[int]:
        """Durably store records (and checkpoints) in one transaction; return their seqs."""
        ...

    def lease(self, limit: int) -> list[StoredRecord]:
        """Up to ``limit`` unleased records, oldest seq first, now leased."""
        ...

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged records; return how many were still stored."""
        ...

    def retry(self, seqs: Iterable[int]) -> None:
        """Release leases without deleting; attempts + 1."""
        ...

    def reject(self, seqs: Iterable[int], reason: str) -> None:
        """Move records refused for good into the dead-letter table."""
        ...

    def release_all(self) -> None:
        """Release every lease (the publisher lost its connection)."""
        ...

    def checkpoint(self, key: str) -> bytes | None: ...

    def checkpoints(self) -> dict[str, bytes]: ...

    def put_meta(self, key: str, value: str) -> None: ...

    def get_meta(self, key: str) -> str | None: ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None:
        """Idempotent."""
        ...
