"""The real store against a plain list model, driven by a hypothesis state machine.

Steps: commit (with checkpoints), bursts that push the store over its quota, lease, ack, retry,
reject, release_all, and close-without-ack-then-reopen (the SQLite store only: leases are not
durable, everything else is). After every step the store's stats, checkpoints and dead letters
must equal the model's, and every lease must hand out exactly the model's next records.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gateway.model import KIND_PRIORITY, Record, RecordKind
from gateway.store.base import Store, encode_body
from gateway.store.memory import MemoryStore, record_size
from gateway.store.sqlite import SqliteStore

KINDS = list(RecordKind)


@dataclass
class Row:
    """The model's view of one stored record."""

    seq: int
    kind: RecordKind
    ts: float
    body: dict[str, Any]
    size: int
    attempts: int = 0


class StoreMachine(RuleBasedStateMachine):
    durable = True  # which store: SqliteStore, or MemoryStore

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="store-model-"))
        self.store: Store | None = None
        self.max_records = 0
        self.max_bytes = 0
        self.rows: list[Row] = []  # stored, oldest seq first
        self.leased: set[int] = set()
        self.dead: list[tuple[int, str, str]] = []  # seq, reason, body as stored
        self.checkpoints: dict[str, bytes] = {}
        self.last_seq = 0
        self.committed = 0
        self.committed_by_kind: dict[str, int] = {}
        self.acked = 0
        self.dropped = 0

    def open_store(self) -> Store:
        if self.durable:
            return SqliteStore(self.folder / "store.sqlite", max_bytes=self.max_bytes,
                               max_records=self.max_records)
        return MemoryStore(max_bytes=self.max_bytes, max_records=self.max_records)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- the model ------------------------------------------------------------------------

    def model_commit(self, kinds: list[RecordKind], pad: int) -> list[Record]:
        records = []
        for i, kind in enumerate(kinds):
            seq = self.last_seq + 1 + i
            # ts not in seq order, so oldest_unsent_ts means min(ts), not the lowest seq's ts
            record = Record("PACK-1", kind, float((seq * 37) % 101), {"seq": seq, "pad": "x" * pad})
            records.append(record)
            self.rows.append(Row(seq, kind, record.ts, dict(record.body), record_size(record)))
        self.last_seq += len(kinds)
        self.committed += len(kinds)
        for kind in kinds:
            self.committed_by_kind[kind.value] = self.committed_by_kind.get(kind.value, 0) + 1
        while (len(self.rows) > self.max_records
               or sum(r.size for r in self.rows) > self.max_bytes):
            unleased = [r for r in self.rows if r.seq not in self.leased]
            if not unleased:
                break
            self.rows.remove(min(unleased, key=lambda r: (KIND_PRIORITY[r.kind], r.seq)))
            self.dropped += 1
        return records

    def stored(self, seq: int) -> Row | None:
        return next((r for r in self.rows if r.seq == seq), None)

    def seqs_to_resolve(self, data: st.DataObject) -> list[int]:
        """Mostly leased seqs; sometimes one already gone or never handed out."""
        pool = [*sorted(self.leased), self.last_seq + 1000]
        if self.last_seq:
            pool.append(1 + self.last_seq // 2)
        return data.draw(st.lists(st.sampled_from(pool), max_size=6))

    # -- rules ----------------------------------------------------------------------------

    @initialize(max_records=st.integers(3, 25), max_bytes=st.integers(300, 3000))
    def open(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.store = self.open_store()

    @rule(kinds=st.lists(st.sampled_from(KINDS), max_size=8), pad=st.integers(0, 60),
          checkpoint=st.binary(max_size=6))
    def commit(self, kinds: list[RecordKind], pad: int, checkpoint: bytes) -> None:
        assert self.store is not None
        first = self.last_seq + 1
        records = self.model_commit(kinds, pad)
        self.checkpoints[f"pack/{len(kinds) % 3}"] = checkpoint
        seqs = self.store.commit(records, {f"pack/{len(kinds) % 3}": checkpoint})
        assert seqs == list(range(first, first + len(kinds)))

    @rule(kinds=st.lists(st.sampled_from(KINDS), min_size=10, max_size=30))
    def burst_over_quota(self, kinds: list[RecordKind]) -> None:
        assert self.store is not None
        self.store.commit(self.model_commit(kinds, 20))

    @rule(limit=st.integers(0, 8))
    def lease(self, limit: int) -> None:
        assert self.store is not None
        expected = [r for r in self.rows if r.seq not in self.leased][:limit]
        got = self.store.lease(limit)
        assert [(r.seq, r.kind, r.ts, dict(r.body), r.attempts) for r in got] == [
            (r.seq, r.kind, r.ts, r.body, r.attempts) for r in expected]
        self.leased.update(r.seq for r in expected)

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        assert self.store is not None
        seqs = self.seqs_to_resolve(data)
        gone = [row for seq in set(seqs) if (row := self.stored(seq)) is not None]
        for row in gone:
            self.rows.remove(row)
        self.leased.difference_update(seqs)
        self.acked += len(gone)
        assert self.store.ack(seqs) == len(gone)

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        assert self.store is not None
        seqs = self.seqs_to_resolve(data)
        for seq in seqs:  # a seq named twice counts two attempts
            row = self.stored(seq)
            if row is not None:
                row.attempts += 1
        self.leased.difference_update(seqs)
        self.store.retry(seqs)

    @rule(data=st.data(), reason=st.sampled_from(["payload_too_large", "invalid_topic"]))
    def reject(self, data: st.DataObject, reason: str) -> None:
        assert self.store is not None
        seqs = self.seqs_to_resolve(data)
        for seq in sorted(set(seqs)):
            row = self.stored(seq)
            if row is not None:
                self.rows.remove(row)
                self.dead.append((seq, reason, encode_body(row.body)))
        self.leased.difference_update(seqs)
        self.store.reject(seqs, reason)

    @rule()
    def release_all(self) -> None:
        assert self.store is not None
        self.leased.clear()
        self.store.release_all()

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def stats_match_the_model(self) -> None:
        if self.store is None:
            return
        stats = self.store.stats()
        assert stats.records == len(self.rows)
        assert stats.bytes == sum(r.size for r in self.rows)
        assert stats.oldest_unsent_ts == min((r.ts for r in self.rows), default=None)
        assert stats.committed_total == self.committed
        assert stats.acked_total == self.acked
        assert stats.dropped_total == ({"quota": self.dropped} if self.dropped else {})
        assert stats.dead_letters == len(self.dead)
        assert stats.last_seq == self.last_seq
        assert stats.committed_by_kind == self.committed_by_kind
        reasons: dict[str, int] = {}
        for _, reason, _ in self.dead:
            reasons[reason] = reasons.get(reason, 0) + 1
        assert stats.dead_lettered_by_reason == reasons
        # every seq handed out is stored, acked, dropped or dead, exactly once
        assert self.committed == len(self.rows) + self.acked + self.dropped + len(self.dead)

    @invariant()
    def checkpoints_and_dead_letters_match(self) -> None:
        if self.store is None:
            return
        assert self.store.checkpoints() == self.checkpoints
        dead = self.store.dead_letters()
        assert [(d.seq, d.reason, d.body) for d in dead] == sorted(self.dead)


class SqliteStoreMachine(StoreMachine):
    durable = True

    @rule()
    def close_without_acks_and_reopen(self) -> None:
        assert self.store is not None
        self.store.close()
        self.leased.clear()
        self.store = self.open_store()


class MemoryStoreMachine(StoreMachine):
    durable = False


BOUNDED = settings(max_examples=40, stateful_step_count=35, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

TestSqliteStoreAgainstModel = SqliteStoreMachine.TestCase
TestSqliteStoreAgainstModel.settings = BOUNDED
TestMemoryStoreAgainstModel = MemoryStoreMachine.TestCase
TestMemoryStoreAgainstModel.settings = BOUNDED
