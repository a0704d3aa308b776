"""structlog set-up: JSON lines for journald (or any non-terminal), a console renderer on a
terminal.

Events are named once and logged on state transitions (``broker_lost``, ``store_full``), never per
frame or per record; docs/operations.md lists every event with what an operator should do about
it. Three processors guard what reaches the journal:

- ``RepeatLimiter``: a warning or error that comes back with the same identity (event name plus
  the fields that say *what* failed: stage, topic, host, reason, ...) is written at most once per
  ``REPEAT_INTERVAL_S``; the next one written says how many were left out
  (``repeats_suppressed``). The counters in ``bms-gateway status`` stay exact; the log is for
  transitions.
- ``redact``: no secret in a log line. A field whose name says it holds one is blanked, any PEM
  private key block is cut out of any text, and so is every secret the daemon has read
  (``register_secret``: the MQTT password), wherever it appears, tracebacks included.
- Under systemd, each line starts with its syslog priority (``<4>`` for a warning), which journald
  strips and stores, so ``journalctl -u bms-gateway -p warning`` shows warnings and worse.

Libraries that log through the standard ``logging`` module (paho, python-can) go through the same
redaction and renderer, so every line of the daemon's output has one format.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_SECRET_WORDS = ("password", "passwd", "secret", "token", "private_key", "key_material")
REDACTED = "[redacted]"
#: a PEM private key block, or what is left of one cut short
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL)

#: a warning or error with the same identity is written at most once per this many seconds
REPEAT_INTERVAL_S = 60.0
#: the fields that say what an event is about; the rest (counts, delays, error text) may differ
#: between repeats of the same failure
IDENTITY_FIELDS = ("stage", "stages", "topic", "serial", "host", "port", "path", "code", "reason",
                   "keys", "kind")
_LIMITED_LEVELS = frozenset({"warning", "error", "critical", "exception"})
#: syslog priorities journald reads from a "<N>" line prefix (SyslogLevelPrefix=, on by default)
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


# ---------------------------------------------------------------------------------------------
# secrets

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Never write ``value`` in a log line from now on (called where a secret is read)."""
    value = value.strip()
    if value:
        with _secrets_lock:
            _secrets.add(value)


def scrub(text: str) -> str:
    """``text`` without PEM private keys and without any registered secret."""
    if "PRIVATE KEY" in text:
        text = _PEM_PRIVATE_KEY.sub(REDACTED, text)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)  # a longer secret may hold a shorter
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _scrub_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if depth >= 4:
        return value
    if isinstance(value, dict):
        return {k: _scrub_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub_value(v, depth + 1) for v in value)
    if isinstance(value, BaseException):
        # rendered later (format_exc_info, or repr by the renderer): render it scrubbed here
        return scrub(repr(value))
    return value


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = REDACTED
        else:
            event[key] = _scrub_value(event[key])
    return event


# ---------------------------------------------------------------------------------------------
# repeats


@dataclass(slots=True)
class _Seen:
    written_at: float
    suppressed: int = 0


class RepeatLimiter:
    """A structlog processor that writes a repeating warning or error once per ``interval_s``.

    Repeats are events with the same name and the same values of ``IDENTITY_FIELDS``. The first
    is always written; later ones within the interval are dropped and counted; the first written
    after the interval carries ``repeats_suppressed``. Info and debug events pass untouched: they
    are transitions (``broker_recovered``) or asked for (``log_level = "debug"``).
    """

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S, *,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 4096) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._seen: dict[tuple[Any, ...], _Seen] = {}
        self._lock = threading.Lock()

    def __call__(self, _logger: Any, method_name: str,
                 event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        level = str(event.get("level", method_name))
        if level not in _LIMITED_LEVELS:
            return event
        key = (event.get("event"),
               *((f, repr(event[f])) for f in IDENTITY_FIELDS if f in event))
        with self._lock:
            now = self._clock()
            seen = self._seen.get(key)
            if seen is not None and now - seen.written_at < self.interval_s:
                seen.suppressed += 1
                raise structlog.DropEvent
            suppressed = seen.suppressed if seen is not None else 0
            self._seen[key] = _Seen(now)
            if len(self._seen) > self._max_keys:
                self._forget(now)
        if suppressed:
            event["repeats_suppressed"] = suppressed
        return event

    def _forget(self, now: float) -> None:
        """Bound the memory: drop keys whose interval is over (their pending counts are lost),
        then, if a flood of distinct keys remains, the oldest half."""
        self._seen = {k: s for k, s in self._seen.items() if now - s.written_at < self.interval_s}
        if len(self._seen) > self._max_keys:
            ordered = sorted(self._seen.items(), key=lambda item: item[1].written_at)
            self._seen = dict(ordered[len(ordered) // 2:])


class _StdlibRepeats(logging.Filter):
    """The same limiter for library log records (a formatter cannot drop a record)."""

    def __init__(self, limiter: RepeatLimiter) -> None:
        super().__init__()
        self._limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        event: dict[str, Any] = {"event": record.getMessage(), "logger": record.name}
        try:
            self._limiter(None, record.levelname.lower(), event)
        except structlog.DropEvent:
            return False
        if "repeats_suppressed" in event:
            record.repeats_suppressed = event["repeats_suppressed"]
        return True


# ---------------------------------------------------------------------------------------------
# set-up


def _journal_stream(stream: Any) -> bool:
    """True when ``stream`` is the journal's stream that systemd gave this process.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for a service whose output goes to the
    journal; the stream must still be that file (not redirected since) for the prefix to mean
    anything.
    """
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _priority_prefix(_logger: Any, method_name: str, line: Any) -> Any:
    level = method_name if method_name in _PRIORITY else "info"
    return f"<{_PRIORITY[level]}>{line}"


def configure_logging(level: str = "info", fmt: str = "auto", stream: Any = None, *,
                      repeat_interval_s: float = REPEAT_INTERVAL_S) -> None:
    """Configure structlog (and stdlib logging, which paho and python-can use) once per process."""
    stream = stream if stream is not None else sys.stderr
    console = fmt == "console" or (fmt == "auto" and hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=True) if console
                     else structlog.processors.JSONRenderer(sort_keys=False))
    final: list[Any] = [renderer]
    if not console and _journal_stream(stream):
        final.append(_priority_prefix)
    numeric = _LEVELS[level]
    limiter = RepeatLimiter(repeat_interval_s)
    # redact after the traceback is rendered into text, so the traceback is scrubbed too
    tail: list[Any] = [
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redact,
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars,
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    limiter, *tail, *final],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging: keep their warnings, same stream, same format.
    handler = logging.StreamHandler(stream)
    handler.addFilter(_StdlibRepeats(limiter))
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name,
                           structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True),
                           structlog.stdlib.ExtraAdder(allow=["repeats_suppressed"]), *tail],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


def set_level(level: str) -> None:
    """Change the level at run time (SIGHUP reload)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]))
    logging.getLogger().setLevel(max(_LEVELS[level], logging.WARNING))
