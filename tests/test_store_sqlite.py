"""What only the durable store promises: reopen, SIGKILL, corrupt files, file and disk caps,
and read-only status while the daemon writes. Real SQLite files in tmp_path; real child
processes killed with SIGKILL. The shared contract is in test_store_contract.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config import StoreSection
from gateway.errors import StoreCorruptError, StoreError
from gateway.metrics import Metrics
from gateway.model import Record, RecordKind
from gateway.store.sqlite import (
    MOVED_ASIDE_META_KEY,
    SqliteStore,
    read_dead_letters,
    read_status,
)
from tests.support.tmpfs import require_tmpfs, tmpfs_command

T, H, E = RecordKind.TELEMETRY, RecordKind.HEALTH, RecordKind.EVENTS
BIG = 1 << 40


def rec(kind: RecordKind = T, ts: float = 1_700_000_000.0, **body: object) -> Record:
    return Record("PACK-1", kind, ts, body)


def open_store(path: Path, **caps: int) -> SqliteStore:
    return SqliteStore(path, max_bytes=caps.get("max_bytes", BIG),
                       max_records=caps.get("max_records", BIG),
                       min_free_bytes=caps.get("min_free_bytes", 0))


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- reopen ------------------------------------------------------------------------------------


def test_everything_committed_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path)
    store.commit([rec(E, ts=1.5, n=1), rec(H, ts=2.5, v=[3.3, 3.4]), rec(n=3), rec(n=4)],
                 {"pack/PACK-1": b"\x00state\xff"})
    store.put_meta("counters", "{}")
    store.lease(4)
    store.ack([3])
    store.retry([2])
    store.reject([4], "payload_too_large")
    before = store.stats()
    store.close()
    assert files_in(tmp_path) == ["store.sqlite"]  # clean close: WAL checkpointed and removed

    store = open_store(path)
    assert store.stats() == before
    leased = store.lease(10)
    assert [(r.seq, r.kind, r.ts, dict(r.body), r.attempts) for r in leased] == [
        (1, E, 1.5, {"n": 1}, 0), (2, H, 2.5, {"v": [3.3, 3.4]}, 1)]
    assert store.checkpoint("pack/PACK-1") == b"\x00state\xff"
    assert store.get_meta("counters") == "{}"
    assert [(d.seq, d.reason) for d in store.dead_letters()] == [(4, "payload_too_large")]
    store.close()


def test_leases_do_not_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path)
    store.commit([rec(n=i) for i in range(3)])
    assert [r.seq for r in store.lease(3)] == [1, 2, 3]
    store.close()  # closed without acks, as a crash would
    store = open_store(path)
    assert [r.seq for r in store.lease(10)] == [1, 2, 3]
    store.close()


def test_seq_is_never_reused_after_deleting_the_newest_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path)
    store.commit([rec(n=i) for i in range(3)])
    store.ack([3])
    store.close()
    store = open_store(path)
    assert store.commit([rec()]) == [4]
    store.ack([1, 2, 4])  # empty table: only the sequence remembers
    store.close()
    store = open_store(path)
    assert store.stats().last_seq == 4
    assert store.commit([rec()]) == [5]
    store.close()


def test_from_config(tmp_path: Path) -> None:
    section = StoreSection(path=str(tmp_path / "sub" / "store.sqlite"), max_records=100)
    metrics = Metrics()
    store = SqliteStore.from_config(section, metrics)
    store.commit([rec(n=i) for i in range(101)])
    assert metrics.get("records_dropped_total", "quota") == 1
    assert store.path == tmp_path / "sub" / "store.sqlite"
    store.close()


# -- SIGKILL -----------------------------------------------------------------------------------

CHILD = """
import sys
from gateway.model import Record, RecordKind
from gateway.store.sqlite import SqliteStore

path, first_batch = sys.argv[1], int(sys.argv[2])
store = SqliteStore(path, max_bytes=1 << 40, max_records=1 << 40)
pending = {}
for batch in range(first_batch, first_batch + 100_000):
    size = 1 + (batch * 37) % 150
    records = [Record("PACK-1", RecordKind.TELEMETRY, float(batch), {"batch": batch, "i": i})
               for i in range(size)]
    seqs = store.commit(records, {"progress": str(batch).encode()})
    print(f"committed {batch} {seqs[0]} {seqs[-1]}", flush=True)
    pending[batch] = seqs
    if batch - 3 in pending:
        store.ack(pending.pop(batch - 3))
        print(f"acked {batch - 3}", flush=True)
