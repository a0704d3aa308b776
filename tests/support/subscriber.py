"""An independent MQTT v5 subscriber that keeps the delivery accounting for tests.

It has its own paho client and a persistent session (``clean_start`` False, a session expiry), so
QoS 1 messages published while it reconnects are queued for it by the broker. It counts every
delivery per ``(gateway_id, seq)``: ``received`` is the number of distinct keys, ``duplicates`` the
deliveries beyond the first (see ../../../shared/TESTING.md, "Accounting").
"""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

Key = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Received:
    """One message as it arrived."""

    topic: str
    payload: bytes
    retain: bool
    content_type: str | None
    envelope: dict[str, Any] | None  # None for the plain-text status messages


class Subscriber:
    def __init__(self, host: str, port: int, *, topic: str = "bms/#",
                 client_id: str | None = None, session_expiry_s: int = 600,
                 username: str | None = None, password: str | None = None,
                 tls_context: Any = None) -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.client_id = client_id or f"test-subscriber-{uuid.uuid4().hex[:8]}"
        # re-entrant: a wait_until predicate may call envelopes() or read the counters
        self._cond = threading.Condition(threading.RLock())
        self.messages: list[Received] = []
        self.deliveries: collections.Counter[Key] = collections.Counter()
        self.records: dict[Key, dict[str, Any]] = {}
        self.statuses: dict[str, list[tuple[str, bool]]] = {}
        self.malformed: list[tuple[str, bytes]] = []
        self.subscribes = 0
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=MQTTProtocolVersion.MQTTv5)
        self._client.reconnect_delay_set(0.05, 0.2)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls_context is not None:
            self._client.tls_set_context(tls_context)
        self._connect_properties = Properties(PacketTypes.CONNECT)
        self._connect_properties.SessionExpiryInterval = session_expiry_s
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -----------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Subscriber:
        self._client.connect(self.host, self.port, keepalive=10, clean_start=False,
                             properties=self._connect_properties)
        self._client.loop_start()
        self.wait_until(lambda: self.subscribes >= 1, timeout, "subscription acknowledged")
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -----------------------------------------------------------------------------------------
    # paho's thread

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                    _properties: Any) -> None:
        if reason_code.is_failure:
            return
        # always (re)subscribe: a broker that lost its state has no session to resume
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int,
                      _reason_codes: Any, _properties: Any) -> None:
        with self._cond:
            self.subscribes += 1
            self._cond.notify_all()

    def _on_message(self, _client: mqtt.Client, _userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        props = message.properties
        content_type = getattr(props, "ContentType", None) if props is not None else None
        envelope: dict[str, Any] | None = None
        with self._cond:
            if message.topic.endswith("/status"):
                text = payload.decode("utf-8", errors="replace")
                self.statuses.setdefault(message.topic, []).append((text, message.retain))
            else:
                try:
                    envelope = json.loads(payload)
                    records = envelope["records"] if isinstance(envelope, dict) else None
                    gateway_id = envelope["gateway_id"] if isinstance(envelope, dict) else None
                except (ValueError, KeyError):
                    records = None
                if not isinstance(records, list) or not isinstance(gateway_id, str):
                    self.malformed.append((message.topic, payload))
                    envelope = None
                else:
                    for record in records:
                        key = (gateway_id, int(record["seq"]))
                        self.deliveries[key] += 1
                        self.records[key] = record
            self.messages.append(Received(message.topic, payload, bool(message.retain),
                                          content_type, envelope))
            self._cond.notify_all()

    # -----------------------------------------------------------------------------------------
    # accounting and waiting

    @property
    def received(self) -> int:
        """Distinct (gateway_id, seq) seen."""
        with self._cond:
            return len(self.deliveries)

    @property
    def duplicates(self) -> int:
        """Deliveries beyond the first of each (gateway_id, seq)."""
        with self._cond:
            return sum(self.deliveries.values()) - len(self.deliveries)

    def envelopes(self) -> list[tuple[str, dict[str, Any]]]:
        with self._cond:
            return [(m.topic, m.envelope) for m in self.messages if m.envelope is not None]

    def wait_until(self, predicate: Callable[[], bool], timeout: float,
                   what: str | Callable[[], str]) -> None:
        """Wait (bounded) until ``predicate()`` holds; fail the test with ``what`` if it never
        does. The predicate is evaluated with the subscriber's lock held, on each message.
        ``what`` may be a callable, evaluated (with the lock held) only when the wait fails, so
        the message tells the state at the timeout rather than at the call."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    text = what() if callable(what) else what
                    raise AssertionError(f"timed out after {timeout} s waiting for {text}")
                self._cond.wait(min(left, 0.2))

    def wait_for_records(self, n: int, timeout: float = 30.0) -> None:
        self.wait_until(lambda: len(self.deliveries) >= n, timeout,
                        lambda: f"{n} distinct records (have {len(self.deliveries)})")

    def missing(self, gateway_id: str, seqs: Iterable[int]) -> list[int]:
        """Those of ``seqs`` not delivered yet, in the order given."""
        with self._cond:
            return [seq for seq in seqs if (gateway_id, seq) not in self.deliveries]

    def wait_for_seqs(self, gateway_id: str, seqs: Collection[int], timeout: float = 30.0,
                      context: Callable[[], str] | None = None) -> None:
        """Wait until every one of ``seqs`` has been delivered at least once. A count is not
        enough: a re-delivered record can stand in for a missing one. On failure the message
        names the missing seqs, and ``context()`` (the sender's accounting, say) if given."""
        wanted = sorted(set(seqs))
        # the first missing seq only moves forward: checking from there keeps each turn short
        first = [0]

        def done() -> bool:
            while first[0] < len(wanted) and (gateway_id, wanted[first[0]]) in self.deliveries:
                first[0] += 1
            return first[0] == len(wanted)

        def what() -> str:
            gone = self.missing(gateway_id, wanted)
            text = (f"{len(wanted)} records of {gateway_id}; {len(gone)} missing "
                    f"(first: {gone[:20]}), {len(self.deliveries)} distinct received")
            return f"{text}; {context()}" if context is not None else text

        self.wait_until(done, timeout, what)

    def wait_for_status(self, topic: str, value: str, timeout: float = 10.0) -> None:
        def seen() -> bool:
            history = self.statuses.get(topic)
            return bool(history) and history[-1][0] == value
        self.wait_until(seen, timeout, f"status {value!r} on {topic}")
