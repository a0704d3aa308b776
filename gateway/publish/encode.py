"""The JSON envelope every record message carries, and the batching that fills envelopes.

An envelope is one MQTT payload::

    {"schema": "bms-gateway/records/v1", "gateway_id": "gw-1", "serial": "PACK-42",
     "kind": "telemetry", "records": [{"seq": 17, "ts": "2026-11-24T01:02:03.456Z", ...}, ...]}

``records`` holds one (serial, kind)'s records, oldest first. Each record is its body with ``seq``
(the store's id; ``(gateway_id, seq)`` is the subscriber's deduplication key) and ``ts`` (UTC
measurement time, ISO 8601 with milliseconds) put first; a body can never override either.

Each record is serialised once and envelopes are assembled from those byte strings, so the size of
an envelope is known exactly while it is being filled and nothing is encoded twice. Records that
can never be sent are returned as :class:`Refusal` for the caller to dead-letter: a record alone
too large for the byte bound, a serial that cannot be a topic level, a body JSON cannot encode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from gateway.model import RecordKind, StoredRecord
from gateway.publish.topics import record_topic

SCHEMA = "bms-gateway/records/v1"
CONTENT_TYPE = "application/json"

#: refusal reasons; they label ``records_dead_lettered_total``
REASON_TOO_LARGE = "payload_too_large"
REASON_TOPIC_INVALID = "topic_invalid"
REASON_UNENCODABLE = "unencodable"

# The publisher sends each envelope with two MQTT v5 properties: payload format indicator 1
# (UTF-8, one byte id + one byte value) and the content type (one byte id, two byte length, text).
_PROPERTIES_BYTES = 2 + 1 + 2 + len(CONTENT_TYPE.encode("ascii"))

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def format_ts(ts: float) -> str:
    """POSIX seconds → ``2026-11-24T01:02:03.456Z`` (UTC, rounded to the millisecond).

    Rounding happens on integer milliseconds first, so 59.9996 s becomes the next minute's
    ``00.000`` rather than an impossible ``59.1000``.
    """
    seconds, millis = divmod(round(ts * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def record_json(record: StoredRecord) -> bytes:
    """One record as compact UTF-8 JSON: ``seq`` and ``ts`` first, then the body's figures.

    Raises ``ValueError`` / ``TypeError`` / ``OverflowError`` when the body (or ``ts``) cannot be
    encoded: NaN, infinities, objects JSON does not know, lone surrogates.
    """
    ts = format_ts(record.ts)
    doc: dict[str, object] = {"seq": record.seq, "ts": ts}
    doc.update(record.body)
    # re-assign after the update: the keys keep their first position, a body cannot override them
    doc["seq"] = record.seq
    doc["ts"] = ts
    return _encoder.encode(doc).encode("utf-8")


def envelope_header(gateway_id: str, serial: str, kind: RecordKind) -> bytes:
    """The envelope up to and including ``"records":[``; the payload is this, the record parts
    joined with ``,``, and ``]}``."""
    head = _encoder.encode({"schema": SCHEMA, "gateway_id": gateway_id, "serial": serial,
                            "kind": kind.value})
    return (head[:-1] + ',"records":[').encode("utf-8")


def envelope_payload(header: bytes, parts: Sequence[bytes]) -> bytes:
    return header + b",".join(parts) + b"]}"


def publish_overhead(topic: str) -> int:
    """Bytes an MQTT v5 QoS 1 PUBLISH adds around its payload, at most: fixed header (1 + up to 4
    length bytes), topic (2 + UTF-8 length), packet id (2), properties (1 length byte + them)."""
    return 1 + 4 + 2 + len(topic.encode("utf-8")) + 2 + 1 + _PROPERTIES_BYTES


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message ready to publish. ``full`` is False only for a group's last, partly filled
    envelope, which steady-state publishing may hold back to batch what arrives next."""

    topic: str
    serial: str
    kind: RecordKind
    seqs: tuple[int, ...]
    payload: bytes
    full: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    """A record that can never be published as it is."""

    seq: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Batch:
    envelopes: tuple[Envelope, ...]
    refusals: tuple[Refusal, ...]


def payload_limit(topic: str, max_bytes: int, max_packet: int | None) -> int:
    """The largest payload allowed on ``topic``: our own byte bound, and the broker's maximum
    packet size (from CONNACK, or learned from a refusal) less the PUBLISH overhead."""
    if max_packet is None:
        return max_bytes
    return min(max_bytes, max_packet - publish_overhead(topic))


