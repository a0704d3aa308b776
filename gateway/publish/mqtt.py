"""The publisher: the single owner of MQTT state, delivering stored records at least once.

Threads. paho runs its network thread (``loop_start``); its callbacks only put events on a queue.
Everything else (the in-flight map, leases, store resolutions, reconnects) belongs to the thread
running :meth:`Publisher.run`. ``publish()`` returns the message id before that thread can see the
PUBACK event, and the mid is registered before the next event is taken, so acks are matched in
whatever order they arrive.

Durability. The store is the only session that is trusted. Every connection is a fresh paho client
with ``clean_start``; when a connection is lost, every lease is released (``store.release_all``)
and the in-flight map is cleared, so the records are leased and sent again from the store. That
re-send is the only source of duplicates, and it is bounded by the in-flight window.

Outcomes (STYLE 6). PUBACK reason code < 0x80 (0x00, and 0x10 "no matching subscribers") acks: the
records are deleted. ≥ 0x80 keeps them (``store.retry``) and holds that (serial, kind) back for
``retry_backoff_s``, doubling while its refusals continue, up to ``max(retry_backoff_s,
reconnect_max_s)``; its records, leased again at once, wait in the publisher meanwhile, so the
records of other groups are leased past them and keep flowing. The codes that can never
succeed (0x90 topic invalid, 0x95 packet too large, 0x99 payload format invalid) are not retried
as they are: an envelope of several records is split and each record sent alone, and a record
refused alone is dead-lettered (``store.reject``). Each refusal counts in
``puback_errors_total{code}`` (``0x87``) and is logged when a topic starts being refused
(``publish_refused``) and when it is accepted again (``publish_accepted``). Mosquitto 2.0
answers an ACL-denied publish with PUBACK 0x87 and then drops the connection; the hold outlives
the reconnect, so the denied topic does not stall the others. The PUBACK often does not get
through before the connection goes, so nothing tells which topic was denied: the reconnect
backoff is therefore reset only by a connection that lasted ``STABLE_CONNECTION_S``, and a
broker that keeps dropping us is retried ever more slowly, not several times a second.

Size limits. The payload bound is ``batch_max_bytes`` and the broker's CONNACK Maximum Packet
Size. A broker that drops an oversized message without announcing a limit (Mosquitto's
``message_size_limit`` answers with PUBACK 0x95, which MQTT does not allow on a PUBACK, and paho
drops the connection as a protocol error) would otherwise receive the same message forever after
every reconnect: on a loss with 0x81/0x82/0x95 the largest in-flight envelope is presumed guilty.
If it held several records the batch byte bound is halved; a single record is dead-lettered the
second time it is the one in flight.

Pacing. Records of one (serial, kind) wait up to ``publish_interval_s`` to share a message (steady
state: one message per interval); a full envelope (``batch_max_records``) goes at once, so a
backlog drains as fast as the window allows.

Counters it keeps: ``mqtt_messages_published_total``, ``records_published_total``,
``records_retried_total``, ``puback_errors_total{code}``, ``broker_connect_failures_total``,
``broker_disconnects_total``; gauge ``broker_state`` (connecting / connected / disconnected).
Acks and dead letters are counted by the store itself (``gateway.store.base``).

Status. ``{prefix}/gateway/{id}/status`` is retained: ``online`` on every connect, ``offline`` as
the Last Will and on a clean stop (a broker does not send the will on a clean disconnect).
"""

from __future__ import annotations

import math
import queue
import random
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttSection
from gateway.errors import ConfigError
from gateway.logging import register_secret
from gateway.metrics import Metrics
from gateway.model import StoredRecord
from gateway.publish.encode import CONTENT_TYPE, REASON_TOO_LARGE, Envelope, build_envelopes
from gateway.publish.topics import STATUS_OFFLINE, STATUS_ONLINE, status_topic
from gateway.store.base import Store

log = structlog.get_logger(__name__)

#: PUBACK reason codes that no retry can turn into a success, and the dead-letter reason for each
PERMANENT_PUBACK_CODES: dict[int, str] = {
    0x90: "topic_invalid",
    0x95: REASON_TOO_LARGE,
    0x99: "payload_format_invalid",
}
#: connection-loss reason codes that mean "the broker choked on something we sent"
_SIZE_SUSPECT_LOSS_CODES = frozenset({0x81, 0x82, 0x95})
#: MQTT's largest packet: a 4-byte remaining length plus the fixed header byte
MQTT_MAX_PACKET = 268_435_455 + 5

