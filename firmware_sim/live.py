"""Live output: the simulator's frames paced onto a bus, and an SLCAN adapter on a
pseudo-terminal.

:func:`run_on_bus` takes anything with python-can's ``send(msg, timeout)``: a ``can.BusABC``
(virtual, socketcan/vcan, any interface) or :class:`SlcanPty`, which plays a serial CAN adapter
speaking the LAWICEL/SLCAN ASCII protocol on the master side of a pseudo-terminal, so that
python-can's ``slcan`` interface (through pyserial) can open the slave side like a real
``/dev/ttyACM0``.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
import tty
from dataclasses import dataclass
from typing import Protocol

import can
import structlog

from firmware_sim.simulator import Simulator

log = structlog.get_logger("firmware_sim.live")

#: below this, waiting for a frame's due time costs more than it is worth
_MIN_WAIT_S = 0.0005


class FrameSink(Protocol):
    def send(self, msg: can.Message, timeout: float | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class LiveStats:
    sent: int
    failed: int
    simulated_s: float  # from the run's start to the last frame handed to the bus


def run_on_bus(sim: Simulator, bus: FrameSink, stop: threading.Event | None = None,
               seconds: float | None = None, speed: float = 1.0) -> LiveStats:
    """Send the simulator's frames to ``bus`` until ``seconds`` of simulated time have passed
    (None: for ever) or ``stop`` is set.

    ``speed`` 1 paces frames in real time, 2 twice as fast, 0 as fast as the bus takes them.
    A frame the bus refuses (``can.CanError``: a full transmit queue, a bus-off adapter) is
    counted and logged on the transition into failing and back, never raised.
    """
    stop = stop or threading.Event()
    wall0 = time.monotonic()
    sim0_us = sim.start_us + round(sim.time_s * 1e6)
    sent = failed = 0
    failing = False
    last_us = sim0_us
    for msg in sim.messages(seconds):
        last_us = round(msg.timestamp * 1e6)
        if stop.is_set():
            break
        if speed > 0:
            delay = wall0 + (msg.timestamp * 1e6 - sim0_us) / 1e6 / speed - time.monotonic()
            if delay > _MIN_WAIT_S and stop.wait(delay):
                break
        try:
            bus.send(msg)
        except can.CanError as exc:
            failed += 1
            if not failing:
                failing = True
                log.warning("sim.send_failing", error=str(exc), frame_id=msg.arbitration_id)
            continue
        if failing:
            failing = False
            log.info("sim.send_recovered", failed=failed)
        sent += 1
    return LiveStats(sent, failed, (last_us - sim0_us) / 1e6)


class SlcanPty:
    """An SLCAN adapter on a pseudo-terminal: open it, hand :attr:`path` to the client.

    Commands from the client are answered by a thread (``O``/``L`` open the channel, ``C``
    closes it, ``S``/``s`` bitrates, ``V``/``v`` versions, ``N`` serial number, ``F`` status
    flags, transmit requests acknowledged and ignored: the BMS only talks). Frames are written
    only while the channel is open, like a real adapter. Writes never block the simulator: when
    nobody drains the terminal, the adapter's buffer fills and further frames are dropped and
    counted. SLCAN has no syntax for error frames; they are counted as not representable.
    """

    VERSION = b"1013"
    SERIAL = b"SIM1"
    _BUFFER_LIMIT = 256 * 1024

    def __init__(self) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no CR/LF translation: a byte pipe like a USB CDC
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._lock = threading.Lock()
        self._out = bytearray()
        self._open = False
        self._closed = threading.Event()
        self.sent = 0
        self.dropped_closed = 0  # frames while the client had the channel closed
        self.dropped_full = 0  # frames the client did not read fast enough
        self.not_representable = 0  # error frames
        self._thread = threading.Thread(target=self._serve, name="slcan-pty", daemon=True)
        self._thread.start()

    @property
    def is_open(self) -> bool:
        return self._open

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        if msg.is_error_frame:
            self.not_representable += 1
            return
        if not self._open:
            self.dropped_closed += 1
            return
        if msg.is_extended_id:
            line = f"T{msg.arbitration_id:08X}{msg.dlc:d}"
        else:
            line = f"t{msg.arbitration_id:03X}{msg.dlc:d}"
        data = (line + bytes(msg.data).hex().upper() + "\r").encode("ascii")
        with self._lock:
            if len(self._out) + len(data) > self._BUFFER_LIMIT:
                self.dropped_full += 1
                return
            self._out += data
            self.sent += 1
            self._flush_locked()

    def _flush_locked(self) -> None:
        while self._out:
            try:
                written = os.write(self._master, self._out)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EIO:  # nobody on the other side
                    return
                raise
            del self._out[:written]

    def _answer(self, command: bytes) -> bytes:
        head = command[:1]
        if head in (b"O", b"L"):
            self._open = True
            return b"\r"
        if head == b"C":
            self._open = False
            return b"\r"
        if head == b"V":
            return b"V" + self.VERSION + b"\r"
        if head == b"v":
            return b"v" + self.VERSION + b"\r"
        if head == b"N":
            return b"N" + self.SERIAL + b"\r"
        if head == b"F":
            return b"F00\r"
        if head in (b"t", b"r", b"d", b"b"):
            return b"z\r"
        if head in (b"T", b"R", b"D", b"B"):
            return b"Z\r"
        if head in (b"", b"S", b"s", b"Y", b"Z", b"X", b"W", b"M", b"m", b"Q"):
            return b"\r"
        return b"\a"

    def _serve(self) -> None:
        pending = bytearray()
        while not self._closed.is_set():
            with self._lock:
                writing = bool(self._out)
            readable, writable, _ = select.select(
                [self._master], [self._master] if writing else [], [], 0.05)
            if writable:
                with self._lock:
                    self._flush_locked()
            if not readable:
                continue
            try:
                chunk = os.read(self._master, 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # the client closed the terminal; keep serving
                    time.sleep(0.05)
                    continue
                raise
            pending += chunk
            while b"\r" in pending:
                command, _, rest = bytes(pending).partition(b"\r")
                pending[:] = rest
                reply = self._answer(command.strip(b"\n"))
                with self._lock:
                    self._out += reply
                    self._flush_locked()

    def close(self) -> None:
        """Stop the thread and close both ends. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout=2.0)
        os.close(self._master)
        os.close(self._slave)

    def __enter__(self) -> SlcanPty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