def build_envelopes(records: Iterable[StoredRecord], *, gateway_id: str, topic_prefix: str,
                    max_records: int, max_bytes: int, max_packet: int | None = None,
                    batch_bytes: int | None = None, alone: Collection[int] = ()) -> Batch:
    """Group records by (serial, kind) into envelopes of at most ``max_records`` records and
    at most ``payload_limit(...)`` bytes, keeping seq order inside each group.

    ``batch_bytes`` is a softer bound for envelopes of two or more records (the publisher lowers
    it when a broker drops oversized messages without saying its limit); a record above it still
    travels, alone. ``alone`` names seqs that must travel in an envelope of their own: the broker
    refused an envelope they were part of for good, and sending them one by one finds which
    record it meant. Envelopes come back ordered by their first seq, so the oldest data goes
    out first.
    """
    groups: dict[tuple[str, RecordKind], list[tuple[int, bytes]]] = {}
    topics: dict[tuple[str, RecordKind], str | None] = {}
    topic_problems: dict[tuple[str, RecordKind], str] = {}
    refusals: list[Refusal] = []
    for record in records:
        key = (record.serial, record.kind)
        if key not in topics:
            try:
                topics[key] = record_topic(topic_prefix, record.serial, record.kind)
            except ValueError as exc:
                topics[key] = None
                topic_problems[key] = str(exc)
        if topics[key] is None:
            refusals.append(Refusal(record.seq, REASON_TOPIC_INVALID, topic_problems[key]))
            continue
        try:
            part = record_json(record)
        except (ValueError, TypeError, OverflowError) as exc:
            refusals.append(Refusal(record.seq, REASON_UNENCODABLE, str(exc)))
            continue
        groups.setdefault(key, []).append((record.seq, part))

    envelopes: list[Envelope] = []
    for (serial, kind), items in groups.items():
        topic = topics[(serial, kind)]
        assert topic is not None  # groups only holds keys whose topic was valid
        limit = payload_limit(topic, max_bytes, max_packet)
        filler = _Filler(topic, serial, kind, envelope_header(gateway_id, serial, kind), limit,
                         min(limit, batch_bytes or limit), max_records, envelopes)
        for seq, part in items:
            problem = filler.too_large(part)
            if problem is not None:
                refusals.append(Refusal(seq, REASON_TOO_LARGE, problem))
            elif seq in alone or not filler.fits_batch(part):
                filler.add_alone(seq, part)
            else:
                filler.add(seq, part)
        filler.close(full=filler.count >= max_records)
    envelopes.sort(key=lambda envelope: envelope.seqs[0])
    return Batch(tuple(envelopes), tuple(refusals))


class _Filler:
    """Fills one (serial, kind)'s envelopes in order, closing each when the next record would
    break the record or byte bound."""

    def __init__(self, topic: str, serial: str, kind: RecordKind, header: bytes, limit: int,
                 batch_limit: int, max_records: int, out: list[Envelope]) -> None:
        self._topic = topic
        self._serial = serial
        self._kind = kind
        self._header = header
        self._limit = limit
        self._batch_limit = batch_limit
        self._max_records = max_records
        self._out = out
        self._empty = len(header) + 2  # the closing "]}"
        self._seqs: list[int] = []
        self._parts: list[bytes] = []
        self._size = self._empty

    @property
    def count(self) -> int:
        return len(self._parts)

    def too_large(self, part: bytes) -> str | None:
        alone = self._empty + len(part)
        return f"{alone} bytes alone, limit {self._limit}" if alone > self._limit else None

    def fits_batch(self, part: bytes) -> bool:
        return self._empty + len(part) <= self._batch_limit

    def add(self, seq: int, part: bytes) -> None:
        grown = self._size + len(part) + (1 if self._parts else 0)
        if self._parts and (len(self._parts) >= self._max_records or grown > self._batch_limit):
            self.close(full=True)
            grown = self._size + len(part)
        self._seqs.append(seq)
        self._parts.append(part)
        self._size = grown

    def add_alone(self, seq: int, part: bytes) -> None:
        self.close(full=True)
        self.add(seq, part)
        self.close(full=True)

    def close(self, *, full: bool) -> None:
        if self._parts:
            self._out.append(Envelope(self._topic, self._serial, self._kind, tuple(self._seqs),
                                      envelope_payload(self._header, self._parts), full))
        self._seqs, self._parts, self._size = [], [], self._empty
