"""An in-memory store with the same contract as the SQLite store (see ``gateway.store.base``).

Nothing here survives the process: it serves tests and `--store memory` dry runs. The contract
suite in tests/ runs against both implementations.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.model import KIND_PRIORITY, Record, StoredRecord
from gateway.store.base import DeadLetter, QuotaAlarm, StoreStats, charged_bytes, encode_body


def record_size(record: Record | StoredRecord) -> int:
    """Bytes a record is charged against the quota (see ``gateway.store.base.charged_bytes``)."""
    return charged_bytes(record.serial, encode_body(record.body))


class MemoryStore:
    def __init__(self, *, max_bytes: int = 1 << 62, max_records: int = 1 << 62,
                 metrics: Metrics | None = None) -> None:
        self._lock = threading.Lock()
        self._max_bytes = max_bytes
        self._max_records = max_records
        self._metrics = metrics if metrics is not None else Metrics()
        self._alarm = QuotaAlarm()
        self._records: dict[int, StoredRecord] = {}
        self._sizes: dict[int, int] = {}
        self._leased: set[int] = set()
        self._dead: dict[int, DeadLetter] = {}
        self._checkpoints: dict[str, bytes] = {}
        self._meta: dict[str, str] = {}
        self._last_seq = 0
        self._bytes = 0
        self._committed: dict[str, int] = {}
        self._acked = 0
        self._dropped: dict[str, int] = {}
        self._dead_by_reason: dict[str, int] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the in-memory store is closed")

    def commit(self, records: Sequence[Record],
               checkpoints: Mapping[str, bytes] | None = None) -> list[int]:
        # Encoded first, so a body the model forbids (NaN) fails the call before anything changes.
        sizes = [record_size(record) for record in records]
        with self._lock:
            self._check_open()
            seqs: list[int] = []
            for record, size in zip(records, sizes, strict=True):
                self._last_seq += 1
                stored = StoredRecord(self._last_seq, record.serial, record.kind, record.ts,
                                      dict(record.body))
                self._records[stored.seq] = stored
                self._sizes[stored.seq] = size
                self._bytes += size
                seqs.append(stored.seq)
            for kind, n in Counter(record.kind.value for record in records).items():
                self._committed[kind] = self._committed.get(kind, 0) + n
                self._metrics.inc("records_committed_total", n, label=kind)
            self._checkpoints.update(checkpoints or {})
            self._enforce_quota()
            return seqs

    def _enforce_quota(self) -> None:
        if len(self._records) <= self._max_records and self._bytes <= self._max_bytes:
            return
        # Drop order: lowest priority kind first, oldest first within a kind; leased records stay.
        order = sorted((s for s in self._records if s not in self._leased),
                       key=lambda s: (KIND_PRIORITY[self._records[s].kind], s))
        dropped = 0
        for victim in order:
            if len(self._records) <= self._max_records and self._bytes <= self._max_bytes:
                break
            self._remove(victim)
            dropped += 1
        if not dropped:
            return  # everything droppable is leased: over quota until acks make room
        self._dropped["quota"] = self._dropped.get("quota", 0) + dropped
        self._metrics.inc("records_dropped_total", dropped, label="quota")
        self._alarm.dropped(dropped, records=len(self._records), bytes_=self._bytes,
                            max_records=self._max_records, max_bytes=self._max_bytes)

    def _settle(self) -> None:
        self._alarm.settle(records=len(self._records), bytes_=self._bytes,
                           max_records=self._max_records, max_bytes=self._max_bytes)

    def _remove(self, seq: int) -> StoredRecord:
        record = self._records.pop(seq)
        self._bytes -= self._sizes.pop(seq)
        self._leased.discard(seq)
        return record

    def lease(self, limit: int) -> list[StoredRecord]:
        with self._lock:
            self._check_open()
            out: list[StoredRecord] = []
            for seq in sorted(self._records):
                if len(out) >= limit:
                    break
                if seq not in self._leased:
                    self._leased.add(seq)
                    out.append(self._records[seq])
            return out

    def ack(self, seqs: Iterable[int]) -> int:
        with self._lock:
            self._check_open()
            n = 0
            for seq in seqs:
                if seq in self._records:
                    self._remove(seq)
                    n += 1
            self._acked += n
            self._metrics.inc("records_acked_total", n)
            self._settle()
            return n

    def retry(self, seqs: Iterable[int]) -> None:
        with self._lock:
            self._check_open()
            for seq in seqs:
                record = self._records.get(seq)
                if record is None:
                    continue
                self._leased.discard(seq)
                self._records[seq] = StoredRecord(record.seq, record.serial, record.kind,
                                                  record.ts, record.body, record.attempts + 1)

    def reject(self, seqs: Iterable[int], reason: str) -> None:
        with self._lock:
            self._check_open()
            n = 0
            for seq in seqs:
                if seq in self._records:
                    record = self._remove(seq)
                    self._dead[seq] = DeadLetter(record.seq, record.serial, record.kind.value,
                                                 record.ts, record.attempts,
                                                 encode_body(record.body), reason)
                    n += 1
            if n:
                self._dead_by_reason[reason] = self._dead_by_reason.get(reason, 0) + n
            self._metrics.inc("records_dead_lettered_total", n, label=reason)
            self._settle()

    def release_all(self) -> None:
        with self._lock:
            self._check_open()
            self._leased.clear()

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            self._check_open()
            return [self._dead[s] for s in sorted(self._dead)]

    def checkpoint(self, key: str) -> bytes | None:
        with self._lock:
            self._check_open()
            return self._checkpoints.get(key)

    def checkpoints(self) -> dict[str, bytes]:
        with self._lock:
            self._check_open()
            return dict(self._checkpoints)

    def put_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._check_open()
            self._meta[key] = value

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            self._check_open()
            return self._meta.get(key)

    def stats(self) -> StoreStats:
        with self._lock:
            self._check_open()
            oldest = min((r.ts for r in self._records.values()), default=None)
            return StoreStats(records=len(self._records), bytes=self._bytes,
                              oldest_unsent_ts=oldest,
                              committed_total=sum(self._committed.values()),
                              acked_total=self._acked, dropped_total=dict(self._dropped),
                              dead_letters=len(self._dead), last_seq=self._last_seq,
                              committed_by_kind=dict(self._committed),
                              dead_lettered_by_reason=dict(self._dead_by_reason))

    def close(self) -> None:
        with self._lock:
            self._leased.clear()
            self._closed = True