"""


def run_and_kill(repo: Path, path: Path, first_batch: int,
                 kill_after: int) -> tuple[dict[int, tuple[int, int]], set[int]]:
    """Run CHILD, SIGKILL it once it has reported ``kill_after`` commits; what it reported."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(first_batch)],
                             cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    killer = threading.Timer(60, child.kill)  # a hang fails the test instead of stalling it
    killer.start()
    committed: dict[int, tuple[int, int]] = {}
    acked: set[int] = set()
    try:
        for line in child.stdout:
            what, batch, *seqs = line.split()
            if what == "committed":
                committed[int(batch)] = (int(seqs[0]), int(seqs[1]))
            else:
                acked.add(int(batch))
            if len(committed) >= kill_after:
                break
        os.kill(child.pid, signal.SIGKILL)  # the child commits without pause: mid-transaction
        child.wait(timeout=30)
    finally:
        killer.cancel()
        child.kill()
        stderr = child.stderr.read() if child.stderr else ""
        child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr
    assert len(committed) >= kill_after, stderr
    return committed, acked


def test_sigkill_while_committing_loses_nothing_committed(tmp_path: Path, repo: Path) -> None:
    path = tmp_path / "store.sqlite"
    rng = random.Random(20240501)
    first_batch = 0
    previous = None
    for _round in range(5):
        committed, acked = run_and_kill(repo, path, first_batch, rng.randint(5, 40))
        assert Path(f"{path}-wal").exists()  # killed, not closed

        status, _meta = read_status(path)  # read-only, beside the dead writer's WAL
        with capture_logs() as logs:
            store = open_store(path)
        assert not events(logs, "store_corrupt_moved_aside"), logs
        assert not events(logs, "store_totals_repaired"), logs
        stats = store.stats()
        assert stats == status
        # exact lifetime totals: every seq ever handed out was committed, nothing dropped
        assert stats.committed_total == stats.last_seq
        assert stats.records == stats.committed_total - stats.acked_total
        if previous is not None:
            assert stats.committed_total >= previous.committed_total
            assert stats.acked_total >= previous.acked_total
            assert min(first for first, _ in committed.values()) > previous.last_seq

        stored = {r.seq: r for r in store.lease(1_000_000)}
        last_reported = max(committed)
        for batch, (first, last) in committed.items():
            present = [seq in stored for seq in range(first, last + 1)]
            if batch in acked:
                assert not any(present), f"batch {batch} was acked"
            elif batch + 3 > last_reported + 1:  # its ack could not have started
                assert all(present), f"committed batch {batch} lost records"
            for seq in range(first, last + 1):
                if seq in stored:
                    assert dict(stored[seq].body) == {"batch": batch, "i": seq - first}
        # the checkpoint was written with the newest batch, which is never acked yet
        newest = max(int(r.body["batch"]) for r in stored.values())
        assert store.checkpoint("progress") == str(newest).encode()
        assert newest >= last_reported
        store.close()
        previous = stats
        first_batch = newest + 1


# -- corrupt files -------------------------------------------------------------------------------


def make_closed_store(path: Path, records: int = 400) -> int:
    """A store with some history, closed cleanly; returns its last seq."""
    store = open_store(path)
    for start in range(0, records, 100):
        store.commit([rec(H if i % 3 else T, ts=float(start + i), n=start + i, pad="p" * 40)
                      for i in range(100)], {"pack": b"state"})
    store.lease(50)
    store.ack(range(1, 30))
    store.put_meta("counters", "x")
    last = store.stats().last_seq
    store.close()
    return last


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def page_of(path: Path, name: str) -> int:
    """Byte offset of the root page of table or index ``name``."""
    conn = sqlite3.connect(path)
    try:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                            (name,)).fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    return int((root - 1) * page_size)


