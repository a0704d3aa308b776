"""Envelopes, timestamps, topics and batching bounds (no broker needed)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import RecordKind, StoredRecord
from gateway.publish.encode import (
    REASON_TOO_LARGE,
    REASON_TOPIC_INVALID,
    REASON_UNENCODABLE,
    SCHEMA,
    Batch,
    build_envelopes,
    format_ts,
    payload_limit,
    publish_overhead,
    record_json,
)
from gateway.publish.topics import level_problem, record_topic, status_topic


def stored(seq: int, serial: str = "PACK-1", kind: RecordKind = RecordKind.TELEMETRY,
           ts: float = 1_795_485_342.5, **body: object) -> StoredRecord:
    return StoredRecord(seq, serial, kind, ts, body or {"current_a": 1.25})


def build(records: Sequence[StoredRecord], **kwargs: object) -> Batch:
    options: dict[str, object] = {"gateway_id": "gw-1", "topic_prefix": "bms",
                                  "max_records": 200, "max_bytes": 256 * 1024}
    options.update(kwargs)
    return build_envelopes(records, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("ts", "text"), [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1_795_485_342.456, "2026-11-24T01:55:42.456Z"),
    (1_795_485_342.0004, "2026-11-24T01:55:42.000Z"),
    # rounding carries into the next second (and minute) instead of printing ".1000"
    (1_795_485_359.9996, "2026-11-24T01:56:00.000Z"),
    (-0.5, "1969-12-31T23:59:59.500Z"),
])
def test_format_ts_is_utc_iso8601_with_milliseconds(ts: float, text: str) -> None:
    assert format_ts(ts) == text


def test_record_json_puts_seq_and_ts_first_and_body_cannot_override_them() -> None:
    record = StoredRecord(7, "P", RecordKind.HEALTH, 1_795_485_342.25,
                          {"soh": 0.93, "seq": 999, "ts": "forged", "cell_voltages_v": [3.3, 3.31]})
    text = record_json(record).decode()
    assert text.startswith('{"seq":7,"ts":"2026-11-24T01:55:42.250Z"')
    assert json.loads(text) == {"seq": 7, "ts": "2026-11-24T01:55:42.250Z", "soh": 0.93,
                                "cell_voltages_v": [3.3, 3.31]}


def test_envelope_carries_schema_gateway_serial_kind_and_records_oldest_first() -> None:
    records = [stored(3, ts=10.0), stored(1, kind=RecordKind.HEALTH, ts=8.0), stored(5, ts=12.0)]
    batch = build(sorted(records, key=lambda r: r.seq))
    assert batch.refusals == ()
    by_topic = {e.topic: json.loads(e.payload) for e in batch.envelopes}
    assert set(by_topic) == {"bms/PACK-1/telemetry", "bms/PACK-1/health"}
    telemetry = by_topic["bms/PACK-1/telemetry"]
    assert telemetry["schema"] == SCHEMA
    assert (telemetry["gateway_id"], telemetry["serial"], telemetry["kind"]) == \
        ("gw-1", "PACK-1", "telemetry")
    assert [r["seq"] for r in telemetry["records"]] == [3, 5]
    assert [r["ts"] for r in telemetry["records"]] == [format_ts(10.0), format_ts(12.0)]
    # envelopes are ordered by their oldest record
    assert [e.seqs[0] for e in batch.envelopes] == [1, 3]


def test_batches_respect_record_and_byte_bounds_and_mark_full_envelopes() -> None:
    records = [stored(i, cell_voltages_v=[3.3] * 16) for i in range(1, 106)]
    by_count = build(records, max_records=50)
    assert [len(e.seqs) for e in by_count.envelopes] == [50, 50, 5]
    assert [e.full for e in by_count.envelopes] == [True, True, False]

    limit = 2048
    by_bytes = build(records, max_bytes=limit)
    assert all(len(e.payload) <= limit for e in by_bytes.envelopes)
    assert all(e.full for e in by_bytes.envelopes[:-1])
    # each closed envelope was full: the next record would not have fitted
    part = len(record_json(records[0]))
    assert all(len(e.payload) + 1 + part > limit for e in by_bytes.envelopes[:-1])
    assert [s for e in by_bytes.envelopes for s in e.seqs] == list(range(1, 106))


def test_record_too_large_alone_is_refused_and_the_rest_still_batched() -> None:
    records = [stored(1), stored(2, blob="x" * 5000), stored(3)]
    batch = build(records, max_bytes=1024)
    assert [(r.seq, r.reason) for r in batch.refusals] == [(2, REASON_TOO_LARGE)]
    assert [e.seqs for e in batch.envelopes] == [(1, 3)]


def test_broker_max_packet_lowers_the_payload_limit_by_the_publish_overhead() -> None:
    topic = record_topic("bms", "PACK-1", RecordKind.TELEMETRY)
    assert payload_limit(topic, 10_000, None) == 10_000
    assert payload_limit(topic, 10_000, 1000) == 1000 - publish_overhead(topic)
    records = [stored(i, cell_voltages_v=[3.3] * 16) for i in range(1, 60)]
    batch = build(records, max_packet=1000)
    assert all(len(e.payload) + publish_overhead(e.topic) <= 1000 for e in batch.envelopes)


def test_soft_batch_bound_sends_bigger_records_alone_instead_of_refusing_them() -> None:
    records = [stored(1), stored(2, blob="y" * 600), stored(3), stored(4)]
    batch = build(records, batch_bytes=400)
    assert batch.refusals == ()
    assert [e.seqs for e in batch.envelopes] == [(1,), (2,), (3, 4)]


def test_alone_seqs_travel_in_their_own_envelopes() -> None:
    batch = build([stored(i) for i in range(1, 6)], alone={2, 3})
    assert [e.seqs for e in batch.envelopes] == [(1,), (2,), (3,), (4, 5)]


def test_bad_serial_and_unencodable_body_are_refused_not_raised() -> None:
    records = [stored(1, serial="A/B"), stored(2, serial="C+"), stored(3, current_a=math.nan),
               stored(4, current_a=object()), stored(5)]
    batch = build(records)
    assert {(r.seq, r.reason) for r in batch.refusals} == {
        (1, REASON_TOPIC_INVALID), (2, REASON_TOPIC_INVALID),
        (3, REASON_UNENCODABLE), (4, REASON_UNENCODABLE)}
    assert [e.seqs for e in batch.envelopes] == [(5,)]


def test_topics() -> None:
    assert record_topic("site/bms", "PACK-1", RecordKind.EVENTS) == "site/bms/PACK-1/events"
    assert status_topic("bms", "gw-1") == "bms/gateway/gw-1/status"
    assert level_problem("PACK-1") is None
    assert level_problem("") == "empty"
    assert level_problem("a#b") is not None
    with pytest.raises(ValueError, match="cannot be a topic level"):
        record_topic("bms", "x/y", RecordKind.HEALTH)


_bodies = st.dictionaries(
    st.sampled_from(["current_a", "soc", "note", "cell_voltages_v"]),
    st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=80),
              st.lists(st.floats(0, 5), max_size=40)),
    max_size=4)
_records = st.lists(
    st.tuples(st.sampled_from(["A", "B", "C/D"]), st.sampled_from(list(RecordKind)), _bodies),
    max_size=80)


@settings(max_examples=60, deadline=None)
@given(_records, st.integers(1, 12), st.integers(300, 3000),
       st.sets(st.integers(1, 80), max_size=5))
def test_batching_partitions_records_within_bounds(
        spec: list[tuple[str, RecordKind, dict[str, object]]], max_records: int, max_bytes: int,
        alone: set[int]) -> None:
    records = [StoredRecord(i, serial, kind, 1_700_000_000 + i, body)
               for i, (serial, kind, body) in enumerate(spec, start=1)]
    batch = build(records, max_records=max_records, max_bytes=max_bytes, alone=alone)
    sent = [s for e in batch.envelopes for s in e.seqs]
    refused = [r.seq for r in batch.refusals]
    # every record is either in exactly one envelope or refused, never both, never lost
    assert sorted(sent + refused) == [r.seq for r in records]
    for refusal in batch.refusals:
        record = records[refusal.seq - 1]
        assert (refusal.reason == REASON_TOPIC_INVALID) == ("/" in record.serial)
    for envelope in batch.envelopes:
        assert 1 <= len(envelope.seqs) <= max_records
        assert len(envelope.payload) <= max_bytes
        assert list(envelope.seqs) == sorted(envelope.seqs)
        if len(envelope.seqs) > 1:
            assert not alone & set(envelope.seqs)
        doc = json.loads(envelope.payload)
        assert [r["seq"] for r in doc["records"]] == list(envelope.seqs)
        assert all(records[s - 1].serial == envelope.serial and
                   records[s - 1].kind == envelope.kind for s in envelope.seqs)
    # within one (serial, kind), later envelopes only hold later records
    last: dict[tuple[str, RecordKind], int] = {}
    for envelope in sorted(batch.envelopes, key=lambda e: e.seqs[0]):
        key = (envelope.serial, envelope.kind)
        assert envelope.seqs[0] > last.get(key, 0)
        last[key] = envelope.seqs[-1]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 4_102_444_800_000))
def test_format_ts_agrees_with_datetime(millis: int) -> None:
    ts = millis / 1000
    expected = datetime.fromtimestamp(millis // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert format_ts(ts) == f"{expected}.{millis % 1000:03d}Z"
