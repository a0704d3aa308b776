"""Sources receive CAN frames and hand them to the pipeline through a bounded queue.

A source only receives. On a live bus a full queue drops the *oldest* frame and counts it
(``frames_dropped_total{reason="queue_full"}``): the bus is never blocked and the newest data wins.
Replaying a trace is different — nothing is lost by waiting — so a replay source blocks instead.

The base class owns the thread body (progress stamp, end-of-input, error counting); a subclass fills
``_open``, ``_receive`` and ``_close``, in the manner of python-can's ``recv`` / ``_recv_internal``.
"""

from __future__ import annotations

import collections
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable

import can

from gateway.metrics import Metrics
from gateway.model import Frame


class FrameQueue:
    """A bounded FIFO of frames between the receive thread and the pipeline thread."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self.capacity = capacity
        self._frames: collections.deque[Frame] = collections.deque()
        self._metrics = metrics
        self._not_empty = threading.Event()
        self._not_full = threading.Event()
        self._not_full.set()
        self._closed = threading.Event()

    def put_many(self, frames: Iterable[Frame], *, block: bool, stop: threading.Event) -> None:
        """Queue frames; when full either drop the oldest (live) or wait for room (replay)."""
        dropped = 0
        for frame in frames:
            while len(self._frames) >= self.capacity:
                if block:
                    self._not_empty.set()
                    # clear, then look again: a get_batch between the two has made room
                    self._not_full.clear()
                    if len(self._frames) < self.capacity:
                        break
                    if stop.is_set():
                        return
                    self._not_full.wait(0.1)
                else:
                    self._frames.popleft()
                    dropped += 1
            self._frames.append(frame)
        if dropped:
            self._metrics.inc("frames_dropped_total", dropped, "queue_full")
        self._not_empty.set()

    def get_batch(self, limit: int, timeout: float) -> list[Frame]:
        """Up to ``limit`` frames, oldest first; waits up to ``timeout`` s when there are none."""
        if not self._frames:
            self._not_empty.clear()
            if not self._frames and not self._closed.is_set():
                self._not_empty.wait(timeout)
        batch: list[Frame] = []
        pop = self._frames.popleft
        try:
            for _ in range(limit):
                batch.append(pop())
        except IndexError:
            pass
        self._not_full.set()
        return batch

    def close(self) -> None:
        """No more frames will come (end of a trace); wakes the consumer."""
        self._closed.set()
        self._not_empty.set()

    @property
    def closed_and_empty(self) -> bool:
        return self._closed.is_set() and not self._frames

    def __len__(self) -> int:
        return len(self._frames)


def frame_from_message(msg: can.Message) -> Frame:
    # positional: this runs for every frame
    channel = msg.channel
    return Frame(msg.timestamp, msg.arbitration_id, bytes(msg.data), msg.is_extended_id,
                 msg.is_fd, msg.is_error_frame, msg.is_remote_frame,
                 channel if channel.__class__ is str else str(channel or ""))


class Source(ABC):
    """Base of every source. ``run`` is the ``can-rx`` thread's body."""

    #: a replay waits for room in the queue; a live bus drops the oldest frame
    blocking = False

    def __init__(self, queue: FrameQueue, metrics: Metrics) -> None:
        self.queue = queue
        self.metrics = metrics
        self.last_progress = time.monotonic()
        self.finished = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Receive until ``stop`` is set or the input ends (then close the queue)."""
        self._open()
        try:
            while not stop.is_set():
                self.last_progress = time.monotonic()
                frames = self._receive(stop)
                if frames is None:
                    break
                if frames:
                    self.metrics.inc("frames_rx_total", len(frames))
                    self.queue.put_many(frames, block=self.blocking, stop=stop)
        finally:
            self._close()
            self.queue.close()
            self.finished.set()

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _receive(self, stop: threading.Event) -> list[Frame] | None:
        """Frames received since the last call (maybe none); None at the end of the input."""

    @abstractmethod
    def _close(self) -> None: ...

    def describe(self) -> str:
        return type(self).__name__
