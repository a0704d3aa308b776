"""Supervisor: sd_notify over a real AF_UNIX datagram socket, watchdog only while stages progress,
exit codes for a dead stage."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.supervisor import EXIT_CONFIG, EXIT_OK, EXIT_SOFTWARE, Stage, Supervisor


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def _drain(sock: socket.socket) -> list[tuple[float, str]]:
    out = []
    while True:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            return out


class Worker:
    """A stage that stamps progress each turn, and can be wedged on purpose."""

    def __init__(self) -> None:
        self.progress = time.monotonic()
        self.wedged = threading.Event()

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(0.02):
            if not self.wedged.is_set():
                self.progress = time.monotonic()


def _collect(sock: socket.socket, until: threading.Event) -> list[tuple[float, str]]:
    got: list[tuple[float, str]] = []
    while not until.is_set():
        got.extend(_drain(sock))
    got.extend(_drain(sock))
    return got


def _mark(text: str) -> None:
    """Put a marker into the notify socket's queue, in order with the supervisor's messages,
    so the test reads the order of events from the queue rather than from receive times."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(f"MARK={text}".encode(), os.environ["NOTIFY_SOCKET"])


def test_ready_watchdog_stopping_and_no_watchdog_while_wedged(
        notify_socket: socket.socket) -> None:
    worker = Worker()
    stage = Stage("pipeline", worker.run, lambda: worker.progress)
    sup = Supervisor([stage], stall_s=0.3)
    done = threading.Event()
    messages: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: messages.extend(_collect(notify_socket, done)))
    reader.start()

    def script() -> None:
        time.sleep(0.8)
        worker.wedged.set()
        # stall_s (0.3 s) and a supervisor turn (0.2 s) after the wedge, pings must have
        # stopped; a second is ample room on a loaded machine
        time.sleep(1.0)
        _mark("wedged")
        time.sleep(1.0)
        _mark("unwedge")
        worker.wedged.clear()
        time.sleep(0.8)
        sup.request_stop()

    threading.Thread(target=script).start()
    assert sup.run() == EXIT_OK
    done.set()
    reader.join()
    texts = [m for _, m in messages]
    assert texts[0].startswith("READY=1")
    assert texts[-1] == "STOPPING=1"
    wedged, unwedged = texts.index("MARK=wedged"), texts.index("MARK=unwedge")
    assert texts[:wedged].count("WATCHDOG=1") >= 3
    assert texts[wedged:unwedged].count("WATCHDOG=1") == 0
    assert texts[unwedged:].count("WATCHDOG=1") >= 2


def test_dead_stage_exits_non_zero(notify_socket: socket.socket) -> None:
    def crash(_stop: threading.Event) -> None:
        raise RuntimeError("boom")

    sup = Supervisor([Stage("pipeline", crash, time.monotonic)], stall_s=5)
    assert sup.run() == EXIT_SOFTWARE


def test_config_error_in_a_stage_exits_78(notify_socket: socket.socket) -> None:
    def bad_trace(_stop: threading.Event) -> None:
        raise ConfigError("the trace holds no CAN frame", path="empty.log")

    sup = Supervisor([Stage("can-rx", bad_trace, time.monotonic)], stall_s=5)
    assert sup.run() == EXIT_CONFIG


def test_no_notify_socket_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    worker = Worker()
    sup = Supervisor([Stage("w", worker.run, lambda: worker.progress)], stall_s=5,
                     done=lambda: True)
    assert sup.run() == EXIT_OK
