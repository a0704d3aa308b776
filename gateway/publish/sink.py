"""A JSON-lines sink in place of the broker, for ``bms-gateway replay --out FILE``.

It drains the store as the publisher would — the same envelopes, the same batching — but writes
each envelope as one line of the file and acknowledges it once the line is flushed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import structlog

from gateway.config import MqttSection
from gateway.metrics import Metrics
from gateway.publish.encode import build_envelopes
from gateway.store.base import Store

log = structlog.get_logger(__name__)

_LEASE = 5000


class JsonlSink:
    def __init__(self, path: Path, gateway_id: str, store: Store, metrics: Metrics, *,
                 settings: MqttSection, wake: threading.Event | None = None) -> None:
        self.path = path
        self.gateway_id = gateway_id
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.wake = wake or threading.Event()
        self.last_progress = time.monotonic()
        self.envelopes_written = 0

    def run(self, stop: threading.Event) -> None:
        """Write envelopes until ``stop`` is set and nothing is left in the store."""
        with self.path.open("wb") as out:
            while True:
                self.last_progress = time.monotonic()
                records = self.store.lease(_LEASE)
                if not records:
                    if stop.is_set():
                        break
                    self.wake.wait(0.1)
                    self.wake.clear()
                    continue
                batch = build_envelopes(records, gateway_id=self.gateway_id,
                                        topic_prefix=self.settings.topic_prefix,
                                        max_records=self.settings.batch_max_records,
                                        max_bytes=self.settings.batch_max_bytes)
                for envelope in batch.envelopes:
                    out.write(envelope.payload)
                    out.write(b"\n")
                out.flush()
                self.store.ack(seq for envelope in batch.envelopes for seq in envelope.seqs)
                self.envelopes_written += len(batch.envelopes)
                for refusal in batch.refusals:
                    self.store.reject([refusal.seq], refusal.reason)  # the store counts it
                    log.warning("record_refused", seq=refusal.seq, reason=refusal.reason,
                                detail=refusal.detail)
        log.info("replay_output_written", file=str(self.path), envelopes=self.envelopes_written)
