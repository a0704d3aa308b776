"""The main thread: starts the stage threads, handles signals, speaks sd_notify, runs the watchdog.

Crash-only: all state that matters lives in the store, so the supervisor never tries to heal a dead
stage. A stage whose thread dies ends the process with a non-zero code and systemd restarts it
(``Restart=on-failure``); a configuration error found by a stage (a trace that holds no
frame) exits 78, which the unit marks as not worth restarting.

``WATCHDOG=1`` is sent only while every running stage has stamped progress within
``watchdog_stall_s``: a wedged publisher or pipeline stops the pings and systemd restarts
the daemon. The main thread itself never waits on a stage's resources: the periodic status
write (``on_tick``, which goes through the store) runs on a thread of its own, so a store that
blocks (a full or failing SD card, a lock held by another process) cannot keep the supervisor
from noticing the stall, logging it and answering signals.

SIGHUP reloads (``on_reload``) between ``RELOADING=1`` and ``READY=1``, as systemd's notify
protocol asks, so ``systemctl reload`` waits for it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog

from gateway.errors import ConfigError

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_SOFTWARE = 70
EXIT_CONFIG = 78


def sd_notify(message: str) -> bool:
    """Send one notification to systemd if ``NOTIFY_SOCKET`` is set; True when sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


@dataclass(slots=True)
class Stage:
    """A thread of the daemon. ``progress`` returns the monotonic time of its last loop turn."""

    name: str
    target: Callable[[threading.Event], None]
    progress: Callable[[], float]
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None
    #: stop order: lower stops first (source, then pipeline, then publisher)
    order: int = 0

    def start(self) -> None:
        def body() -> None:
            try:
                self.target(self.stop)
            except ConfigError as exc:
                # bad input named by file and place: the message says it all, no traceback
                self.error = exc
                log.error("configuration_error", stage=self.name, error=str(exc))
            except BaseException as exc:
                self.error = exc
                log.error("stage_crashed", stage=self.name, error=repr(exc), exc_info=exc)

        self.thread = threading.Thread(target=body, name=self.name, daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Supervisor:
    def __init__(self, stages: list[Stage], *, stall_s: float,
                 on_tick: Callable[[], None] | None = None, tick_s: float = 2.0,
                 on_reload: Callable[[], None] | None = None,
                 done: Callable[[], bool] | None = None,
                 stop_timeout_s: float = 8.0) -> None:
        self.stages = stages
        self.stall_s = stall_s
        self.on_tick = on_tick
        self.tick_s = tick_s
        self.on_reload = on_reload
        self.done = done
        self.stop_timeout_s = stop_timeout_s
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self._signal: str | None = None
        self._ticker: threading.Thread | None = None

    # -- signals ----------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested.set()
            return
        self._signal = signal.Signals(signum).name
        self._stop_requested.set()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # -- main loop --------------------------------------------------------------------------
    def run(self, *, ready_status: str = "") -> int:
        for stage in self.stages:
            stage.start()
        sd_notify(f"READY=1\nSTATUS={ready_status or 'running'}\nMAINPID={os.getpid()}")
        log.info("gateway_ready", stages=[s.name for s in self.stages])
        interval = watchdog_interval_s()
        last_ping = 0.0
        last_tick = -math.inf  # the first status document goes out on the first turn
        stalled: set[str] = set()
        exit_code = EXIT_OK
        while not self._stop_requested.is_set():
            self._stop_requested.wait(0.2)
            now = time.monotonic()
            dead = [s for s in self.stages if not s.alive and s.error is not None]
            if dead:
                exit_code = self._exit_code_for(dead[0].error)
                break
            if self.done is not None and self.done():
                break
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._reload()
            wedged = {s.name for s in self.stages
                      if s.alive and now - s.progress() > self.stall_s}
            if wedged != stalled:
                if wedged - stalled:
                    log.error("stage_stalled", stages=sorted(wedged - stalled),
                              stall_s=self.stall_s)
                if stalled - wedged:
                    log.info("stage_resumed", stages=sorted(stalled - wedged))
                stalled = wedged
            if interval is not None and not wedged and now - last_ping >= interval:
                sd_notify("WATCHDOG=1")
                last_ping = now
            if self.on_tick is not None and now - last_tick >= self.tick_s:
                last_tick = now
                self._tick_in_background()
        reason = self._signal or ("stage failed" if exit_code else "finished")
        log.info("gateway_stopping", reason=reason)
        sd_notify("STOPPING=1")
        if not self._stop_stages() and exit_code == EXIT_OK:
            exit_code = EXIT_SOFTWARE
        for stage in self.stages:
            if stage.error is not None and exit_code == EXIT_OK:
                exit_code = self._exit_code_for(stage.error)
        if self._ticker is not None:
            self._ticker.join(timeout=self.stop_timeout_s)
        self._tick()
        log.info("gateway_stopped", exit_code=exit_code)
        return exit_code

    def _reload(self) -> None:
        if self.on_reload is None:
            return
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
        try:
            self.on_reload()
        finally:
            sd_notify("READY=1")

    def _tick_in_background(self) -> None:
        if self._ticker is not None and self._ticker.is_alive():
            return  # the last status write still waits on the store; the stall check reports it
        self._ticker = threading.Thread(target=self._tick, name="status", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        if self.on_tick is None:
            return
        try:
            self.on_tick()
        except Exception as exc:  # status is best effort; never take the daemon down for it
            log.warning("status_write_failed", error=repr(exc))

    @staticmethod
    def _exit_code_for(error: BaseException | None) -> int:
        return EXIT_CONFIG if isinstance(error, ConfigError) else EXIT_SOFTWARE

    def _stop_stages(self) -> bool:
        """Stop stages in order, each waiting for the one before; False if one did not stop."""
        deadline = time.monotonic() + self.stop_timeout_s
        ok = True
        for stage in sorted(self.stages, key=lambda s: s.order):
            stage.stop.set()
            if stage.thread is not None:
                stage.thread.join(timeout=max(0.1, deadline - time.monotonic()))
                if stage.thread.is_alive():
                    log.error("stage_did_not_stop", stage=stage.name)
                    ok = False
        return ok


def status_document(**parts: Any) -> str:
    return json.dumps(parts, separators=(",", ":"), default=str)
