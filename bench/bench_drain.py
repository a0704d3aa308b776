"""Drain a stored backlog to a private Mosquitto, batched and unbatched; print records/s.

    .venv/bin/python bench/bench_drain.py                # 100,000 records, SQLite store
    .venv/bin/python bench/bench_drain.py --records 20000 --store memory

Each run commits the backlog first (not timed), starts the real ``Publisher`` against a private
broker on a loopback port, and times until the store is empty, i.e. until every record has been
acknowledged by the broker and deleted. The unbatched run (``batch_max_records = 1``, one record
per MQTT message) is the plain baseline the batched figure is compared with. Nobody subscribes,
so the broker acknowledges with 0x10 (no matching subscribers): this measures the gateway's side.
Target: ≥ 5,000 records/s batched.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.config import MqttSection  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.model import Record, RecordKind  # noqa: E402
from gateway.publish.mqtt import Publisher  # noqa: E402
from gateway.store.base import Store  # noqa: E402
from gateway.store.memory import MemoryStore  # noqa: E402
from gateway.store.sqlite import SqliteStore  # noqa: E402
from tests.support.broker import Broker  # noqa: E402

#: a drain that has not finished by then is reported as such, not waited for
DRAIN_TIMEOUT_S = 600.0
COMMIT_CHUNK = 1000
SERIALS = ("PACK-0001", "PACK-0002", "PACK-0003", "PACK-0004")


def telemetry(i: int) -> Record:
    """A realistic telemetry record: 16 cells, 4 sensors, about 400 bytes of JSON."""
    body = {
        "current_a": round(12.5 + (i % 50) * 0.1, 2),
        "pack_voltage_v": round(52.8 - (i % 100) * 0.001, 3),
        "soc_pct": round(80.0 - (i % 1000) * 0.01, 2),
        "cell_voltages_v": [round(3.300 + ((i + c) % 17) * 0.001, 3) for c in range(16)],
        "cell_temps_c": [round(25.0 + ((i + s) % 7) * 0.1, 1) for s in range(4)],
        "state": "discharging",
    }
    return Record(SERIALS[i % len(SERIALS)], RecordKind.TELEMETRY, 1_795_485_342.0 + i * 0.1,
                  body)


def make_store(kind: str, folder: Path, metrics: Metrics) -> Store:
    if kind == "sqlite":
        return SqliteStore(folder / "store.sqlite", max_bytes=1 << 30, max_records=10_000_000,
                           metrics=metrics)
    return MemoryStore(metrics=metrics)


def drain(store_kind: str, records: int, batch: int, workdir: Path) -> dict[str, float | str]:
    metrics = Metrics()
    store = make_store(store_kind, workdir, metrics)
    for start in range(0, records, COMMIT_CHUNK):
        store.commit([telemetry(i) for i in range(start, min(records, start + COMMIT_CHUNK))])
    with Broker(workdir / "broker") as broker:
        settings = MqttSection(host=broker.host, port=broker.port, batch_max_records=batch,
                               publish_interval_s=1.0, inflight=32)
        publisher = Publisher(settings, "bench-gw", store, metrics)
        stop = threading.Event()
        thread = threading.Thread(target=publisher.run, args=(stop,), name="publisher")
        cpu0, t0 = time.process_time(), time.perf_counter()
        thread.start()
        deadline = t0 + DRAIN_TIMEOUT_S
        while store.stats().records and time.perf_counter() < deadline:
            time.sleep(0.02)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stop.set()
        thread.join(timeout=30)
    left = store.stats().records
    store.close()
    acked = metrics.get("records_acked_total")
    return {"store": store_kind, "batch": str(batch), "records": str(acked),
            "messages": str(metrics.get("mqtt_messages_published_total")),
            "seconds": elapsed, "records/s": acked / elapsed, "cpu_s": cpu,
            "note": "" if left == 0 else f"TIMEOUT, {left} left"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--batch", type=int, nargs="+", default=[200, 1],
                        help="batch_max_records values to run (default: 200 1)")
    args = parser.parse_args()
    # the table is the output: only warnings (a lost broker, say) may interleave with it
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("mosquitto is not installed: apt-get install mosquitto", file=sys.stderr)
        return 2
    rows = []
    for batch in args.batch:
        with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
            rows.append(drain(args.store, args.records, batch, Path(tmp)))
    header = ("store", "batch", "records", "messages", "seconds", "records/s", "cpu_s", "note")
    print(" | ".join(f"{h:>10}" for h in header))
    print("-+-".join("-" * 10 for _ in header))
    for row in rows:
        cells = [f"{row[h]:>10.1f}" if isinstance(row[h], float) else f"{row[h]:>10}"
                 for h in header]
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
