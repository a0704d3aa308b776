"""The real daemon as systemd runs it: the notify protocol on a real NOTIFY_SOCKET with a
watchdog, a stage wedged for real, and SIGHUP reloads.

The wedge is honest: the test takes an exclusive lock on the daemon's store file from another
connection (`BEGIN EXCLUSIVE`, as any process with the file open could), so the pipeline's
commit really waits inside SQLite. The lock is held for less than SQLite's busy timeout (5 s),
so the commit then goes through and the daemon recovers by itself: pings stop while it waits and
come back after.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker, free_port
from tests.support.daemon import REPO, child_env, gateway_config, status
from tests.support.subscriber import Subscriber

WATCHDOG_USEC = 400_000  # the daemon pings every 0.2 s while healthy
STALL_S = 1.0  # the smallest watchdog_stall_s the configuration allows


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET, read on a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        with self._lock:
            return [m for _, m in self.messages]

    def pings(self, after: float = 0.0, before: float = float("inf")) -> list[float]:
        with self._lock:
            return [t for t, m in self.messages if m == "WATCHDOG=1" and after < t < before]

    def wait_for(self, prefix: str, timeout: float, proc: subprocess.Popen[bytes],
                 log: Path) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for t, m in self.messages:
                    if m.startswith(prefix):
                        return t
            assert proc.poll() is None, f"daemon exited {proc.returncode}:\n{_tail(log)}"
            time.sleep(0.02)
        raise AssertionError(f"no {prefix} within {timeout} s:\n{_tail(log)}")

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.fixture
def notifications(tmp_path: Path) -> Iterator[Notifications]:
    n = Notifications(tmp_path / "notify.sock")
    yield n
    n.close()


def _start(config: Path, log: Path, notify: Notifications) -> subprocess.Popen[bytes]:
    env = child_env()
    env["NOTIFY_SOCKET"] = str(notify.path)
    env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
    env.pop("WATCHDOG_PID", None)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


SIMULATOR = {"kind": "simulator", "simulator": {"speed": 1.0}}


def test_watchdog_pings_stop_while_the_pipeline_is_wedged_and_resume_after(
        tmp_path: Path, notifications: Notifications) -> None:
    config = gateway_config(tmp_path, broker_port=free_port(), source=SIMULATOR,
                            extra={"gateway": {"watchdog_stall_s": STALL_S}})
    log = tmp_path / "daemon.log"
    proc = _start(config, log, notifications)
    try:
        ready = notifications.wait_for("READY=1", 120, proc, log)
        time.sleep(1.5)
        healthy = notifications.pings(after=ready)
        assert len(healthy) >= 4, notifications.texts()

        holder = sqlite3.connect(tmp_path / "store.sqlite", timeout=10, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        wedged_at = time.monotonic()
        time.sleep(3.5)  # below the daemon's SQLite busy timeout (5 s): a wait, not a failure
        released_at = time.monotonic()
        holder.execute("ROLLBACK")
        holder.close()
        time.sleep(2.0)
        assert proc.poll() is None, _tail(log)
    finally:
        code = _stop(proc)
    assert code == 0, _tail(log)

    # pings stop within the stall time (plus the pipeline's next commit, a supervisor turn and
    # slack for a loaded machine) ...
    during = notifications.pings(after=wedged_at + STALL_S + 1.0, before=released_at)
    assert during == [], (during, _tail(log))
    # ... and come back once the commit goes through
    after = notifications.pings(after=released_at + 0.3)
    assert len(after) >= 3, (notifications.texts(), _tail(log))
    texts = notifications.texts()
    assert texts[0].startswith("READY=1")
    assert texts[-1] == "STOPPING=1"

    events = _events(log)
    stalled = [e for e in events if e["event"] == "stage_stalled"]
    assert stalled and "pipeline" in stalled[0]["stages"], _tail(log)
    resumed = [e for e in events if e["event"] == "stage_resumed"]
    assert resumed and "pipeline" in resumed[-1]["stages"]
    # the wedge lost nothing: the commit waited, then went through
    assert not [e for e in events if e["event"] in ("stage_crashed", "stage_did_not_stop")]


def test_sighup_reloads_level_and_intervals_without_losing_a_record(
        tmp_path: Path, notifications: Notifications) -> None:
    broker_dir = tmp_path / "broker"
    with Broker(broker_dir) as broker, Subscriber(broker.host, broker.port) as sub:
        config = gateway_config(tmp_path, broker_port=broker.port, source=SIMULATOR,
                                mqtt={"publish_interval_s": 0.1})
        log = tmp_path / "daemon.log"
        proc = _start(config, log, notifications)
        try:
            notifications.wait_for("READY=1", 120, proc, log)
            sub.wait_for_records(5, timeout=30)
            counted = len(sub.envelopes())
            time.sleep(4.0)
            fast = len(sub.envelopes()) - counted
            assert fast >= 8, fast  # a message per telemetry sample (several a second)

            # 1. a reloadable change: log level and the publish interval
            config.write_text(config.read_text()
                              .replace("[gateway]\n", '[gateway]\nlog_level = "warning"\n', 1)
                              .replace("publish_interval_s = 0.1", "publish_interval_s = 5.0"))
            proc.send_signal(signal.SIGHUP)
            notifications.wait_for("RELOADING=1", 10, proc, log)
            _wait_for_event(log, "reloaded", proc)
            time.sleep(0.5)
            counted = len(sub.envelopes())
            time.sleep(4.0)
            # at most one message per serial and kind per 5 s now
            slow = len(sub.envelopes()) - counted
            assert slow <= 3 < fast, (slow, fast)

            # 2. a change that needs a restart is named, and nothing else changes
            config.write_text(config.read_text()
                              .replace("[mqtt]\n", '[mqtt]\ntopic_prefix = "elsewhere"\n', 1))
            proc.send_signal(signal.SIGHUP)
            _wait_for_event(log, "reload_needs_restart", proc)

            # 3. a file that no longer parses changes nothing at all
            valid = config.read_text()
            config.write_text(valid + "\n[broken\n")
            proc.send_signal(signal.SIGHUP)
            _wait_for_event(log, "reload_failed", proc)
            assert proc.poll() is None
            config.write_text(valid)
        finally:
            code = _stop(proc)
        assert code == 0, _tail(log)
        final = status(config)
        sub.wait_until(lambda: sub.received >= final["records_committed_total"]
                       - final["store_records"], 30, "every acked record at the subscriber")

    events = _events(log)
    reloaded = next(e for e in events if e["event"] == "reloaded")
    assert reloaded["changed"] == ["gateway.log_level", "mqtt.publish_interval_s"]
    pending = next(e for e in events if e["event"] == "reload_needs_restart")
    assert pending["keys"] == ["mqtt.topic_prefix"]
    # the new level holds: no info line after the reload but the reload's own
    infos = [e for e in events[events.index(reloaded) + 1:] if e["level"] == "info"]
    assert infos == [], infos
    # RELOADING=1 was followed by READY=1, as systemctl reload waits for
    texts = notifications.texts()
    first_reload = texts.index(next(t for t in texts if t.startswith("RELOADING=1")))
    assert texts[first_reload + 1:].index("READY=1") >= 0
    # nothing lost across the reloads: every committed record is delivered or still stored
    assert final["records_committed_total"] == sub.received + final["store_records"] \
        + final["records_dropped_total"], final


def _wait_for_event(log: Path, name: str, proc: subprocess.Popen[bytes],
                    timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f'"event": "{name}"' in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, _tail(log)
        time.sleep(0.05)
    raise AssertionError(f"no {name} within {timeout} s:\n{_tail(log)}")


def test_status_under_a_running_daemon(tmp_path: Path) -> None:
    """``status`` while the daemon runs: the table has every figure an operator looks for."""
    with Broker(tmp_path / "broker") as broker:
        config = gateway_config(tmp_path, broker_port=broker.port, source=SIMULATOR)
        log = tmp_path / "daemon.log"
        env = child_env()
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + 120
            while '"gateway_ready"' not in log.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
                time.sleep(0.1)
            while ((summary := status(config))["records_acked_total"] < 3
                   or not summary["daemon_running"]):
                assert time.monotonic() < deadline, summary
                time.sleep(0.3)
            table = subprocess.run([sys.executable, "-m", "gateway", "status", "-c",
                                    str(config)], capture_output=True, text=True, timeout=60,
                                   cwd=REPO, env=env, check=True).stdout
        finally:
            code = _stop(proc)
        assert code == 0, _tail(log)
    assert summary["daemon_running"] is True
    assert summary["broker_state"] == "connected"
    pack = summary["packs"]["SIM-0001"]
    assert pack["soc_pct"] is not None and pack["last_record_ts"] is not None
    for expected in ("daemon running, broker connected", "records committed", "records acked",
                     "records dropped", "records dead-lettered", "store depth", "oldest unsent",
                     "SIM-0001", "SOC %", "SOH %", "last seen", "last record"):
        assert expected in table, table
    # the serial's row: last seen, last record, SOC (SOH comes with the first health record)
    row = next(line for line in table.splitlines() if line.strip().startswith("SIM-0001"))
    assert row.count("s ago") == 2, row
    assert row.split()[-2] == f"{pack['soc_pct']:.1f}", row
