"""The pipeline thread: decode → assemble → edge → store. One owner of all that state.

Frames come from the source's queue in batches; samples go through the edge core a batch at a time;
records and the edge core's checkpoints are committed to the store together, in one transaction, at
most every ``commit_interval_s`` (or sooner when ``commit_max_records`` wait), so a crash never
separates estimator state from the records it produced. The bound keeps a transaction (which
passes whole through SQLite's WAL) within what a store on a small disk allows its WAL, even
when a replay runs as fast as it goes. Nothing is published before it is committed: the
publisher is only woken after the commit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from gateway.metrics import Metrics
from gateway.model import Frame, Record, RecordKind, Sample
from gateway.sources.base import FrameQueue
from gateway.store.base import Store

log = structlog.get_logger(__name__)


class Assembler(Protocol):
    def feed(self, frame: Frame) -> list[Sample]: ...

    def flush(self, now_ts: float) -> list[Sample]: ...


class Edge(Protocol):
    def process(self, samples: list[Sample]) -> list[Record]: ...

    def take_checkpoints(self) -> dict[str, bytes]: ...


@dataclass(slots=True)
class PackSeen:
    """What ``status`` shows per serial."""

    last_seen_wall: float
    last_sample_ts: float
    soc_pct: float
    soh_pct: float | None = None
    last_record_ts: float | None = None


class Pipeline:
    def __init__(self, queue: FrameQueue, assembler: Assembler, edge: Edge, store: Store,
                 metrics: Metrics, *, on_commit: Callable[[], None] | None = None,
                 commit_interval_s: float = 0.25, commit_max_records: int = 1000,
                 batch_frames: int = 4096) -> None:
        self.queue = queue
        self.assembler = assembler
        self.edge = edge
        self.store = store
        self.metrics = metrics
        self.on_commit = on_commit
        self.commit_interval_s = commit_interval_s
        self.commit_max_records = commit_max_records
        self.batch_frames = batch_frames
        self.last_progress = time.monotonic()
        self.packs: dict[str, PackSeen] = {}
        self.finished = threading.Event()
        self._pending: list[Record] = []
        self._last_commit = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        """Process until the source's queue is closed and empty, or ``stop`` is set.

        On ``stop`` the frames already queued are still processed and committed (bounded by the
        queue's capacity), so a clean stop loses nothing that was received.
        """
        feed = self.assembler.feed
        try:
            while True:
                self.last_progress = time.monotonic()
                frames = self.queue.get_batch(self.batch_frames, 0.05)
                if frames:
                    samples: list[Sample] = []
                    for frame in frames:
                        produced = feed(frame)
                        if produced:
                            samples.extend(produced)
                    # cycles a quiet or lossy bus left incomplete, by measurement time
                    samples.extend(self.assembler.flush(frames[-1].ts))
                    self._process(samples)
                elif self.queue.closed_and_empty:
                    # end of the input: whatever cycle is still open goes out as it stands
                    self._process(self.assembler.flush(math.inf))
                    break
                elif stop.is_set() and not len(self.queue):
                    break
                if self._commit_due():
                    self.commit()
        finally:
            self.commit()
            self.finished.set()

    def _process(self, samples: list[Sample]) -> None:
        if not samples:
            return
        self._note_samples(samples)
        records = self.edge.process(samples)
        if records:
            self._note_records(records)
            self._pending.extend(records)

    def _commit_due(self) -> bool:
        if len(self._pending) >= self.commit_max_records:
            return True
        return time.monotonic() - self._last_commit >= self.commit_interval_s

    def commit(self) -> None:
        """Commit pending records with the edge core's changed state, in one transaction."""
        self._last_commit = time.monotonic()
        checkpoints = self.edge.take_checkpoints()
        if not self._pending and not checkpoints:
            return
        records, self._pending = self._pending, []
        # records_committed_total is the store's own count, exact across crashes
        self.store.commit(records, checkpoints)
        if records and self.on_commit is not None:
            self.on_commit()

    def _note_samples(self, samples: list[Sample]) -> None:
        now = time.time()
        for sample in samples:
            seen = self.packs.get(sample.serial)
            if seen is None:
                seen = self.packs[sample.serial] = PackSeen(now, sample.ts, sample.bms_soc_pct)
                log.info("pack_seen", serial=sample.serial)
            seen.last_seen_wall = now
            seen.last_sample_ts = sample.ts
            seen.soc_pct = sample.bms_soc_pct
        self.metrics.inc("samples_total", len(samples))

    def _note_records(self, records: list[Record]) -> None:
        for record in records:
            seen = self.packs.get(record.serial)
            if seen is None:
                continue
            seen.last_record_ts = record.ts
            if record.kind is RecordKind.HEALTH:
                soh = record.body.get("stateOfHealth")
                if isinstance(soh, (int, float)):
                    seen.soh_pct = float(soh)