def desync_ts_index(path: Path, seq: int) -> None:
    """Change a row's ts behind index records_ts's back: table and index disagree.

    The damage quick_check misses and integrity_check finds; every later DELETE of that row
    fails as corrupt. Made with SQLite itself (the index hidden from the schema while the row
    changes), so it lands through the WAL even while a store has the file open.
    """
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA writable_schema = ON")
    index = raw.execute("SELECT type, name, tbl_name, rootpage, sql FROM sqlite_master "
                        "WHERE name = 'records_ts'").fetchone()
    raw.execute("DELETE FROM sqlite_master WHERE name = 'records_ts'")
    raw.close()
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("UPDATE records SET ts = ts + 0.25 WHERE seq = ?", (seq,))
    raw.execute("PRAGMA writable_schema = ON")
    raw.execute("INSERT INTO sqlite_master VALUES (?, ?, ?, ?, ?)", index)
    raw.close()
    raw = sqlite3.connect(path, isolation_level=None)
    assert raw.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    assert raw.execute("PRAGMA integrity_check").fetchall() != [("ok",)]
    raw.close()


def index_out_of_step(path: Path, data: bytes) -> bytes:
    desync_ts_index(path, 351)
    return path.read_bytes()


CORRUPTIONS = {
    "zero-length": lambda path, data: b"",
    "garbage": lambda path, data: random.Random(5).randbytes(len(data)),
    "truncated-to-100-bytes": lambda path, data: data[:100],
    "truncated-to-half": lambda path, data: data[:len(data) // 2],
    "truncated-by-one-byte": lambda path, data: data[:-1],
    "truncated-by-two-pages": lambda path, data: data[:-8192],
    "header-magic-bit-flip": lambda path, data: flip(data, 3, 0x20),
    "application-id-bit-flip": lambda path, data: flip(data, 71),
    "schema-version-bit-flip": lambda path, data: flip(data, 62),
    "btree-page-type-bit-flip": lambda path, data: flip(data, page_of(path, "records"), 0x40),
    "schema-text-bit-flip": lambda path, data: flip(data, data.index(b"drop_rank INTEGER"), 0x04),
    "index-out-of-step-with-table": index_out_of_step,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_file_is_moved_aside_and_replaced(tmp_path: Path, corruption: str) -> None:
    path = tmp_path / "store.sqlite"
    old_last_seq = make_closed_store(path)
    damaged = CORRUPTIONS[corruption](path, path.read_bytes())
    path.write_bytes(damaged)

    with capture_logs() as logs:
        store = open_store(path)
    (alarm,) = events(logs, "store_corrupt_moved_aside")
    assert alarm["log_level"] == "error"
    assert alarm["path"] == str(path)
    aside = Path(str(alarm["moved_to"]))
    assert aside.parent == tmp_path
    assert aside.name.startswith("store.sqlite.corrupt-")
    assert aside.read_bytes() == damaged  # kept exactly as found
    assert store.get_meta(MOVED_ASIDE_META_KEY) == str(aside)
    # a fresh, working store, whose seqs never collide with the old file's
    stats = store.stats()
    assert (stats.records, stats.committed_total, stats.acked_total) == (0, 0, 0)
    (seq,) = store.commit([rec()])
    assert seq > old_last_seq
    assert [r.seq for r in store.lease(10)] == [seq]
    store.close()
    assert sorted(files_in(tmp_path)) == sorted(["store.sqlite", aside.name])


def test_seqs_continue_from_the_old_file_where_it_still_answers(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    last = make_closed_store(path)
    path.write_bytes(flip(path.read_bytes(), page_of(path, "records"), 0x40))
    with capture_logs() as logs:
        store = open_store(path)
    (alarm,) = events(logs, "store_corrupt_moved_aside")
    assert (alarm["seq_floor"], alarm["seq_floor_from"]) == (last, "old file")
    assert store.commit([rec()]) == [last + 1]
    store.close()


def test_seqs_start_above_the_clock_when_nothing_can_be_read(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    before_us = time.time_ns() // 1000
    with capture_logs() as logs:
        store = open_store(path)
    (alarm,) = events(logs, "store_corrupt_moved_aside")
    assert alarm["seq_floor_from"] == "clock"
    (seq,) = store.commit([rec()])
    assert seq > before_us
    store.close()


def test_a_corrupt_file_moves_aside_with_its_wal_and_shm(tmp_path: Path, repo: Path) -> None:
    path = tmp_path / "store.sqlite"
    run_and_kill(repo, path, 0, 3)
    wal = Path(f"{path}-wal").read_bytes()
    # Not a header bit flip: the newest page 1 lives in the WAL and would mask it.
    path.write_bytes(random.Random(9).randbytes(path.stat().st_size))
    with capture_logs() as logs:
        store = open_store(path)
    (alarm,) = events(logs, "store_corrupt_moved_aside")
    aside = str(alarm["moved_to"])
    assert Path(f"{aside}-wal").read_bytes() == wal
    assert Path(f"{aside}-shm").exists()
    store.close()


def test_random_bit_flips_never_escape_as_anything_but_a_store_error(tmp_path: Path) -> None:
    """No traceback, whatever rots: moved aside at open, dead-lettered at lease, or harmless."""
    original = tmp_path / "original.sqlite"
    make_closed_store(original, records=300)
    data = original.read_bytes()
    rng = random.Random(1234)
    outcomes: set[str] = set()
    for attempt in range(40):
        path = tmp_path / f"flipped-{attempt}.sqlite"
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        with capture_logs() as logs:
            try:
                store = open_store(path)
            except StoreError as e:  # only a header that reads as a newer gateway's store
                assert "newer" in str(e)
                outcomes.add("refused")
                continue
            leased = store.lease(10_000)
            store.ack([r.seq for r in leased[:50]])
            store.commit([rec(E)])
            store.dead_letters()
            store.checkpoints()
            store.close()
        if events(logs, "store_corrupt_moved_aside"):
            outcomes.add("moved aside")
        elif events(logs, "store_record_undecodable"):
            outcomes.add("dead-lettered")
        else:
            outcomes.add("opened")
    assert {"moved aside", "dead-lettered"} <= outcomes


def test_rotten_rows_are_dead_lettered_not_leased(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path)
    store.commit([rec(n=i) for i in range(5)])
    store.close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE records SET body = '{\"n\": 1' WHERE seq = 2")
    raw.execute("UPDATE records SET kind = 'telemetrz' WHERE seq = 3")
    raw.execute("UPDATE records SET serial = CAST(X'50FF31' AS TEXT) WHERE seq = 4")
    raw.commit()
    raw.close()

    metrics = Metrics()
    store = SqliteStore(path, max_bytes=BIG, max_records=BIG, metrics=metrics)
    with capture_logs() as logs:
        leased = store.lease(10)
    assert [r.seq for r in leased] == [1, 5]
    assert [e["seq"] for e in events(logs, "store_record_undecodable")] == [2, 3, 4]
    dead = store.dead_letters()
    assert [(d.seq, d.reason) for d in dead] == [(2, "undecodable"), (3, "undecodable"),
                                                (4, "undecodable")]
    assert dead[0].body == '{"n": 1'
    assert dead[1].kind == "telemetrz"
    assert dead[2].serial == "P\\xff1"
    stats = store.stats()
    assert (stats.records, stats.dead_letters) == (2, 3)
    assert metrics.get("records_dead_lettered_total", "undecodable") == 3
    store.close()


def test_counts_that_disagree_with_the_rows_are_repaired_at_open(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path)
    store.commit([rec(n=i) for i in range(5)])
    expected = store.stats()
    store.close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE totals SET value = 99 WHERE name = 'stored_records'")
    raw.commit()
    raw.close()
    with capture_logs() as logs:
        store = open_store(path)
    (repair,) = events(logs, "store_totals_repaired")
    assert (repair["records_counted"], repair["records_found"]) == (99, 5)
    assert store.stats() == expected
    store.close()
    assert read_status(path)[0] == expected


def test_another_applications_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    raw.commit()
    raw.close()
    data = path.read_bytes()
    with pytest.raises(StoreError, match="another application"):
        open_store(path)
    assert files_in(tmp_path) == ["store.sqlite"]
    assert path.read_bytes() == data


def test_a_store_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    make_closed_store(path)
    raw = sqlite3.connect(path)
    raw.execute("ALTER TABLE records ADD COLUMN route TEXT")
    raw.execute("PRAGMA user_version = 2")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer"):
        open_store(path)
    assert files_in(tmp_path) == ["store.sqlite"]


def test_an_unwritable_place_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StoreError, match="cannot"):
        open_store(tmp_path / "a-file" / "store.sqlite")


def test_damage_found_while_running_is_a_store_corrupt_error(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    make_closed_store(path)
    store = open_store(path)
    desync_ts_index(path, 351)  # the file goes bad under the running daemon
    with pytest.raises(StoreCorruptError, match="moved aside at the next start"):
        store.ack([351])
    store.close()
    with capture_logs() as logs:  # ... and the restart does move it aside
        store = open_store(path)
    assert events(logs, "store_corrupt_moved_aside")
    store.close()


# -- space ---------------------------------------------------------------------------------------


def padded(rng: random.Random, n: int) -> list[Record]:
    """Records of mixed kinds, 100 B to 3 KB: big ones spill into overflow pages."""
    return [Record("PACK-1", rng.choice([T, T, T, H, E]), 1.0,
                   {"pad": "x" * rng.randint(100, 3000)}) for _ in range(n)]


def assert_dropped_by_priority(committed: dict[int, RecordKind], store: SqliteStore) -> None:
    """A record of a kind was dropped only while no unleased record of a lower kind was left:
    every kept record of a lower kind is newer than every dropped record of a higher one."""
    store.release_all()
    kept = {r.seq for r in store.lease(1_000_000)}
    assert kept
    for low, high in ((T, H), (T, E), (H, E)):
        dropped_high = [s for s, k in committed.items() if k == high and s not in kept]
        kept_low = [s for s in kept if committed[s] == low]
        if dropped_high and kept_low:
            assert min(kept_low) > max(dropped_high), (low, high)


def test_the_file_never_outgrows_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    wal = Path(f"{path}-wal")
    max_bytes = 512 * 1024
    wal_share = max_bytes // 8
    metrics = Metrics()
    store = SqliteStore(path, max_bytes=max_bytes, max_records=BIG, metrics=metrics)
    rng = random.Random(3)
    committed: dict[int, RecordKind] = {}
    peak = 0
    with capture_logs() as logs:
        for _ in range(80):  # about 3.5 MB in all
            batch = padded(rng, rng.randint(1, 60))
            committed.update(zip(store.commit(batch), (r.kind for r in batch), strict=True))
            peak = max(peak, path.stat().st_size)
        # The WAL holds a whole transaction before its checkpoint, so a big commit overshoots
        # its share for a moment; the next write truncates it back.
        (last,) = store.commit([rec(E)])
        committed[last] = E
    stats = store.stats()
    assert peak <= max_bytes - wal_share
    assert wal.stat().st_size <= wal_share
    assert stats.bytes <= max_bytes
    dropped = stats.dropped_total["quota"]
    assert dropped == stats.committed_total - stats.records > 0  # every drop counted
    assert metrics.get("records_dropped_total", "quota") == dropped
    assert len(events(logs, "store_full")) == 1
    assert_dropped_by_priority(committed, store)
    store.close()


def test_the_store_stays_out_of_the_disks_reserve(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path)
    store.close()
    start_size = path.stat().st_size
    # Leave the store about 6 MiB of the disk (its WAL's allowance comes off that first), and
    # offer it 64 MB. Other processes share this disk, hence the loose bound below.
    reserve = shutil.disk_usage(tmp_path).free - 6 * 1024 * 1024
    store = open_store(path, max_bytes=64 * 1024 * 1024, min_free_bytes=reserve)
    rng = random.Random(4)
    committed: dict[int, RecordKind] = {}
    with capture_logs() as logs:
        for _ in range(100):
            batch = padded(rng, 100)
            committed.update(zip(store.commit(batch), (r.kind for r in batch), strict=True))
    stats = store.stats()
    assert stats.dropped_total["quota"] == stats.committed_total - stats.records > 0
    assert path.stat().st_size - start_size < 8 * 1024 * 1024
    assert len(events(logs, "store_full")) == 1
    assert_dropped_by_priority(committed, store)
    store.close()


FULL_DISK_CHILD = """
import json, os, shutil, sys
from structlog.testing import capture_logs
from gateway.model import Record, RecordKind
from gateway.store.sqlite import SqliteStore

folder, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
path = os.path.join(folder, "store.sqlite")
kinds = [RecordKind.TELEMETRY] * 8 + [RecordKind.HEALTH, RecordKind.EVENTS]
footprint, error, n = 0, None, 0
with capture_logs() as logs:
    store = SqliteStore(path, max_bytes=1 << 30, max_records=1 << 40, min_free_bytes=0)
    try:
        for _ in range(rounds):
            store.commit([Record("PACK-1", kinds[(n + i) % 10], float(n + i),
                                 {"pad": "x" * 400, "n": n + i}) for i in range(batch)],
                         # the edge core's state, rewritten with every commit
                         {f"pack/{p}": os.urandom(4000) for p in range(16)})
            n += batch
            footprint = max(footprint, sum(os.path.getsize(p) for p in (path, path + "-wal")
                                           if os.path.exists(p)))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    stats = store.stats()
    kept = {kind: 0 for kind in ("telemetry", "health", "events")}
    acked = 0
    if error is None:
        leased = store.lease(1 << 30)
        for record in leased:
            kept[record.kind.value] += 1
        try:  # the broker is back: all of it acknowledged at once, on the full disk
            acked = store.ack([record.seq for record in leased])
        except Exception as exc:
            error = f"ack: {type(exc).__name__}: {exc}"
    store.close()
print(json.dumps({"error": error, "committed": stats.committed_total, "stored": stats.records,
                  "acked": acked,
                  "dropped": stats.dropped_total, "kept": kept, "footprint": footprint,
                  "disk": shutil.disk_usage(folder).total,
                  "events": [e["event"] for e in logs]}))
"""


@pytest.mark.parametrize(("disk_mib", "batch"), [(16, 500), (6, 1000), (4, 50)])
def test_a_store_alone_on_a_small_filesystem_fills_it_and_keeps_working(
        tmp_path: Path, repo: Path, disk_mib: int, batch: int) -> None:
    """A real filesystem that fills up: a private tmpfs, the store given more than fits and no
    reserve. Its WAL needs room too (once the WAL cannot grow, even a delete fails), so the
    store must size the WAL by the disk, stop the file short of it, and keep each transaction
    within the WAL's allowance: commits of up to 1,000 records (the pipeline's bound) at the
    quota, and an ack of everything stored at once."""
    require_tmpfs()
    folder = tmp_path / "disk"
    folder.mkdir()
    # 0.9 disks' worth: past the quota (the WAL has half the room), while the health and
    # events alone still fit
    rounds = int(0.9 * (disk_mib << 20) / (batch * 470))
    done = subprocess.run(
        tmpfs_command(folder, disk_mib << 20,
                      [sys.executable, "-c", FULL_DISK_CHILD, str(folder), str(batch),
                       str(rounds)]),
        capture_output=True, text=True, timeout=120, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["error"] is None, result
    assert result["disk"] == disk_mib << 20
    assert result["footprint"] < result["disk"]
    dropped = result["dropped"]["quota"]
    assert dropped == result["committed"] - result["stored"] > 0  # every drop counted
    # it kept records (the disk holds thousands), the health and events among them
    assert result["stored"] > 1000
    assert result["kept"]["health"] == result["kept"]["events"] == result["committed"] // 10
    assert result["events"].count("store_full") == 1
    assert result["acked"] == result["stored"]


def test_pages_the_quota_frees_inside_a_full_file_are_used_again(tmp_path: Path,
                                                                   repo: Path) -> None:
    """Health records much bigger than telemetry, 48 packs' state rewritten with each commit,
    a 6 MiB filesystem: the quota deletes telemetry from among the health records it keeps, and
    the file fragments. The pages it frees must be used again; a byte cap stuck at the file's
    fullest moment would drop every new record while a good part of the file stood empty."""
    require_tmpfs()
    folder = tmp_path / "disk"
    folder.mkdir()
    done = subprocess.run(
        tmpfs_command(folder, 6 << 20, [sys.executable, "-c", FRAGMENTING_CHILD, str(folder)]),
        capture_output=True, text=True, timeout=120, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["dropped"] > 0 and result["stored"] > 0
    assert result["free_pages"] <= result["pages"] // 10, result


FRAGMENTING_CHILD = """
import json, os, sys
from gateway.model import Record, RecordKind
from gateway.store.sqlite import SqliteStore

store = SqliteStore(os.path.join(sys.argv[1], "store.sqlite"), max_bytes=1 << 30,
                    max_records=1 << 40, min_free_bytes=0)
n = 0
for _ in range(60):
    store.commit([Record("PACK-1", RecordKind.HEALTH, float(n + i), {"pad": "h" * 2000})
                  if (n + i) % 10 == 0 else
                  Record("PACK-1", RecordKind.TELEMETRY, float(n + i), {"pad": "t" * 750})
                  for i in range(300)],
                 {f"pack/{p}": os.urandom(4000) for p in range(48)})
    n += 300
pages, free_pages = (store._connection().execute(f"PRAGMA {name}").fetchone()[0]
                     for name in ("page_count", "freelist_count"))
stats = store.stats()
store.close()
print(json.dumps({"stored": stats.records, "dropped": stats.dropped_total.get("quota", 0),
                  "pages": pages, "free_pages": free_pages}))
"""


# -- read_status ---------------------------------------------------------------------------------


def test_read_status_of_a_missing_file_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store file"):
        read_status(tmp_path / "store.sqlite")
    assert files_in(tmp_path) == []


def test_read_status_of_a_closed_store_leaves_no_files_behind(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path)
    store.commit([rec(ts=5.0), rec(ts=3.0)])
    store.put_meta("counters", '{"a": 1}')
    expected = store.stats()
    store.close()
    stats, meta = read_status(path)
    assert stats == expected
    assert meta == {"counters": '{"a": 1}'}
    assert files_in(tmp_path) == ["store.sqlite"]


def test_read_dead_letters_lists_the_newest_first_read_only(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path)
    store.commit([rec(n=i) for i in range(5)])
    store.reject([2, 4], "payload_too_large")
    store.reject([3], "topic_invalid")
    store.close()
    before = files_in(tmp_path)
    newest = read_dead_letters(path, 2)
    assert [(d.seq, d.reason) for d in newest] == [(4, "payload_too_large"),
                                                   (3, "topic_invalid")]
    assert newest[0].body == '{"n":3}'
    stats, _meta = read_status(path)
    assert stats.dead_lettered_by_reason == {"payload_too_large": 2, "topic_invalid": 1}
    assert files_in(tmp_path) == before


def test_read_status_of_something_else_is_an_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"\x00" * 8192)
    with pytest.raises(StoreError):
        read_status(garbage)
    foreign = tmp_path / "foreign.sqlite"
    raw = sqlite3.connect(foreign)
    raw.execute("CREATE TABLE t (x)")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="not a bms-gateway store"):
        read_status(foreign)
    assert garbage.read_bytes() == b"\x00" * 8192


def test_read_status_while_the_daemon_writes(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite"
    store = open_store(path, max_records=500)
    store.put_meta("counters", "{}")
    stop = threading.Event()
    errors: list[BaseException] = []

    def daemon() -> None:
        try:
            for i in range(100_000):  # bounded; stopped by the reader long before
                if stop.is_set():
                    return
                store.commit([rec(ts=float(i), n=j) for j in range(20)], {"k": b"v"})
                leased = store.lease(15)
                store.ack([r.seq for r in leased[:10]])
                store.retry([r.seq for r in leased[10:]])
                store.put_meta("counters", str(i))
        except BaseException as e:  # reported to the test below
            errors.append(e)

    writer = threading.Thread(target=daemon)
    writer.start()
    seen: list[int] = []
    try:
        for _ in range(60):
            stats, meta = read_status(path)
            # one snapshot: the counts agree with each other
            assert stats.records == (stats.committed_total - stats.acked_total
                                     - stats.dropped_total.get("quota", 0))
            assert stats.committed_total == stats.last_seq
            assert "counters" in meta
            seen.append(stats.committed_total)
            time.sleep(0.005)
    finally:
        stop.set()
        writer.join(timeout=60)
    assert not errors
    assert seen == sorted(seen)
    assert seen[-1] > seen[0]  # the daemon kept committing while status read
    final = store.stats()
    store.close()
    assert read_status(path)[0] == final
