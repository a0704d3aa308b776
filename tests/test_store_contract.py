"""One store contract (gateway.store.base), run against every implementation.

MemoryStore, and SqliteStore on a real file in tmp_path. What only the durable store can do
(reopen, crash, corruption, file caps) is in test_store_sqlite.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.model import Record, RecordKind, StoredRecord
from gateway.store.base import DeadLetter, Store, encode_body
from gateway.store.memory import MemoryStore, record_size
from gateway.store.sqlite import SqliteStore

T, H, E = RecordKind.TELEMETRY, RecordKind.HEALTH, RecordKind.EVENTS
UNLIMITED = 1 << 40

MakeStore = Callable[..., Store]


def rec(kind: RecordKind = T, ts: float = 1_700_000_000.0, serial: str = "PACK-1",
        **body: object) -> Record:
    return Record(serial, kind, ts, body)


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeStore]:
    opened: list[Store] = []

    def make(*, max_bytes: int = UNLIMITED, max_records: int = UNLIMITED,
             metrics: Metrics | None = None) -> Store:
        store: Store
        if request.param == "memory":
            store = MemoryStore(max_bytes=max_bytes, max_records=max_records, metrics=metrics)
        else:
            store = SqliteStore(tmp_path / "store.sqlite", max_bytes=max_bytes,
                                max_records=max_records, metrics=metrics)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def seqs_of(records: Sequence[StoredRecord]) -> list[int]:
    return [r.seq for r in records]


# -- seq ----------------------------------------------------------------------------------


def test_seqs_are_monotonic_and_contiguous(make_store: MakeStore) -> None:
    store = make_store()
    first = store.commit([rec(n=i) for i in range(3)])
    second = store.commit([rec(n=i) for i in range(4)])
    assert first == [1, 2, 3]
    assert second == [4, 5, 6, 7]
    assert store.stats().last_seq == 7


def test_seq_of_deleted_newest_record_is_not_reused(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec(n=i) for i in range(3)])
    assert store.ack([3]) == 1
    assert store.commit([rec()]) == [4]
    store.ack([1, 2, 4])
    assert store.commit([rec()]) == [5]


def test_empty_commit_takes_no_seq(make_store: MakeStore) -> None:
    store = make_store()
    assert store.commit([]) == []
    assert store.commit([rec()]) == [1]


# -- lease --------------------------------------------------------------------------------


def test_lease_hands_out_oldest_seq_first_up_to_the_limit(make_store: MakeStore) -> None:
    store = make_store()
    # Measurement times run backwards: lease order is commit order (seq), not ts.
    store.commit([rec(ts=100.0 - i, n=i) for i in range(5)])
    assert seqs_of(store.lease(2)) == [1, 2]
    assert seqs_of(store.lease(2)) == [3, 4]
    assert seqs_of(store.lease(10)) == [5]
    assert store.lease(10) == []
    assert store.lease(0) == []


def test_leased_record_carries_what_was_committed(make_store: MakeStore) -> None:
    store = make_store()
    body = {"current_a": -12.5, "cell_voltages_v": [3.301, 3.302], "state": "charging",
            "flags": {"ov": False}, "absent": None}
    store.commit([rec(H, ts=1_700_000_123.456, serial="SN-42", **body)])
    (leased,) = store.lease(1)
    assert (leased.seq, leased.serial, leased.kind, leased.ts, leased.attempts) == (
        1, "SN-42", H, 1_700_000_123.456, 0)
    assert dict(leased.body) == body


def test_a_leased_record_is_not_leased_again(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec(n=i) for i in range(3)])
    first = store.lease(2)
    store.commit([rec(n=3)])
    assert seqs_of(store.lease(10)) == [3, 4]
    assert store.lease(10) == []
    assert seqs_of(first) == [1, 2]


def test_concurrent_leases_are_disjoint_and_cover_everything(make_store: MakeStore) -> None:
    store = make_store()
    total = 300
    for start in range(0, total, 50):
        store.commit([rec(n=i) for i in range(start, start + 50)])
    taken: list[list[int]] = [[] for _ in range(4)]

    def take(mine: list[int]) -> None:
        for _ in range(total):  # bounded: each round takes at least one or stops
            got = store.lease(7)
            if not got:
                return
            mine.extend(seqs_of(got))

    threads = [threading.Thread(target=take, args=(mine,)) for mine in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    everything = [seq for mine in taken for seq in mine]
    assert sorted(everything) == list(range(1, total + 1))


# -- ack, retry, reject, release ------------------------------------------------------------


def test_ack_deletes_and_counts_only_records_still_stored(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec(n=i) for i in range(4)])
    store.lease(4)
    assert store.ack([1, 2]) == 2
    assert store.ack([2, 3, 99]) == 1  # 2 already gone, 99 never existed
    stats = store.stats()
    assert (stats.records, stats.acked_total, stats.committed_total) == (1, 3, 4)
    store.release_all()
    assert seqs_of(store.lease(10)) == [4]


def test_ack_works_without_a_lease(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec(), rec()])
    assert store.ack([2]) == 1
    assert seqs_of(store.lease(5)) == [1]


def test_retry_releases_the_lease_and_counts_the_attempt(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec(n=i) for i in range(3)])
    store.lease(3)
    store.retry([2])
    (again,) = store.lease(10)
    assert (again.seq, again.attempts, dict(again.body)) == (2, 1, {"n": 1})
    store.retry([2, 3])
    leased = store.lease(10)
    assert [(r.seq, r.attempts) for r in leased] == [(2, 2), (3, 1)]
    store.retry([99])  # unknown seqs are ignored
    assert store.stats().records == 3


def test_reject_moves_the_record_to_the_dead_letters(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec(n=0), rec(E, ts=5.5, serial="SN-9", n=1), rec(n=2)])
    store.lease(3)
    store.retry([2])
    store.lease(1)
    store.reject([2, 77], "payload_too_large")
    assert store.dead_letters() == [
        DeadLetter(2, "SN-9", "events", 5.5, 1, encode_body({"n": 1}), "payload_too_large")]
    stats = store.stats()
    assert (stats.records, stats.dead_letters, stats.acked_total) == (2, 1, 0)
    assert store.ack([2]) == 0
    store.release_all()
    assert seqs_of(store.lease(10)) == [1, 3]


def test_release_all_makes_every_record_leasable_again(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec(n=i) for i in range(3)])
    store.lease(2)
    store.release_all()
    leased = store.lease(10)
    assert [(r.seq, r.attempts) for r in leased] == [(1, 0), (2, 0), (3, 0)]


# -- quota --------------------------------------------------------------------------------


def kinds_left(store: Store) -> list[tuple[int, RecordKind]]:
    store.release_all()
    return [(r.seq, r.kind) for r in store.lease(10_000)]


def test_record_cap_drops_oldest_telemetry_then_health_then_events(make_store: MakeStore) -> None:
    store = make_store(max_records=10)
    # seqs 1-4 events, 5-8 health, 9-14 telemetry
    store.commit([rec(E)] * 4 + [rec(H)] * 4 + [rec(T)] * 6)
    assert kinds_left(store) == [(1, E), (2, E), (3, E), (4, E), (5, H), (6, H), (7, H), (8, H),
                                 (13, T), (14, T)]
    store.release_all()
    # three more health: the last two telemetry go, then the oldest health
    assert store.commit([rec(H)] * 3) == [15, 16, 17]
    assert kinds_left(store) == [(1, E), (2, E), (3, E), (4, E), (6, H), (7, H), (8, H),
                                 (15, H), (16, H), (17, H)]
    stats = store.stats()
    assert (stats.records, stats.dropped_total, stats.committed_total) == (10, {"quota": 7}, 17)


def test_records_of_the_commit_itself_can_be_dropped(make_store: MakeStore) -> None:
    store = make_store(max_records=4)
    store.commit([rec(E)])
    # eight telemetry arrive at once: the oldest five of them go, the event stays
    assert store.commit([rec(T, n=i) for i in range(8)]) == list(range(2, 10))
    assert kinds_left(store) == [(1, E), (7, T), (8, T), (9, T)]
    assert store.stats().dropped_total == {"quota": 5}
    assert store.commit([rec()]) == [10]  # dropped records used up their seqs


def test_byte_cap_drops_by_priority_with_exact_counts(make_store: MakeStore) -> None:
    small = rec(T, pad="x" * 50)
    size = record_size(small)
    store = make_store(max_bytes=size * 6 + size // 2)  # room for six records
    store.commit([rec(H, pad="x" * 50)] * 2 + [small] * 4)
    assert store.stats().dropped_total == {}
    big = rec(E, pad="x" * (50 + 2 * size))  # weighs as much as three small ones
    store.commit([big])
    assert kinds_left(store) == [(1, H), (2, H), (6, T), (7, E)]
    stats = store.stats()
    assert stats.dropped_total == {"quota": 3}
    assert stats.bytes == 3 * size + record_size(big) <= size * 6 + size // 2


def test_quota_never_drops_a_leased_record(make_store: MakeStore) -> None:
    store = make_store(max_records=3)
    store.commit([rec(n=i) for i in range(3)])
    assert seqs_of(store.lease(2)) == [1, 2]
    store.commit([rec(n=3)])
    assert store.stats().dropped_total == {"quota": 1}
    assert seqs_of(store.lease(10)) == [4]  # 3 was the oldest unleased
    # everything stored is leased: the new record is the only one that may go
    assert store.commit([rec(n=4)]) == [5]
    stats = store.stats()
    assert (stats.records, stats.dropped_total) == (3, {"quota": 2})
    assert store.lease(10) == []
    assert store.ack([1, 2]) == 2
    assert store.commit([rec(n=5)]) == [6]
    assert seqs_of(store.lease(10)) == [6]


def test_full_and_drained_are_logged_once_per_transition(make_store: MakeStore) -> None:
    metrics = Metrics()
    store = make_store(max_records=20, metrics=metrics)
    with capture_logs() as logs:
        for i in range(10):
            store.commit([rec(n=10 * i + j) for j in range(5)])
        full = [e for e in logs if e["event"] == "store_full"]
        assert len(full) == 1
        assert full[0]["log_level"] == "warning"
        assert full[0]["records"] == 20
        leased = store.lease(100)
        assert store.ack(seqs_of(leased)[:1]) == 1  # 19 left: above 90 %, still full
        assert not [e for e in logs if e["event"] == "store_drained"]
        store.ack(seqs_of(leased)[1:3])  # 17 left
        drained = [e for e in logs if e["event"] == "store_drained"]
        assert len(drained) == 1
        assert drained[0]["dropped_while_full"] == 30
        store.ack(seqs_of(leased)[3:])
    assert len([e for e in logs if e["event"] == "store_drained"]) == 1
    assert metrics.get("records_dropped_total", "quota") == 30
    assert store.stats().dropped_total == {"quota": 30}


# -- checkpoints and meta --------------------------------------------------------------------


def test_checkpoints_are_written_with_the_commit_and_overwritten(make_store: MakeStore) -> None:
    store = make_store()
    assert store.checkpoint("pack/SN-1") is None
    store.commit([rec()], {"pack/SN-1": b"\x00\x01state", "pack/SN-2": b"two"})
    store.commit([], {"pack/SN-1": b"newer"})
    assert store.checkpoint("pack/SN-1") == b"newer"
    assert store.checkpoints() == {"pack/SN-1": b"newer", "pack/SN-2": b"two"}
    assert store.stats().committed_total == 1


def test_meta_is_a_text_map(make_store: MakeStore) -> None:
    store = make_store()
    assert store.get_meta("counters") is None
    store.put_meta("counters", '{"frames_rx_total": 1}')
    store.put_meta("counters", '{"frames_rx_total": 2}')
    store.put_meta("other", "ü")
    assert store.get_meta("counters") == '{"frames_rx_total": 2}'
    assert store.get_meta("other") == "ü"


# -- stats, metrics, bad input, close ---------------------------------------------------------


def test_stats_track_every_change(make_store: MakeStore) -> None:
    store = make_store()
    assert store.stats().oldest_unsent_ts is None
    records = [rec(ts=50.0, n=1), rec(ts=20.0, n=22), rec(ts=80.0, serial="SN-ü", n=333)]
    store.commit(records)
    stats = store.stats()
    assert stats.records == 3
    assert stats.bytes == sum(record_size(r) for r in records)
    assert stats.oldest_unsent_ts == 20.0
    store.lease(3)
    store.ack([2])
    store.reject([3], "invalid_topic")
    stats = store.stats()
    assert (stats.records, stats.bytes, stats.oldest_unsent_ts) == (1, record_size(records[0]),
                                                                   50.0)
    assert (stats.committed_total, stats.acked_total, stats.dead_letters, stats.last_seq) == (
        3, 1, 1, 3)


def test_stats_count_commits_by_kind_and_dead_letters_by_reason(make_store: MakeStore) -> None:
    store = make_store(max_records=4)
    store.commit([rec(T), rec(H), rec(T), rec(E), rec(T)])  # the first telemetry is dropped
    store.lease(4)
    store.reject([2], "payload_too_large")
    store.reject([3, 4], "topic_invalid")
    store.reject([4], "payload_too_large")  # already a dead letter: nothing more
    stats = store.stats()
    assert stats.committed_by_kind == {"telemetry": 3, "health": 1, "events": 1}
    assert sum(stats.committed_by_kind.values()) == stats.committed_total
    assert stats.dead_lettered_by_reason == {"payload_too_large": 1, "topic_invalid": 2}
    assert stats.dead_letters == 3
    assert stats.dropped_total == {"quota": 1}


def test_metrics_count_what_the_store_did(make_store: MakeStore) -> None:
    metrics = Metrics()
    store = make_store(max_records=5, metrics=metrics)
    store.commit([rec(n=i) for i in range(6)] + [rec(H)])
    store.lease(3)
    store.ack([3, 4])
    store.reject([5], "invalid_topic")
    assert metrics.get("records_committed_total") == 7
    assert metrics.get("records_committed_total", "health") == 1
    assert metrics.get("records_dropped_total", "quota") == 2
    assert metrics.get("records_acked_total") == 2
    assert metrics.get("records_dead_lettered_total", "invalid_topic") == 1


def test_a_nan_body_is_refused_and_changes_nothing(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec()])
    with pytest.raises(ValueError):
        store.commit([rec(n=1), rec(current_a=float("nan"))], {"k": b"v"})
    stats = store.stats()
    assert (stats.records, stats.last_seq, stats.committed_total) == (1, 1, 1)
    assert store.checkpoint("k") is None


def test_close_is_idempotent_and_a_closed_store_refuses_work(make_store: MakeStore) -> None:
    store = make_store()
    store.commit([rec()])
    store.close()
    store.close()
    with pytest.raises(StoreError):
        store.commit([rec()])
    with pytest.raises(StoreError):
        store.lease(1)
    with pytest.raises(StoreError):
        store.stats()
