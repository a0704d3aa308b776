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

A record's bytes, for the quota, are its compact JSON body plus its serial plus a fixed per-row
overhead (``charged_bytes``); both stores charge the same, so quota behaviour is one contract. The
store logs ``store_full`` when a commit first has to drop records and ``store_drained`` once usage
is back under ``DRAINED_FRACTION`` of both caps (``QuotaAlarm``), never once per dropped record.

Checkpoints are opaque bytes by key (the edge core's per-pack estimator state), written in the
same transaction as the records of the same ``commit`` call, so a crash never separates them.
Meta is a small key → text map for runtime state (counter snapshots for ``status``).

A store given a ``Metrics`` counts ``records_committed_total{kind}``, ``records_acked_total``,
``records_dropped_total{reason}`` and ``records_dead_lettered_total{reason}`` itself; callers
must not count those again; ``stats()`` has the same figures, exact over the store's life.
Every method raises ``StoreError`` once the store is closed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from gateway.model import Record, StoredRecord

#: Bytes charged per stored record on top of its JSON body and serial. Measured on the SQLite
#: store: a row with its two index entries costs about 62 bytes beyond body and serial.
ROW_OVERHEAD_BYTES = 64

#: After ``store_full``, the store reports ``store_drained`` once both its record count and its
#: byte figure are at or below this fraction of their caps; the gap stops it flapping at the cap.
DRAINED_FRACTION = 0.9


def encode_body(body: Mapping[str, Any]) -> str:
    """A record body as compact JSON text: what the SQLite store keeps and the quota charges.

    ASCII-only output, so its length in characters is its length in bytes. NaN and infinities
    raise ``ValueError``: the model forbids them (absent figures are left out or None), and JSON
    has no spelling for them that a consumer could parse.
    """
    return json.dumps(body, separators=(",", ":"), allow_nan=False)


def charged_bytes(serial: str, body_text: str) -> int:
    """Bytes one record is charged against ``max_bytes``."""
    return len(body_text) + len(serial.encode()) + ROW_OVERHEAD_BYTES


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
    #: ``committed_total`` by kind, so a consumer can check per kind what arrived (quota drops
    #: telemetry first: the health and events it committed must all arrive)
    committed_by_kind: Mapping[str, int] = field(default_factory=dict)
    #: ``dead_letters`` by reason
    dead_lettered_by_reason: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record refused for good, kept with the reason.

    ``body`` is the stored JSON text verbatim; ``kind`` and ``serial`` are text as stored. They are
    not decoded into a ``StoredRecord`` because a row whose bytes rotted on disk is dead-lettered
    too (reason ``undecodable``) and must still be listable.
    """

    seq: int
    serial: str
    kind: str
    ts: float
    attempts: int
    body: str
    reason: str


class QuotaAlarm:
    """Logs a store's transitions into "full" and back out, once each.

    Not thread-safe on its own: each store calls it under its own lock.
    """

    __slots__ = ("_dropped", "_full")

    def __init__(self) -> None:
        self._full = False
        self._dropped = 0

    def dropped(self, n: int, *, records: int, bytes_: int, max_records: int,
                max_bytes: int) -> None:
        """``n`` records were just dropped for quota; usage is what remains after the drop."""
        if n <= 0:
            return
        self._dropped += n
        if not self._full:
            self._full = True
            structlog.get_logger(__name__).warning(
                "store_full", dropped=n, records=records, bytes=bytes_,
                max_records=max_records, max_bytes=max_bytes)

    def settle(self, *, records: int, bytes_: int, max_records: int, max_bytes: int) -> None:
        """Records left the store (ack, reject): report "drained" once usage is low enough."""
        if (self._full and records <= DRAINED_FRACTION * max_records
                and bytes_ <= DRAINED_FRACTION * max_bytes):
            structlog.get_logger(__name__).info(
                "store_drained", dropped_while_full=self._dropped, records=records,
                bytes=bytes_)
            self._full = False
            self._dropped = 0


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

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead-lettered record, oldest seq first."""
        ...

    def checkpoint(self, key: str) -> bytes | None: ...

    def checkpoints(self) -> dict[str, bytes]: ...

    def put_meta(self, key: str, value: str) -> None: ...

    def get_meta(self, key: str) -> str | None: ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None:
        """Idempotent."""
        ...
