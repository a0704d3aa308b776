"""MQTT topic names, a contract other programs subscribe to (see ARCHITECTURE.md).

- ``{prefix}/{serial}/telemetry``, ``{prefix}/{serial}/health``, ``{prefix}/{serial}/events``:
  one JSON envelope per message (``gateway.publish.encode``).
- ``{prefix}/gateway/{gateway_id}/status``: retained. Its payload is the plain string ``online``
  (published by the gateway on every connect) or ``offline`` (the Last Will, sent by the broker when
  the gateway dies, and published by the gateway itself on a clean stop, because a broker does not
  send the will on a clean disconnect). Plain strings rather than JSON so an operator can read it
  with ``mosquitto_sub -t 'bms/gateway/+/status' -v`` and a dashboard can match it literally.

A serial is learned from the bus, so it is checked before it becomes a topic level: a serial with
``/`` would move the record to a different topic tree and ``+``/``#`` would make the name invalid.
Such records are refused for good (dead-lettered) rather than published under a mangled name.
"""

from __future__ import annotations

from gateway.model import RecordKind

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"

#: MQTT's limit on a topic name's UTF-8 length
_MAX_TOPIC_BYTES = 65535
_FORBIDDEN_IN_LEVEL = ("/", "+", "#", "\0")


def level_problem(value: str) -> str | None:
    """Why ``value`` cannot be one topic level, or None if it can."""
    if not value:
        return "empty"
    bad = [c for c in _FORBIDDEN_IN_LEVEL if c in value]
    if bad:
        return f"contains {', '.join(repr(c) for c in bad)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "not encodable as UTF-8"
    return None


def record_topic(prefix: str, serial: str, kind: RecordKind) -> str:
    """``{prefix}/{serial}/{kind}``. Raises ``ValueError`` when the serial is not a valid level."""
    problem = level_problem(serial)
    if problem is not None:
        raise ValueError(f"serial {serial!r} cannot be a topic level: {problem}")
    topic = f"{prefix}/{serial}/{kind.value}"
    if len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError(f"topic for serial {serial[:40]!r}... is longer than MQTT allows")
    return topic


def status_topic(prefix: str, gateway_id: str) -> str:
    """``{prefix}/gateway/{gateway_id}/status`` (retained; the Last Will)."""
    return f"{prefix}/gateway/{gateway_id}/status"
