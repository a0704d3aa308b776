"""A live CAN bus through any python-can interface (socketcan, slcan, virtual, pcan, ...).

A bus that fails (adapter unplugged, interface down, bus-off) is closed, counted and reopened after
``reopen_backoff_s``; the daemon does not restart for it. The transitions are logged once each:
``bus_lost`` and ``bus_recovered``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import can
import structlog

from gateway.errors import SourceError
from gateway.metrics import Metrics
from gateway.model import Frame
from gateway.sources.base import FrameQueue, Source, frame_from_message

log = structlog.get_logger(__name__)

#: frames taken from the driver per turn before handing them to the queue
_BATCH = 512

# Linux: getsockopt(SOL_SOCKET, SO_MEMINFO) gives nine u32, the last (SK_MEMINFO_DROPS) the
# frames the kernel dropped because the socket's receive buffer was full. Read beside python-can's
# own recv, it does not disturb it (SO_RXQ_OVFL would add ancillary data python-can rejects).
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")


def socket_drops(bus: can.BusABC) -> int | None:
    """Frames the kernel dropped for this bus's socket so far, or None where not knowable."""
    sock = getattr(bus, "socket", None)
    if not isinstance(sock, socket.socket):
        return None
    try:
        return int(_MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO,
                                                   _MEMINFO.size))[8])
    except (OSError, struct.error):
        return None


class BusSource(Source):
    def __init__(self, queue: FrameQueue, metrics: Metrics, *, interface: str, channel: str,
                 bitrate: int = 0, options: dict[str, Any] | None = None,
                 filters: Sequence[dict[str, Any]] | None = None,
                 reopen_backoff_s: float = 1.0) -> None:
        super().__init__(queue, metrics)
        self.interface = interface
        self.channel = channel
        self.kwargs: dict[str, Any] = dict(options or {})
        if bitrate:
            self.kwargs["bitrate"] = bitrate
        self.filters = list(filters) if filters else None
        self.reopen_backoff_s = reopen_backoff_s
        self._bus: can.BusABC | None = None
        self._lost_since: float | None = None
        self._drops_seen = 0

    def describe(self) -> str:
        return f"{self.interface}:{self.channel}"

    def open_bus(self) -> can.BusABC:
        """Open the bus once; raises SourceError naming the interface and channel."""
        try:
            bus = can.Bus(interface=self.interface, channel=self.channel,
                          can_filters=self.filters, **self.kwargs)
        except (can.CanError, OSError, ValueError, ImportError, TypeError) as exc:
            raise SourceError(f"cannot open CAN interface {self.interface!r} channel "
                              f"{self.channel!r}: {exc}") from exc
        return bus

    def _open(self) -> None:
        self._bus = self.open_bus()
        self._drops_seen = 0
        log.info("bus_opened", interface=self.interface, channel=self.channel,
                 filters=len(self.filters or ()))

    def _receive(self, stop: threading.Event) -> list[Frame] | None:
        bus = self._bus
        if bus is None:
            self._reopen(stop)
            return []
        frames: list[Frame] = []
        try:
            msg = bus.recv(timeout=0.05)
            while msg is not None:
                frames.append(frame_from_message(msg))
                if len(frames) >= _BATCH:
                    break
                msg = bus.recv(timeout=0)
        except (can.CanError, OSError, ValueError) as exc:
            self._lose(exc)
            return frames
        self._count_socket_drops(bus)
        if self._lost_since is not None and frames:
            self._recovered()
        return frames

    def _count_socket_drops(self, bus: can.BusABC) -> None:
        """A reader that does not keep up loses frames in the kernel: count them."""
        drops = socket_drops(bus)
        if drops is not None and drops > self._drops_seen:
            self.metrics.inc("frames_dropped_total", drops - self._drops_seen, "socket_overflow")
            self._drops_seen = drops

    def _lose(self, exc: BaseException) -> None:
        self.metrics.inc("source_errors_total", 1, type(exc).__name__)
        if self._lost_since is None:
            self._lost_since = time.monotonic()
            self.metrics.set("bus_state", "lost")
            log.warning("bus_lost", interface=self.interface, channel=self.channel,
                        error=str(exc))
        self._shutdown_bus()

    def _recovered(self) -> None:
        assert self._lost_since is not None
        outage = time.monotonic() - self._lost_since
        self._lost_since = None
        self.metrics.set("bus_state", "up")
        log.info("bus_recovered", interface=self.interface, channel=self.channel,
                 outage_s=round(outage, 3))

    def _reopen(self, stop: threading.Event) -> None:
        stop.wait(self.reopen_backoff_s)
        if stop.is_set():
            return
        try:
            self._bus = self.open_bus()
            self._drops_seen = 0
        except SourceError as exc:
            self.metrics.inc("source_errors_total", 1, "reopen_failed")
            log.debug("bus_reopen_failed", error=str(exc))

    def _shutdown_bus(self) -> None:
        if self._bus is not None:
            try:
                self._bus.shutdown()
            except (can.CanError, OSError) as exc:
                log.debug("bus_shutdown_failed", error=str(exc))
            self._bus = None

    def _close(self) -> None:
        self._shutdown_bus()