#: longest one loop turn waits for a paho event, so stop, wake and deadlines are seen promptly
TURN_S = 0.05
#: lease at least this often even when nobody sets ``wake``
POLL_S = 1.0
#: a connect that got its TCP connection must see CONNACK within this
CONNACK_TIMEOUT_S = 10.0
#: a connection that lasted this long resets the reconnect backoff; one dropped sooner (the
#: broker kicks us after each refused publish, or for a second client with our id) does not,
#: so a flapping connection is retried ever more slowly instead of several times a second
STABLE_CONNECTION_S = 10.0
#: on stop: how long to wait for outstanding acks, then for the ``offline`` status ack
STOP_DRAIN_S = 5.0
STOP_STATUS_S = 2.0
#: bound on events handled in one turn, so a flood of acks cannot starve the other duties
_EVENTS_PER_TURN = 10_000


@dataclass(frozen=True, slots=True)
class _Connack:
    generation: int
    code: int
    reason: str
    max_packet: int | None
    receive_max: int | None


@dataclass(frozen=True, slots=True)
class _Lost:
    generation: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class _Puback:
    generation: int
    mid: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class _SocketError:
    """What paho's socket read failed with: for TLS, the alert the broker sent (a client
    certificate it refused, say), which the disconnect's reason code does not tell."""

    generation: int
    text: str


_Event = _Connack | _Lost | _Puback | _SocketError


#: a (serial, kind) pair: one topic, one stream of envelopes
_Group = tuple[str, str]


@dataclass(frozen=True, slots=True)
class _InFlight:
    seqs: tuple[int, ...]
    group: _Group
    topic: str
    payload_bytes: int


