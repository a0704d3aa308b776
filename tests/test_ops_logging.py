"""Logging as an operator meets it: JSON lines (with the syslog priority under journald), a
console line on a terminal, repeats rate-limited, secrets never written, and every event the
daemon can log documented in docs/operations.md with what to do about it."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.logging import configure_logging, register_secret, scrub

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "operations.md"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test configures logging for itself; put structlog and the root logger back after."""
    saved = structlog.get_config()
    handlers = logging.getLogger().handlers[:]
    level = logging.getLogger().level
    yield
    structlog.configure(**saved)
    logging.getLogger().handlers[:] = handlers
    logging.getLogger().setLevel(level)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


# ---------------------------------------------------------------------------------------------
# formats


def test_json_lines_with_level_and_time_and_the_configured_level() -> None:
    out = io.StringIO()
    configure_logging("warning", "auto", out)  # a StringIO is not a terminal: JSON
    log = structlog.get_logger("test")
    log.info("gateway_ready", stages=["can-rx"])
    log.warning("bus_lost", interface="socketcan", channel="can0", error="down")
    (entry,) = lines(out)
    assert entry["event"] == "bus_lost" and entry["level"] == "warning"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", entry["timestamp"])


def test_console_line_on_a_terminal() -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w", buffering=1) as terminal:
        configure_logging("info", "auto", terminal)
        structlog.get_logger("test").info("gateway_ready", stages=["can-rx"])
        text = os.read(leader, 4096).decode()
    os.close(leader)
    assert "gateway_ready" in text
    assert not text.lstrip().startswith("{")


def test_under_journald_each_line_carries_its_syslog_priority(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("info", "auto", stream)
        log = structlog.get_logger("test")
        log.info("gateway_ready")
        log.warning("broker_lost", reason="keepalive")
        log.error("stage_stalled", stages=["pipeline"])
        logging.getLogger("can").warning("library says hello")
    written = (tmp_path / "journal").read_text().splitlines()
    assert [line[:4] for line in written] == ["<6>{", "<4>{", "<3>{", "<4>{"]
    assert json.loads(written[3][3:])["logger"] == "can"
    # not the journal's stream (JOURNAL_STREAM names another file): no prefix
    other = io.StringIO()
    configure_logging("info", "json", other)
    structlog.get_logger("test").warning("broker_lost", reason="keepalive")
    assert other.getvalue().startswith("{")


# ---------------------------------------------------------------------------------------------
# repeats


def test_a_repeating_warning_is_written_once_per_interval_with_the_count_left_out() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out, repeat_interval_s=0.5)
    log = structlog.get_logger("test")
    for attempt in range(6):  # every backoff turn of an unreachable broker
        log.warning("broker_connect_failed", host="broker", port=8883,
                    reason="ConnectionRefusedError", retry_in_s=0.1 * attempt)
    # another identity (another reason) is its own line; info is never limited
    log.warning("broker_connect_failed", host="broker", port=8883, reason="TLS: expired")
    log.info("broker_recovered", outage_s=1.0)
    log.info("broker_recovered", outage_s=1.0)
    time.sleep(0.6)
    log.warning("broker_connect_failed", host="broker", port=8883,
                reason="ConnectionRefusedError")
    written = [(e["event"], e.get("reason"), e.get("repeats_suppressed")) for e in lines(out)]
    assert written == [
        ("broker_connect_failed", "ConnectionRefusedError", None),
        ("broker_connect_failed", "TLS: expired", None),
        ("broker_recovered", None, None),
        ("broker_recovered", None, None),
        ("broker_connect_failed", "ConnectionRefusedError", 5),
    ]


def test_repeats_of_library_messages_are_limited_too() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out, repeat_interval_s=60)
    for _ in range(3):
        logging.getLogger("can.interfaces.socketcan").warning("error frame on can0")
    assert [e["event"] for e in lines(out)] == ["error frame on can0"]


def test_publish_refused_per_topic() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out, repeat_interval_s=60)
    log = structlog.get_logger("test")
    for _ in range(3):
        for topic in ("bms/A/telemetry", "bms/B/telemetry"):
            log.warning("publish_refused", topic=topic, code="0x87", records=1, action="retry")
    assert [e["topic"] for e in lines(out)] == ["bms/A/telemetry", "bms/B/telemetry"]


# ---------------------------------------------------------------------------------------------
# secrets

PEM_BODY = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgTESTKEYMATERIAL0123"
PEM = f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\n-----END PRIVATE KEY-----\n"


def test_no_secret_in_any_field_nested_value_traceback_or_library_line() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    secret = "correct-horse-battery-staple-7"
    register_secret(secret)
    log = structlog.get_logger("test")
    log.warning("broker_connect_failed", reason=f"CONNACK 0x86 for password {secret}")
    log.info("detail", nested={"list": [f"x{secret}y", 3]}, mqtt_password="plain",
             token="abc", api_secret="def")
    log.warning("key_problem", error=f"cannot load {PEM}")
    try:
        raise ValueError(f"bad key material: {PEM} and {secret}")
    except ValueError as exc:
        log.error("stage_crashed", stage="publisher", error=repr(exc), exc_info=exc)
    logging.getLogger("paho").error("failed with %s", secret)
    text = out.getvalue()
    assert secret not in text
    assert PEM_BODY not in text
    assert "PRIVATE KEY" not in text
    entries = lines(out)
    assert [e["event"] for e in entries] == ["broker_connect_failed", "detail", "key_problem",
                                            "stage_crashed", "failed with [redacted]"]
    assert entries[1]["mqtt_password"] == entries[1]["token"] == "[redacted]"
    assert entries[1]["nested"] == {"list": ["x[redacted]y", 3]}
    assert "Traceback" in entries[3]["exception"]


def test_scrub_cuts_a_key_block_cut_short() -> None:
    assert PEM_BODY not in scrub("-----BEGIN EC PRIVATE KEY-----\n" + PEM_BODY)
    assert scrub("no secret here") == "no secret here"


# ---------------------------------------------------------------------------------------------
# the events an operator can meet, each documented with what to do


def _is_logger(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return re.fullmatch(r"_?log(ger)?", node.id) is not None
    if isinstance(node, ast.Call):
        func = node.func
        return ((isinstance(func, ast.Name) and func.id == "_log")
                or (isinstance(func, ast.Attribute) and func.attr == "get_logger"))
    return False


def logged_events() -> dict[str, set[str]]:
    """Every event name the daemon's code logs, with the levels it is logged at."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS and _is_logger(node.func.value) and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                level = "error" if node.func.attr == "exception" else node.func.attr
                found.setdefault(node.args[0].value, set()).add(level)
    return found


def documented_events() -> dict[str, tuple[str, str, str]]:
    """The rows of the events table: name → (level, meaning, what to do)."""
    rows: dict[str, tuple[str, str, str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\| `([a-z_.]+)` \| (\w+) \| (.+) \| (.+) \|", line)
        if match:
            name, level, meaning, action = match.groups()
            assert name not in rows, f"{name} is documented twice"
            rows[name] = (level, meaning.strip(), action.strip())
    return rows


def test_every_logged_event_is_documented_with_its_level_and_what_to_do() -> None:
    logged = logged_events()
    documented = documented_events()
    assert len(logged) > 40  # the scan found the daemon's events
    assert sorted(set(logged) - set(documented)) == [], "logged but not in docs/operations.md"
    assert sorted(set(documented) - set(logged)) == [], "documented but never logged"
    for name, (level, meaning, action) in documented.items():
        assert level in logged[name], f"{name}: documented as {level}, logged as {logged[name]}"
        assert meaning and action, name
