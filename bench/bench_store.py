"""Store throughput: commit, and lease + ack, in records per second.

    .venv/bin/python -m bench.bench_store [--records 100000] [--batch 500] [--window 200]

Prints one table. The baseline row is a bare ``executemany`` INSERT of the same JSON rows in the
same batches, in WAL mode with synchronous=FULL, on the same disk: the floor the store's own
bookkeeping (quota, totals, seqs) adds to. Backlog drain is measured with a publisher-like loop:
lease a window, ack it, repeat. Nothing here is asserted; see tests/ for behaviour.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.model import Record, RecordKind
from gateway.store.base import Store, encode_body
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SqliteStore


def make_records(n: int, seed: int = 1) -> list[Record]:
    """Telemetry-sized records: 16 cell voltages, 4 temperatures, a few scalars (~330 bytes)."""
    rng = random.Random(seed)
    return [Record("PACK-0001", RecordKind.TELEMETRY, 1.7e9 + i, {
        "current_a": round(rng.uniform(-50, 50), 3),
        "pack_voltage_v": round(rng.uniform(48, 54), 3),
        "soc_pct": round(rng.uniform(0, 100), 2),
        "cell_voltages_v": [round(rng.uniform(3.2, 3.4), 4) for _ in range(16)],
        "cell_temps_c": [round(rng.uniform(20, 30), 2) for _ in range(4)],
    }) for i in range(n)]


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def bench_store(store: Store, records: list[Record], batch: int,
                window: int) -> tuple[float, float]:
    def commit_all() -> None:
        for start in range(0, len(records), batch):
            store.commit(records[start:start + batch])

    def drain() -> None:
        for _ in range(len(records) // window + 2):
            leased = store.lease(window)
            if not leased:
                return
            store.ack([r.seq for r in leased])

    commit_s = timed(commit_all)
    drain_s = timed(drain)
    assert store.stats().records == 0, "drain left records behind"
    return len(records) / commit_s, len(records) / drain_s


def bench_baseline(path: Path, records: list[Record], batch: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE r (seq INTEGER PRIMARY KEY AUTOINCREMENT, serial TEXT, kind TEXT,"
                 " ts REAL, body TEXT)")

    def insert_all() -> None:
        for start in range(0, len(records), batch):
            rows = [(r.serial, r.kind.value, r.ts, encode_body(r.body))
                    for r in records[start:start + batch]]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO r (serial, kind, ts, body) VALUES (?, ?, ?, ?)", rows)
            conn.execute("COMMIT")

    seconds = timed(insert_all)
    conn.close()
    return len(records) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="records per commit")
    parser.add_argument("--window", type=int, default=200, help="records per lease")
    args = parser.parse_args()
    records = make_records(args.records)
    with tempfile.TemporaryDirectory() as folder:
        baseline = bench_baseline(Path(folder) / "baseline.sqlite", records, args.batch)
        rows: list[tuple[str, float, float | None]] = [
            ("sqlite bare executemany (baseline)", baseline, None)]
        sqlite_store = SqliteStore(Path(folder) / "store.sqlite", max_bytes=1 << 40,
                                   max_records=1 << 40)
        rows.append(("SqliteStore", *bench_store(sqlite_store, records, args.batch,
                                                 args.window)))
        sqlite_store.close()
        rows.append(("MemoryStore", *bench_store(MemoryStore(), records, args.batch,
                                                 args.window)))
    print(f"{args.records} records, {args.batch} per commit, {args.window} per lease")
    print(f"{'store':<36} {'commit rec/s':>14} {'lease+ack rec/s':>16}")
    for name, commit_rate, drain_rate in rows:
        drain = f"{drain_rate:>16,.0f}" if drain_rate is not None else f"{'-':>16}"
        print(f"{name:<36} {commit_rate:>14,.0f} {drain}")


if __name__ == "__main__":
    main()