class Publisher:
    """Leases records from the store, publishes them at QoS 1 and resolves each by its PUBACK.

    ``settings`` may be replaced while running (configuration reload): intervals, batch bounds
    and the window are read again on every turn; connection settings apply to the next connect.
    """

    def __init__(self, settings: MqttSection, gateway_id: str, store: Store, metrics: Metrics,
                 *, wake: threading.Event | None = None) -> None:
        self.settings = settings
        self._gateway_id = gateway_id
        self._store = store
        self._metrics = metrics
        self._wake = wake
        self._client_id = settings.client_id or f"bms-gateway-{gateway_id}"
        self._status_topic = status_topic(settings.topic_prefix, gateway_id)
        self._password = _read_password(settings)
        self._tls = _tls_context(settings) if settings.tls.enabled else None
        # paho's Properties constructor carries no annotations
        self._publish_properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        self._publish_properties.PayloadFormatIndicator = 1
        self._publish_properties.ContentType = CONTENT_TYPE

        self._events: queue.Queue[_Event] = queue.Queue()
        self._client: mqtt.Client | None = None
        self._generation = 0
        self._state = "disconnected"
        self._next_attempt = 0.0
        self._attempts = 0
        self._connack_deadline = 0.0
        self._connected_at = 0.0
        self._ever_connected = False
        self._lost_at: float | None = None
        self._last_failure: str | None = None
        self._socket_error: str | None = None
        self._broker_max_packet: int | None = None
        self._broker_receive_max: int | None = None

        self._inflight: dict[int, _InFlight] = {}
        self._status_mid: int | None = None
        self._waiting: dict[int, StoredRecord] = {}
        self._last_sent: dict[_Group, float] = {}
        self._lease_now = True
        self._last_lease = 0.0
        # groups whose last publish was refused, not sent again until then; survives reconnects
        self._held: dict[_Group, float] = {}
        self._refusal_streak: dict[_Group, int] = {}
        self._refused_topics: dict[str, int] = {}
        # reasons each stream is losing records to the dead-letter table for (logged once)
        self._dead_lettering: dict[_Group, set[str]] = {}
        self._alone: set[int] = set()
        self._suspects: dict[int, int] = {}
        self._batch_bytes_cap: int | None = None
        self._acked: list[int] = []
        self._last_progress = time.monotonic()
        self._metrics.set("broker_state", self._state)

    @property
    def last_progress(self) -> float:
        """``time.monotonic()`` of the last loop turn (the supervisor's watchdog reads it)."""
        return self._last_progress

    # -----------------------------------------------------------------------------------------
    # thread body

    def run(self, stop: threading.Event) -> None:
        """Publish until ``stop`` is set; then settle outstanding acks, say ``offline``, return."""
        try:
            while not stop.is_set():
                self._turn()
            self._shutdown()
        finally:
            self._teardown_client()
            self._store.release_all()
            self._set_state("disconnected")

    def _turn(self) -> None:
        now = time.monotonic()
        self._last_progress = now
        self._handle_events(TURN_S)
        now = time.monotonic()
        if self._state == "disconnected" and now >= self._next_attempt:
            self._connect()
        elif self._state == "connecting" and now >= self._connack_deadline:
            self._connect_failed("no CONNACK within "
                                 f"{CONNACK_TIMEOUT_S:g} s")
        elif self._state == "connected":
            self._pump(now)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + STOP_DRAIN_S
        while self._state == "connected" and self._inflight and time.monotonic() < deadline:
            self._last_progress = time.monotonic()
            self._handle_events(TURN_S)
        if self._state != "connected" or self._client is None:
            return
        if self._inflight:
            log.warning("publisher_stop_unacked", messages=len(self._inflight))
        info = self._client.publish(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
        self._status_mid = info.mid
        deadline = time.monotonic() + STOP_STATUS_S
        while (self._state == "connected" and self._status_mid is not None
               and time.monotonic() < deadline):
            self._last_progress = time.monotonic()
            self._handle_events(TURN_S)

    # -----------------------------------------------------------------------------------------
    # events from paho's thread

    def _handle_events(self, timeout: float) -> None:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return
        for _ in range(_EVENTS_PER_TURN):
            if event.generation == self._generation:
                if isinstance(event, _Puback):
                    self._on_puback(event)
                elif isinstance(event, _Connack):
                    self._on_connack(event)
                elif isinstance(event, _SocketError):
                    self._socket_error = event.text
                else:
                    self._on_lost(event.code, event.reason)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
        self._flush_acks()

    def _flush_acks(self) -> None:
        if self._acked:
            # the store counts records_acked_total (gateway.store.base)
            self._store.ack(self._acked)
            self._acked = []

    def _on_connack(self, event: _Connack) -> None:
        if self._state != "connecting":
            return
        if event.code >= 0x80:
            self._connect_failed(f"CONNACK 0x{event.code:02x} {event.reason}")
            return
        self._broker_max_packet = event.max_packet
        self._broker_receive_max = event.receive_max
        self._connected_at = time.monotonic()
        self._last_failure = None
        self._lease_now = True
        self._set_state("connected")
        assert self._client is not None
        info = self._client.publish(self._status_topic, STATUS_ONLINE, qos=1, retain=True)
        self._status_mid = info.mid
        settings = self.settings
        if self._lost_at is not None:
            log.info("broker_recovered", host=settings.host, port=settings.port,
                     outage_s=round(time.monotonic() - self._lost_at, 3))
            self._lost_at = None
        elif not self._ever_connected:
            log.info("broker_connected", host=settings.host, port=settings.port,
                     client_id=self._client_id, tls=self._tls is not None,
                     max_packet=event.max_packet, receive_max=event.receive_max)
        self._ever_connected = True

    def _on_lost(self, code: int, reason: str) -> None:
        if self._socket_error is not None:
            reason = f"{reason}: {self._socket_error}"
        if self._state != "connected":
            self._connect_failed(reason)
            return
        self._flush_acks()
        if self._inflight and code in _SIZE_SUSPECT_LOSS_CODES:
            self._suspect_size(code)
        unacked = len(self._inflight)
        self._metrics.inc("broker_disconnects_total")
        self._forget_connection()
        self._lost_at = time.monotonic()
        if self._lost_at - self._connected_at >= STABLE_CONNECTION_S:
            self._attempts = 0
        log.warning("broker_lost", reason=reason, code=f"0x{code:02x}", unacked_messages=unacked)
        self._schedule_reconnect()

    def _on_puback(self, event: _Puback) -> None:
        if event.mid == self._status_mid:
            self._status_mid = None
            return
        sent = self._inflight.pop(event.mid, None)
        if sent is None:
            return
        if event.code < 0x80:
            self._acked.extend(sent.seqs)
            self._refusal_streak.pop(sent.group, None)
            for seq in sent.seqs:
                self._alone.discard(seq)
                self._suspects.pop(seq, None)
            if self._refused_topics.pop(sent.topic, None) is not None:
                log.info("publish_accepted", topic=sent.topic)
            self._dead_lettering.pop(sent.group, None)
            return
        code = f"0x{event.code:02x}"
        self._metrics.inc("puback_errors_total", label=code)
        permanent = PERMANENT_PUBACK_CODES.get(event.code)
        if permanent is not None and len(sent.seqs) == 1:
            action = "dead_letter"
            self._dead_letter(sent.group, list(sent.seqs), permanent,
                              f"PUBACK {code} {event.reason}")
        elif permanent is not None:
            action = "split"
            self._alone.update(sent.seqs)
            self._retry(sent.seqs)
        else:
            action = "retry"
            self._retry(sent.seqs)
            streak = self._refusal_streak.get(sent.group, 0)
            backoff = self.settings.retry_backoff_s * 2 ** min(streak, 16)
            cap = max(self.settings.retry_backoff_s, self.settings.reconnect_max_s)
            self._held[sent.group] = time.monotonic() + min(backoff, cap)
            self._refusal_streak[sent.group] = streak + 1
        if self._refused_topics.get(sent.topic) != event.code:
            self._refused_topics[sent.topic] = event.code
            log.warning("publish_refused", topic=sent.topic, code=code, reason=event.reason,
                        records=len(sent.seqs), action=action)

    # -----------------------------------------------------------------------------------------
    # resolutions

    def _retry(self, seqs: tuple[int, ...]) -> None:
        self._store.retry(seqs)
        self._metrics.inc("records_retried_total", len(seqs))
        # they are leasable again (after any hold): do not wait for a wake to pick them up
        self._lease_now = True

    def _dead_letter(self, group: _Group, seqs: list[int], reason: str, detail: str) -> None:
        """Records refused for good go to the dead-letter table. Logged when a stream starts
        losing records for a reason, not for every batch: a broker limit that every telemetry
        record exceeds would otherwise log each commit for ever. A delivery on the stream
        re-arms the log; ``status`` counts and lists them all."""
        # the store counts records_dead_lettered_total{reason}
        self._store.reject(seqs, reason)
        for seq in seqs:
            self._alone.discard(seq)
            self._suspects.pop(seq, None)
        reasons = self._dead_lettering.setdefault(group, set())
        if reason not in reasons:
            reasons.add(reason)
            log.error("records_dead_lettered", serial=group[0], kind=group[1], reason=reason,
                      records=len(seqs), first_seq=seqs[0], detail=detail,
                      note="more from this stream are only counted until it delivers again")

    def _suspect_size(self, code: int) -> None:
        """The broker dropped us while messages were in flight, in a way that says it refused
        one (see the module docstring): blame the largest in-flight envelope."""
        guilty = max(self._inflight.values(), key=lambda sent: sent.payload_bytes)
        if len(guilty.seqs) > 1:
            cap = max(1, guilty.payload_bytes // 2)
            if self._batch_bytes_cap is None or cap < self._batch_bytes_cap:
                self._batch_bytes_cap = cap
                log.warning("broker_size_limit_suspected", code=f"0x{code:02x}",
                            batch_bytes=cap)
            return
        seq = guilty.seqs[0]
        self._suspects[seq] = self._suspects.get(seq, 0) + 1
        if self._suspects[seq] >= 2:
            self._dead_letter(guilty.group, [seq], REASON_TOO_LARGE,
                              f"connection dropped (0x{code:02x}) twice while this "
                              f"{guilty.payload_bytes}-byte message was in flight")

    # -----------------------------------------------------------------------------------------
    # leasing and publishing

    def _window(self) -> int:
        window = self.settings.inflight
        if self._broker_receive_max is not None:
            # one slot stays free for the status message
            window = min(window, max(1, self._broker_receive_max - 1))
        return window

    def _pump(self, now: float) -> None:
        settings = self.settings
        window = self._window()
        free = window - len(self._inflight)
        if free <= 0:
            return
        for group, until in list(self._held.items()):
            if now >= until:
                del self._held[group]
                self._lease_now = True
        held = self._held_count()
        # Held records stay leased (so later records can be leased past them) but do not use up
        # the window's share; the total leased is still bounded, beyond which a long refusal
        # blocks the queue behind it.
        ceiling = 2 * window * settings.batch_max_records
        self._lease(min(free * settings.batch_max_records - (len(self._waiting) - held),
                        ceiling - len(self._waiting)), now)
        if len(self._waiting) > self._held_count():
            self._send(free, now)

    def _is_held(self, record: StoredRecord) -> bool:
        return (record.serial, record.kind.value) in self._held

    def _held_count(self) -> int:
        if not self._held:
            return 0
        return sum(1 for record in self._waiting.values() if self._is_held(record))

    def _lease(self, limit: int, now: float) -> None:
        woken = self._wake is not None and self._wake.is_set()
        due = self._lease_now or woken or now - self._last_lease >= POLL_S or self._wake is None
        if limit <= 0 or not due:
            return
        if woken and self._wake is not None:
            self._wake.clear()
        records = self._store.lease(limit)
        self._last_lease = now
        # a full lease means more may be waiting: lease again next turn without a wake
        self._lease_now = len(records) == limit
        for record in records:
            self._waiting[record.seq] = record

    def _send(self, free: int, now: float) -> None:
        settings = self.settings
        records = sorted(self._waiting.values(), key=lambda record: record.seq)
        if self._held:
            records = [record for record in records if not self._is_held(record)]
        batch = build_envelopes(
            records, gateway_id=self._gateway_id, topic_prefix=settings.topic_prefix,
            max_records=settings.batch_max_records, max_bytes=settings.batch_max_bytes,
            max_packet=self._broker_max_packet or MQTT_MAX_PACKET,
            batch_bytes=self._batch_bytes_cap, alone=self._alone)
        refused: dict[tuple[_Group, str], tuple[list[int], str]] = {}
        for refusal in batch.refusals:
            record = self._waiting.pop(refusal.seq)
            key = ((record.serial, record.kind.value), refusal.reason)
            refused.setdefault(key, ([], refusal.detail))[0].append(refusal.seq)
        for (group, reason), (seqs, detail) in refused.items():
            self._dead_letter(group, seqs, reason, detail)
        for envelope in batch.envelopes:
            if free <= 0:
                break
            group = (envelope.serial, envelope.kind.value)
            last = self._last_sent.get(group, -math.inf)
            if not envelope.full and now - last < settings.publish_interval_s:
                continue
            if not self._publish(envelope):
                return
            self._last_sent[group] = now
            free -= 1

    def _publish(self, envelope: Envelope) -> bool:
        assert self._client is not None
        info = self._client.publish(envelope.topic, envelope.payload, qos=1,
                                    properties=self._publish_properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # the connection is going away under us; paho's own lost event may follow and is
            # ignored because _on_lost starts a new generation
            self._on_lost(0x80, f"publish failed: {mqtt.error_string(info.rc)}")
            return False
        self._inflight[info.mid] = _InFlight(envelope.seqs, (envelope.serial, envelope.kind.value),
                                             envelope.topic, len(envelope.payload))
        for seq in envelope.seqs:
            del self._waiting[seq]
        self._metrics.inc("mqtt_messages_published_total")
        self._metrics.inc("records_published_total", len(envelope.seqs))
        return True

    # -----------------------------------------------------------------------------------------
    # connection

    def _connect(self) -> None:
        settings = self.settings
        self._generation += 1
        self._socket_error = None
        client = self._new_client(settings, self._generation)
        self._client = client
        self._set_state("connecting")
        try:
            client.connect(settings.host, settings.port, keepalive=settings.keepalive_s,
                           clean_start=True)
        except OSError as exc:  # refused, unreachable, TLS handshake or verification
            self._connect_failed(f"{type(exc).__name__}: {exc}")
            return
        client.loop_start()
        self._connack_deadline = time.monotonic() + CONNACK_TIMEOUT_S

    def _new_client(self, settings: MqttSection, generation: int) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             protocol=MQTTProtocolVersion.MQTTv5, userdata=generation,
                             reconnect_on_failure=False)
        # the publisher keeps its own window; paho must not queue behind a smaller one
        client.max_inflight_messages_set(0)
        client.connect_timeout = min(5.0, float(settings.keepalive_s))
        if settings.username:
            client.username_pw_set(settings.username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.will_set(self._status_topic, STATUS_OFFLINE, qos=1, retain=True)
        client.on_connect = self._paho_on_connect
        client.on_disconnect = self._paho_on_disconnect
        client.on_publish = self._paho_on_publish
        client.on_log = self._paho_on_log
        return client

    def _connect_failed(self, reason: str) -> None:
        self._forget_connection()
        self._metrics.inc("broker_connect_failures_total")
        delay = self._schedule_reconnect()
        if reason != self._last_failure:
            self._last_failure = reason
            log.warning("broker_connect_failed", host=self.settings.host,
                        port=self.settings.port, reason=reason, retry_in_s=round(delay, 3))

    def _schedule_reconnect(self) -> float:
        settings = self.settings
        ceiling = min(settings.reconnect_max_s, settings.reconnect_min_s * 2 ** self._attempts)
        # jitter: gateways that lost the same broker do not all come back at the same instant
        delay = random.uniform(min(ceiling, max(settings.reconnect_min_s, ceiling / 2)), ceiling)
        self._attempts = min(self._attempts + 1, 30)
        self._next_attempt = time.monotonic() + delay
        return delay

    def _forget_connection(self) -> None:
        """Drop the connection and everything paho knew: the store is the only session."""
        self._generation += 1
        self._teardown_client()
        self._inflight.clear()
        self._waiting.clear()
        self._status_mid = None
        self._store.release_all()
        self._lease_now = True
        self._set_state("disconnected")

    def _teardown_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # disconnect first: paho's loop keeps running while messages are unacked otherwise
        client.disconnect()
        client.loop_stop()

    def _set_state(self, state: str) -> None:
        self._state = state
        self._metrics.set("broker_state", state)

    # -----------------------------------------------------------------------------------------
    # paho callbacks: run on paho's thread, only enqueue

    def _paho_on_connect(self, _client: mqtt.Client, generation: int, _flags: Any,
                         reason_code: Any, properties: Any) -> None:
        self._events.put(_Connack(
            generation, int(reason_code.value), str(reason_code),
            getattr(properties, "MaximumPacketSize", None) if properties is not None else None,
            getattr(properties, "ReceiveMaximum", None) if properties is not None else None))

    def _paho_on_disconnect(self, _client: mqtt.Client, generation: int, flags: Any,
                            reason_code: Any, _properties: Any) -> None:
        origin = "broker" if getattr(flags, "is_disconnect_packet_from_server", False) else "client"
        self._events.put(_Lost(generation, int(reason_code.value),
                               f"{reason_code} (from {origin})"))

    def _paho_on_log(self, _client: mqtt.Client, generation: int, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._events.put(_SocketError(generation, text))

    def _paho_on_publish(self, _client: mqtt.Client, generation: int, mid: int,
                         reason_code: Any, _properties: Any) -> None:
        self._events.put(_Puback(generation, mid, int(reason_code.value), str(reason_code)))


def _read_password(settings: MqttSection) -> str | None:
    if not settings.password_file:
        return None
    if not settings.username:
        raise ConfigError("is required when mqtt.password_file is set", key="mqtt.username")
    try:
        password = Path(settings.password_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the MQTT password file: {exc}",
                          path=settings.password_file, key="mqtt.password_file") from exc
    register_secret(password)  # from now on no log line can carry it
    return password


def _tls_context(settings: MqttSection) -> ssl.SSLContext:
    """TLS ≥ 1.2; the server's certificate and host name are verified unless
    ``insecure_skip_verify`` (for a lab broker with a self-signed certificate only)."""
    tls = settings.tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if tls.ca_file:
            context.load_verify_locations(cafile=tls.ca_file)
        else:
            context.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA certificates: {exc}", path=tls.ca_file or None,
                          key="mqtt.tls.ca_file") from exc
    if tls.cert_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client certificate and key: {exc}",
                              path=tls.cert_file, key="mqtt.tls.cert_file") from exc
    elif tls.key_file:
        raise ConfigError("needs mqtt.tls.cert_file as well", key="mqtt.tls.key_file")
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
