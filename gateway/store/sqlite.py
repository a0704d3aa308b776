"""The durable store: one SQLite file in WAL mode (contract: ``gateway.store.base``).

Choices, and why:

- Durability. WAL with ``synchronous=FULL`` for every transaction that adds information (commit,
  meta): FULL fsyncs the WAL at each commit, so a commit that returned survives power loss. With
  NORMAL the WAL is fsynced only at checkpoints: the file stays consistent, but the last
  committed transactions can vanish on power loss, and we promise committed = durable.
  Transactions that only take records away or annotate them (ack, retry, reject) run at NORMAL:
  losing one re-sends records already delivered, which at-least-once allows (consumers dedupe on
  ``(gateway_id, seq)``), and the next FULL commit's fsync of the append-only WAL covers them
  anyway. That saves one fsync per PUBACK batch. SIGKILL loses nothing at either level.
- seq. ``INTEGER PRIMARY KEY AUTOINCREMENT``: its high-water mark in ``sqlite_sequence`` is never
  lowered, so a seq is never reused, even after the newest row is deleted and the file reopened.
  ``commit`` hands out seqs from that mark inside its write transaction and writes the mark back,
  so records the quota drops in the very commit that made them still use up their seqs.
- Threads. One connection, one lock. SQLite runs one writer at a time anyway; each operation is
  short (a commit of a thousand records takes milliseconds); and the in-memory lease set and
  running counts must change together with the rows, which one lock gives for free. A connection
  per thread would add SQLITE_BUSY handling between our own threads and a second place where
  those could disagree.
- Counts. Lifetime totals and the stored record and byte counts live in table ``totals``, updated
  in the same transaction as the rows they count, so they are exact across SIGKILL; they are
  mirrored in memory, so ``stats()`` costs one indexed ``min(ts)``, and ``read_status`` reads
  them without scanning the records.
- Space. The quota (``max_records`` and the ``charged_bytes`` estimate against ``max_bytes``)
  is enforced before a commit's rows are inserted. The store's room is ``max_bytes``, and never
  more than what it holds plus the filesystem's free space less ``min_free_bytes`` (re-checked
  every DISK_CHECK_INTERVAL_S). The WAL's allowance comes off that room first: it is
  checkpointed at an eighth of its allowance and truncated back to that, so the transaction that
  crosses the mark still fits; the allowance shrinks with a small disk, because a WAL that
  outgrows the free space fails every write, deletes included. Transactions stay small for the
  same reason: acks, retries and rejects are written RESOLVE_CHUNK records at a time, and the
  pipeline commits at most a thousand records at once. The file is capped with ``PRAGMA
  max_page_count`` at the rest. If the file fills anyway (fragmentation; a disk filled by
  someone else), the commit is rolled back, the WAL checkpointed and restarted so the retry
  reuses the space the WAL file already holds, the byte cap lowered below what fitted, and the
  commit retried: it then drops oldest lowest-priority records first, and deletes precede
  inserts in one transaction so the inserts reuse the freed pages. The database file never
  shrinks: freed pages are reused.
- Integrity. At open, ``PRAGMA integrity_check``, not quick_check: quick_check does not compare
  indexes with their table, and a damaged index that passes it fails every later DELETE, so the
  daemon would crash and restart forever (integrity_check costs about 3 s per GB here, once). A
  file that is empty, cut short, not a database, fails the check or whose schema differs from
  ours is moved aside with its -wal and -shm to ``<name>.corrupt-<UTC time>`` (kept, never
  deleted), ``store_corrupt_moved_aside`` is logged and a fresh store made. The fresh store's seqs
  continue above the old file's high-water mark, read from the corrupt file where it still
  answers; where it does not, they start at the clock in microseconds since the epoch, which no
  store can have reached (it would take a million records a second since 1970). A fresh store
  is built beside the target and renamed into place, so a crash mid-creation never leaves a
  half-made file that would later look corrupt. Damage found while running raises
  ``StoreCorruptError``; the restart's check then moves the file aside. SQLite pages carry no
  checksums, so a rotten byte inside a row can pass the check: such a row is dead-lettered as
  ``undecodable`` when leased, instead of breaking the publisher.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import json
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from gateway.config import StoreSection
from gateway.errors import StoreCorruptError, StoreError
from gateway.metrics import Metrics
from gateway.model import KIND_PRIORITY, Record, RecordKind, StoredRecord
from gateway.store.base import DeadLetter, QuotaAlarm, StoreStats, charged_bytes, encode_body

#: In the file header: tells a gateway store from any other SQLite database ("BMSG").
APPLICATION_ID = 0x424D5347
SCHEMA_VERSION = 1
PAGE_SIZE = 4096
#: The empty schema takes 12 pages; a smaller file cap could not hold a useful number of rows.
MIN_FILE_BYTES = 256 * 1024
#: The WAL's allowance: an eighth of ``max_bytes`` and half the room the disk leaves the store,
#: at most this (SQLite's default checkpoint size) and at least MIN_WAL_BYTES.
WAL_MAX_BYTES = 4 * 1024 * 1024
MIN_WAL_BYTES = 256 * 1024
#: Each page in the WAL is preceded by a frame header of this many bytes.
WAL_FRAME_HEADER = 24
DISK_CHECK_INTERVAL_S = 10.0
#: Attempts at a commit that finds the file full, each allowed to drop more.
FULL_RETRIES = 6
#: Records an ack, retry or reject changes per transaction (see ``_resolve``).
RESOLVE_CHUNK = 200
#: Where a store made after moving a corrupt file aside notes that file, so ``status`` shows it.
MOVED_ASIDE_META_KEY = "store.moved_aside"

_IN_CHUNK = 500  # seqs per ``IN (...)`` list, far below SQLite's bound on parameters
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

# Names of the rows of table ``totals``; dropped counts are ``dropped:<reason>``.
_COMMITTED = "committed"
_ACKED = "acked"
_DEAD_LETTERED = "dead_lettered"
_RECORDS = "stored_records"
_BYTES = "stored_bytes"
_DROPPED = "dropped:"
_COMMITTED_KIND = "committed:"
_DEAD_LETTERED_REASON = "dead_lettered:"



def _schema_script(last_seq: int) -> str:
    """The whole schema, one transaction; seqs start after ``last_seq``."""
    return f"""
BEGIN;
CREATE TABLE records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    serial TEXT NOT NULL,
    kind TEXT NOT NULL,
    drop_rank INTEGER NOT NULL,  -- KIND_PRIORITY: the lowest rank is dropped first under quota
    ts REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL,       -- bytes charged against max_bytes
    body TEXT NOT NULL           -- compact JSON
);
CREATE INDEX records_drop_order ON records (drop_rank, seq);
CREATE INDEX records_ts ON records (ts);
CREATE TABLE dead_letters (
    seq INTEGER PRIMARY KEY,
    serial TEXT NOT NULL,
    kind TEXT NOT NULL,
    ts REAL NOT NULL,
    attempts INTEGER NOT NULL,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    rejected_at REAL NOT NULL
);
CREATE TABLE checkpoints (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE totals (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO sqlite_sequence (name, seq) VALUES ('records', {int(last_seq)});
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""


_SCHEMA_ROWS = "SELECT type, name, tbl_name, sql FROM sqlite_master"


@functools.cache
def _expected_schema() -> frozenset[tuple[Any, ...]]:
    """``sqlite_master`` as ``_schema_script`` makes it, to compare a store's against."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.executescript(_schema_script(0))
        return frozenset(conn.execute(_SCHEMA_ROWS).fetchall())
    finally:
        conn.close()


_ADD_TOTAL = ("INSERT INTO totals (name, value) VALUES (?, ?) "
              "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value")
# Text columns as raw bytes, so that rotten bytes fail one row, not the query (see ``_decode``).
_SELECT_DEAD_LETTERS = ("SELECT seq, CAST(serial AS BLOB), CAST(kind AS BLOB), CAST(ts AS REAL), "
                        "CAST(attempts AS INTEGER), CAST(body AS BLOB), reason FROM dead_letters")
_SELECT_ROW = ("SELECT seq, CAST(serial AS BLOB), CAST(kind AS BLOB), ts, attempts, "
               "CAST(body AS BLOB) FROM records")


def _log() -> Any:
    # Looked up per event (events are rare) so a structlog configuration made later, such as a
    # test's capture_logs, applies.
    return structlog.get_logger(__name__)


class SqliteStore:
    """The durable queue of records, with checkpoints, meta and dead letters, in one file."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int, max_records: int,
                 min_free_bytes: int = 0, metrics: Metrics | None = None) -> None:
        if max_bytes <= 0 or max_records <= 0 or min_free_bytes < 0:
            raise ValueError(f"store caps must be positive: max_bytes={max_bytes}, "
                             f"max_records={max_records}, min_free_bytes={min_free_bytes}")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._max_records = max_records
        self._min_free_bytes = min_free_bytes
        self._metrics = metrics if metrics is not None else Metrics()
        self._lock = threading.Lock()
        self._alarm = QuotaAlarm()
        self._leased: set[int] = set()
        # Every stored seq below this one is leased: lease() scans from here.
        self._scan_from = 0
        # The cap on the byte estimate: max_bytes, lowered when the file filled up first.
        self._byte_cap = max_bytes
        self._page_cap = 0
        self._next_disk_check = 0.0
        self._sync_full = True
        conn, moved_to = _open_verified(self._path)
        self._conn: sqlite3.Connection | None = conn
        try:
            self._configure(conn)
            self._totals = self._load_totals(conn)
            self._last_seq = _last_seq(conn)
            if moved_to is not None:
                self._put_meta(MOVED_ASIDE_META_KEY, str(moved_to))
        except BaseException as e:
            conn.close()
            self._conn = None
            if isinstance(e, sqlite3.Error):
                raise _store_error(self._path, "opening", e) from e
            raise

    @classmethod
    def from_config(cls, section: StoreSection, metrics: Metrics) -> SqliteStore:
        # when_full has one value, drop_oldest, which is what this store does.
        return cls(section.path, max_bytes=section.max_bytes, max_records=section.max_records,
                   min_free_bytes=section.min_free_bytes, metrics=metrics)

    @property
    def path(self) -> Path:
        return self._path

    # -- opening --------------------------------------------------------------------------

    def _configure(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self._path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        self._file_cap = max(self._max_bytes, MIN_FILE_BYTES)
        self._wal_bytes = 0
        self._check_disk(conn)

    def _load_totals(self, conn: sqlite3.Connection) -> dict[str, int]:
        totals = {str(name): int(value)
                  for name, value in conn.execute("SELECT name, value FROM totals")}
        # integrity_check does not compare our counts with the rows; the scan is cheap right
        # after it has read every page.
        records, bytes_ = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM records").fetchone()
        if (totals.get(_RECORDS, 0), totals.get(_BYTES, 0)) != (records, bytes_):
            _log().warning("store_totals_repaired", path=str(self._path),
                           records_counted=totals.get(_RECORDS, 0), records_found=records,
                           bytes_counted=totals.get(_BYTES, 0), bytes_found=bytes_)
            with self._write(durable=True) as tx:
                tx.executemany("INSERT OR REPLACE INTO totals (name, value) VALUES (?, ?)",
                               [(_RECORDS, records), (_BYTES, bytes_)])
            totals[_RECORDS], totals[_BYTES] = records, bytes_
        return totals

    def _check_disk(self, conn: sqlite3.Connection) -> None:
        """Share the room the store may take between the file and its WAL, and cap both.

        The room is what the store holds now (file and WAL) plus the disk's free space less the
        reserve, and never more than ``max_bytes``. The WAL gets its allowance (see
        ``_allow_wal``) and the file's pages are capped at the rest.
        """
        try:
            free = shutil.disk_usage(self._path.parent).free
            # sizes on disk: pages still only in the WAL are not in the file yet
            held = _file_size(self._path) + _file_size(Path(f"{self._path}-wal"))
        except OSError as e:
            raise StoreError(f"{self._path}: cannot read the free disk space: {e}") from e
        room = held + free - self._min_free_bytes
        wal_bytes = max(MIN_WAL_BYTES, min(WAL_MAX_BYTES, self._file_cap // 8, room // 2))
        if wal_bytes != self._wal_bytes:
            self._allow_wal(conn, wal_bytes)
        pages = min(self._file_cap, room) - wal_bytes
        # SQLite never sets the cap below the file's current size; it answers the cap it took.
        effective = int(conn.execute(
            f"PRAGMA max_page_count = {max(1, pages // self._page_size)}").fetchone()[0])
        if effective > self._page_cap:
            self._byte_cap = self._max_bytes  # more room than when the file last filled up
        self._page_cap = effective
        self._next_disk_check = time.monotonic() + DISK_CHECK_INTERVAL_S

    def _allow_wal(self, conn: sqlite3.Connection, wal_bytes: int) -> None:
        """Keep the WAL within ``wal_bytes``: it is checkpointed once it holds an eighth of that,
        and truncated back to that eighth after each checkpoint; the rest is for the one
        transaction that crosses the mark (a commit at the quota rewrites the pages of the
        records it drops as well as those it adds). A WAL frame is a page plus its header, so
        the threshold counts frames, not pages."""
        mark = wal_bytes // 8
        conn.execute(f"PRAGMA journal_size_limit = {mark}")
        frames = max(1, mark // (self._page_size + WAL_FRAME_HEADER))
        conn.execute(f"PRAGMA wal_autocheckpoint = {frames}")
        self._wal_bytes = wal_bytes

    # -- plumbing -------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self._path}: the store is closed")
        return self._conn

    @contextlib.contextmanager
    def _write(self, *, durable: bool) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable`` selects synchronous=FULL (see module docstring)."""
        conn = self._connection()
        if durable != self._sync_full:
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._sync_full = durable
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_error:
                    _log().error("store_rollback_failed", path=str(self._path),
                                 error=str(rollback_error))
            raise

    def _apply(self, deltas: Mapping[str, int]) -> None:
        """Mirror in memory what a committed transaction added to table ``totals``."""
        for name, n in deltas.items():
            self._totals[name] = self._totals.get(name, 0) + n

    def _records(self) -> int:
        return self._totals.get(_RECORDS, 0)

    def _bytes(self) -> int:
        return self._totals.get(_BYTES, 0)

    def _settle(self) -> None:
        self._alarm.settle(records=self._records(), bytes_=self._bytes(),
                           max_records=self._max_records, max_bytes=self._byte_cap)

    # -- commit and quota -----------------------------------------------------------------

    def commit(self, records: Sequence[Record],
               checkpoints: Mapping[str, bytes] | None = None) -> list[int]:
        # Encoding is the CPU-heavy part and needs no lock; a NaN fails here, before any change.
        bodies = [encode_body(record.body) for record in records]
        sizes = [charged_bytes(record.serial, body)
                 for record, body in zip(records, bodies, strict=True)]
        with self._lock:
            conn = self._connection()
            try:
                if time.monotonic() >= self._next_disk_check:
                    self._check_disk(conn)
                self._reclaim(conn)
                cap = self._byte_cap
                for attempt in range(FULL_RETRIES):
                    try:
                        return self._commit_locked(records, bodies, sizes, checkpoints or {},
                                                   cap)
                    except sqlite3.Error as e:
                        if _primary_code(e) != sqlite3.SQLITE_FULL:
                            raise
                        cap = self._after_full(conn, attempt, sum(sizes))
            except sqlite3.Error as e:
                raise _store_error(self._path, "commit", e) from e
            raise StoreError(
                f"{self._path}: the store file is full and dropping unleased records did not "
                f"make room for {len(records)} records ({self._records()} stored, "
                f"{len(self._leased)} leased)")

    def _reclaim(self, conn: sqlite3.Connection) -> None:
        """Pages freed inside the file since it last filled up are room again: the byte cap
        rises to what is stored plus half of them. Half, because rows never fill a page whole;
        a cap set too high comes down again the next time the file fills. Without this, a file
        fragmented by the quota (telemetry deleted from among the health records it keeps)
        would keep the cap of its fullest moment and drop every new record while half of it
        stands empty."""
        if self._byte_cap >= self._max_bytes:
            return
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0]) * self._page_size
        self._byte_cap = min(self._max_bytes, max(self._byte_cap, self._bytes() + free // 2))

    def _after_full(self, conn: sqlite3.Connection, attempt: int, batch_bytes: int) -> int:
        """The file hit its page cap or the disk is full: the byte cap for the retry after
        failed ``attempt``.

        The store cannot hold more than it holds now, so the byte cap comes down to that, and
        stays there until a disk check finds more room. Each further retry of the same commit
        is allowed a batch less (deletes free whole pages only slowly in a fragmented file),
        for that commit only: one commit that needed more must not leave the store dropping
        everything that follows.

        The WAL is checkpointed and restarted first, so the retry writes over the WAL's frames
        from the start, into space the WAL file already holds: on a full disk that is the only
        space a write can count on. RESTART, not TRUNCATE, which would hand that space to
        whatever filled the disk.
        """
        self._check_disk(conn)
        conn.execute("PRAGMA wal_checkpoint(RESTART)")
        self._byte_cap = min(self._byte_cap, self._bytes())
        step = max(batch_bytes, 16 * self._page_size)
        return max(0, self._byte_cap - attempt * step)

    def _commit_locked(self, records: Sequence[Record], bodies: list[str], sizes: list[int],
                       checkpoints: Mapping[str, bytes], byte_cap: int) -> list[int]:
        n = len(records)
        with self._write(durable=True) as tx:
            # Read inside the transaction: the file, not our memory, is the authority on seqs.
            first = _last_seq(tx) + 1
            seqs = list(range(first, first + n))
            ranks = [KIND_PRIORITY[record.kind] for record in records]
            old_victims, new_victims = self._choose_victims(
                tx, sorted(zip(ranks, seqs, sizes, strict=True)), first_new=first,
                over_records=self._records() + n - self._max_records,
                over_bytes=self._bytes() + sum(sizes) - byte_cap)
            tx.executemany("DELETE FROM records WHERE seq = ?",
                           [(seq,) for seq, _ in old_victims])
            freed_rows = len(old_victims)
            freed_bytes = sum(size for _, size in old_victims)
            kept = [(seq, record.serial, record.kind.value, rank, record.ts, size, body)
                    for seq, record, rank, size, body
                    in zip(seqs, records, ranks, sizes, bodies, strict=True)
                    if seq not in new_victims]
            tx.executemany("INSERT INTO records (seq, serial, kind, drop_rank, ts, size, body) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", kept)
            if n:
                tx.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'records'",
                           (seqs[-1],))
            tx.executemany("INSERT OR REPLACE INTO checkpoints (key, value) VALUES (?, ?)",
                           list(checkpoints.items()))
            dropped = len(old_victims) + len(new_victims)
            by_kind = Counter(record.kind.value for record in records)
            deltas = {_COMMITTED: n, _RECORDS: len(kept) - freed_rows,
                      _BYTES: sum(row[5] for row in kept) - freed_bytes,
                      _DROPPED + "quota": dropped,
                      **{_COMMITTED_KIND + kind: count for kind, count in by_kind.items()}}
            _add_totals(tx, deltas)
        self._apply(deltas)
        self._last_seq = max(self._last_seq, first + n - 1)
        for kind, count in by_kind.items():
            self._metrics.inc("records_committed_total", count, label=kind)
        if dropped:
            self._metrics.inc("records_dropped_total", dropped, label="quota")
            self._alarm.dropped(dropped, records=self._records(), bytes_=self._bytes(),
                                max_records=self._max_records, max_bytes=self._byte_cap)
        return seqs

    def _choose_victims(self, conn: sqlite3.Connection,
                        incoming: list[tuple[int, int, int]], *, first_new: int,
                        over_records: int,
                        over_bytes: int) -> tuple[list[tuple[int, int]], set[int]]:
        """Records to drop so that the commit fits: (stored (seq, size) pairs, incoming seqs).

        ``incoming`` is (rank, seq, size) sorted; its seqs start at ``first_new``. Drop order is
        (rank, seq) over the stored unleased records and the incoming ones together, exactly as
        if the commit had been inserted first; the incoming records have the highest seqs, so
        they go last within their kind.
        """
        if over_records <= 0 and over_bytes <= 0:
            return [], set()
        cursor = conn.execute("SELECT drop_rank, seq, size FROM records "
                              "ORDER BY drop_rank, seq")
        try:
            stored = ((rank, seq, size) for rank, seq, size in cursor
                      if seq not in self._leased)
            old: list[tuple[int, int]] = []
            new: set[int] = set()
            freed = 0
            for _rank, seq, size in heapq.merge(stored, incoming):
                if len(old) + len(new) >= over_records and freed >= over_bytes:
                    break
                if seq >= first_new:
                    new.add(seq)
                else:
                    old.append((seq, size))
                freed += size
        finally:
            cursor.close()
        return old, new

    # -- lease and resolution -------------------------------------------------------------

    def lease(self, limit: int) -> list[StoredRecord]:
        with self._lock:
            conn = self._connection()
            if limit <= 0:
                return []
            try:
                chosen, scanned_to = self._unleased_seqs(conn, limit)
                leased: list[StoredRecord] = []
                rotten: list[tuple[int, str]] = []
                for row in _select_rows(conn, chosen):
                    try:
                        leased.append(_decode(row))
                    except (ValueError, TypeError, AttributeError) as e:
                        rotten.append((int(row[0]), f"{type(e).__name__}: {e}"))
                if rotten:
                    self._dead_letter_rotten(rotten)
            except sqlite3.Error as e:
                raise _store_error(self._path, "lease", e) from e
            self._leased.update(record.seq for record in leased)
            self._scan_from = max(self._scan_from, scanned_to + 1)
            return leased

    def _unleased_seqs(self, conn: sqlite3.Connection, limit: int) -> tuple[list[int], int]:
        """Up to ``limit`` unleased seqs, oldest first, and the last seq looked at."""
        chosen: list[int] = []
        scanned_to = self._scan_from - 1
        cursor = conn.execute("SELECT seq FROM records WHERE seq >= ? ORDER BY seq",
                              (self._scan_from,))
        try:
            for (seq,) in cursor:
                scanned_to = seq
                if seq not in self._leased:
                    chosen.append(seq)
                    if len(chosen) >= limit:
                        break
        finally:
            cursor.close()
        return chosen, scanned_to

    def _dead_letter_rotten(self, rotten: list[tuple[int, str]]) -> None:
        for seq, error in rotten:
            _log().error("store_record_undecodable", path=str(self._path), seq=seq, error=error)
        with self._write(durable=False) as tx:
            n, freed = _move_to_dead_letters(tx, [seq for seq, _ in rotten], "undecodable")
            deltas = {_DEAD_LETTERED: n, _DEAD_LETTERED_REASON + "undecodable": n,
                      _RECORDS: -n, _BYTES: -freed}
            _add_totals(tx, deltas)
        self._apply(deltas)
        self._metrics.inc("records_dead_lettered_total", n, label="undecodable")

    def ack(self, seqs: Iterable[int]) -> int:
        wanted = list(seqs)

        def delete(tx: sqlite3.Connection, chunk: list[int]) -> dict[str, int]:
            marks = _marks(chunk)
            found, size = tx.execute("SELECT count(*), coalesce(sum(size), 0) FROM records "
                                     f"WHERE seq IN ({marks})", chunk).fetchone()
            tx.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
            return {_ACKED: int(found), _RECORDS: -int(found), _BYTES: -int(size)}

        with self._lock:
            n = self._resolve("ack", wanted, delete).get(_ACKED, 0)
            self._leased.difference_update(wanted)
            self._metrics.inc("records_acked_total", n)
            self._settle()
            return n

    def retry(self, seqs: Iterable[int]) -> None:
        wanted = list(seqs)

        def count_attempt(tx: sqlite3.Connection, chunk: list[int]) -> dict[str, int]:
            tx.executemany("UPDATE records SET attempts = attempts + 1 WHERE seq = ?",
                           [(seq,) for seq in chunk])
            return {}

        with self._lock:
            self._resolve("retry", wanted, count_attempt)
            self._leased.difference_update(wanted)
            if wanted:
                self._scan_from = min(self._scan_from, min(wanted))

    def reject(self, seqs: Iterable[int], reason: str) -> None:
        wanted = list(seqs)

        def move(tx: sqlite3.Connection, chunk: list[int]) -> dict[str, int]:
            n, freed = _move_to_dead_letters(tx, chunk, reason)
            return {_DEAD_LETTERED: n, _DEAD_LETTERED_REASON + reason: n, _RECORDS: -n,
                    _BYTES: -freed}

        with self._lock:
            n = self._resolve("reject", wanted, move).get(_DEAD_LETTERED, 0)
            self._leased.difference_update(wanted)
            self._metrics.inc("records_dead_lettered_total", n, label=reason)
            self._settle()

    def _resolve(self, action: str, seqs: list[int],
                 work: Callable[[sqlite3.Connection, list[int]], dict[str, int]],
                 ) -> dict[str, int]:
        """Run ``work`` over ``seqs`` in one transaction per RESOLVE_CHUNK seqs and return the
        totals it counted, summed.

        An ack, retry or reject may name thousands of records (a drained window), and every
        page a transaction changes goes through the WAL: one transaction for all of them could
        outgrow the WAL's allowance and, with no reserve left on the disk, fail. Small ones
        always fit; nothing needs them together, as each record is resolved on its own.
        """
        summed: dict[str, int] = {}
        try:
            for chunk in _chunks(seqs, RESOLVE_CHUNK):
                deltas = self._resolve_chunk(work, chunk)
                for name, n in deltas.items():
                    summed[name] = summed.get(name, 0) + n
        except sqlite3.Error as e:
            raise _store_error(self._path, action, e) from e
        return summed

    def _resolve_chunk(self, work: Callable[[sqlite3.Connection, list[int]], dict[str, int]],
                       chunk: list[int]) -> dict[str, int]:
        with self._write(durable=False) as tx:
            deltas = work(tx, chunk)
            _add_totals(tx, deltas)
        self._apply(deltas)
        return deltas

    def release_all(self) -> None:
        with self._lock:
            self._connection()
            self._leased.clear()
            self._scan_from = 0

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            conn = self._connection()
            try:
                rows = conn.execute(f"{_SELECT_DEAD_LETTERS} ORDER BY seq").fetchall()
            except sqlite3.Error as e:
                raise _store_error(self._path, "listing dead letters", e) from e
        return [_dead_letter(row) for row in rows]

    # -- checkpoints, meta, stats ---------------------------------------------------------

    def checkpoint(self, key: str) -> bytes | None:
        with self._lock:
            conn = self._connection()
            try:
                row = conn.execute("SELECT value FROM checkpoints WHERE key = ?",
                                   (key,)).fetchone()
            except sqlite3.Error as e:
                raise _store_error(self._path, "reading a checkpoint", e) from e
        return None if row is None else bytes(row[0])

    def checkpoints(self) -> dict[str, bytes]:
        with self._lock:
            conn = self._connection()
            try:
                rows = conn.execute("SELECT key, value FROM checkpoints").fetchall()
            except sqlite3.Error as e:
                raise _store_error(self._path, "reading checkpoints", e) from e
        return {str(key): bytes(value) for key, value in rows}

    def put_meta(self, key: str, value: str) -> None:
        with self._lock:
            try:
                self._put_meta(key, value)
            except sqlite3.Error as e:
                raise _store_error(self._path, "writing meta", e) from e

    def _put_meta(self, key: str, value: str) -> None:
        with self._write(durable=True) as tx:
            tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            conn = self._connection()
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as e:
                raise _store_error(self._path, "reading meta", e) from e
        return None if row is None else str(row[0])

    def stats(self) -> StoreStats:
        with self._lock:
            conn = self._connection()
            try:
                oldest = conn.execute("SELECT min(ts) FROM records").fetchone()[0]
            except sqlite3.Error as e:
                raise _store_error(self._path, "reading stats", e) from e
            return _stats(self._totals, oldest, self._last_seq)

    def close(self) -> None:
        with self._lock:
            if self._conn is None:
                return
            self._leased.clear()
            conn, self._conn = self._conn, None
            try:
                conn.close()  # the last connection to close checkpoints and removes the WAL
            except sqlite3.Error as e:
                raise _store_error(self._path, "closing", e) from e


# -- read-only access for `bms-gateway status` ------------------------------------------------


def read_status(path: str | os.PathLike[str]) -> tuple[StoreStats, dict[str, str]]:
    """Stats and meta of the store at ``path``, read-only, whether or not a daemon has it open.

    Never creates any file (see ``_connect_read_only``) and never takes a lock that would stall
    the daemon: WAL readers do not block the writer. All figures come from one snapshot.
    """
    with _reading(path, "reading status") as conn:
        conn.execute("BEGIN")
        totals = {str(name): int(value)
                  for name, value in conn.execute("SELECT name, value FROM totals")}
        oldest = conn.execute("SELECT min(ts) FROM records").fetchone()[0]
        last_seq = _last_seq(conn)
        meta = {str(key): str(value) for key, value in conn.execute("SELECT key, value FROM meta")}
        conn.execute("COMMIT")
    return _stats(totals, oldest, last_seq), meta


def read_dead_letters(path: str | os.PathLike[str], limit: int) -> list[DeadLetter]:
    """The newest ``limit`` dead letters of the store at ``path``, newest first; read-only, as
    ``read_status``."""
    with _reading(path, "listing dead letters") as conn:
        rows = conn.execute(f"{_SELECT_DEAD_LETTERS} ORDER BY seq DESC LIMIT ?",
                            (limit,)).fetchall()
    return [_dead_letter(row) for row in rows]


@contextlib.contextmanager
def _reading(path: str | os.PathLike[str], action: str) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the gateway store at ``path``; sqlite3 errors become
    StoreError naming ``action``."""
    store = Path(path)
    if not store.is_file():
        raise StoreError(f"{store}: no store file there")
    try:
        conn = _connect_read_only(store)
    except sqlite3.Error as e:
        raise _store_error(store, "opening read-only", e) from e
    try:
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            raise StoreError(f"{store}: not a bms-gateway store")
        yield conn
    except sqlite3.Error as e:
        raise _store_error(store, action, e) from e
    finally:
        conn.close()


# -- helpers ------------------------------------------------------------------------------


def _stats(totals: Mapping[str, int], oldest: float | None, last_seq: int) -> StoreStats:
    return StoreStats(
        records=totals.get(_RECORDS, 0), bytes=totals.get(_BYTES, 0),
        oldest_unsent_ts=None if oldest is None else float(oldest),
        committed_total=totals.get(_COMMITTED, 0), acked_total=totals.get(_ACKED, 0),
        dropped_total=_by_label(totals, _DROPPED),
        dead_letters=totals.get(_DEAD_LETTERED, 0), last_seq=last_seq,
        committed_by_kind=_by_label(totals, _COMMITTED_KIND),
        dead_lettered_by_reason=_by_label(totals, _DEAD_LETTERED_REASON))


def _by_label(totals: Mapping[str, int], prefix: str) -> dict[str, int]:
    """The non-zero totals named ``<prefix><label>``, by label."""
    return {name.removeprefix(prefix): n for name, n in totals.items()
            if name.startswith(prefix) and n}


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    return 0 if row is None else int(row[0])


def _add_totals(conn: sqlite3.Connection, deltas: Mapping[str, int]) -> None:
    conn.executemany(_ADD_TOTAL, [(name, n) for name, n in deltas.items() if n])


def _chunks(seqs: Sequence[int], size: int = _IN_CHUNK) -> Iterator[list[int]]:
    for start in range(0, len(seqs), size):
        yield list(seqs[start:start + size])


def _marks(chunk: Sequence[int]) -> str:
    return ",".join("?" * len(chunk))


def _select_rows(conn: sqlite3.Connection, seqs: Sequence[int]) -> list[tuple[Any, ...]]:
    """Rows of ``seqs`` in seq order, text columns as raw bytes (see ``_decode``)."""
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(seqs):
        rows.extend(conn.execute(f"{_SELECT_ROW} WHERE seq IN ({_marks(chunk)}) ORDER BY seq",
                                 chunk).fetchall())
    return rows


def _decode(row: tuple[Any, ...]) -> StoredRecord:
    """A row as a record; a row whose bytes rotted raises ValueError, TypeError or AttributeError.

    Text columns arrive as bytes so that one undecodable row fails here, alone, rather than
    failing the whole query inside sqlite3.
    """
    seq, serial, kind, ts, attempts, body = row
    decoded = json.loads(body)
    if not isinstance(decoded, dict):
        raise ValueError(f"body is a JSON {type(decoded).__name__}, not an object")
    return StoredRecord(int(seq), serial.decode(), RecordKind(kind.decode()), float(ts),
                        decoded, int(attempts))


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    seq, serial, kind, ts, attempts, body, reason = row
    return DeadLetter(seq, _text(serial), _text(kind), ts, attempts, _text(body), str(reason))


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode(errors="backslashreplace")


def _move_to_dead_letters(conn: sqlite3.Connection, seqs: Sequence[int],
                          reason: str) -> tuple[int, int]:
    """Move stored records among ``seqs`` to the dead-letter table: (how many, their bytes)."""
    n = 0
    freed = 0
    now = time.time()
    for chunk in _chunks(seqs):
        marks = _marks(chunk)
        found, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM records "
                                   f"WHERE seq IN ({marks})", chunk).fetchone()
        conn.execute("INSERT INTO dead_letters "
                     "(seq, serial, kind, ts, attempts, body, reason, rejected_at) "
                     "SELECT seq, serial, kind, ts, attempts, body, ?, ? FROM records "
                     f"WHERE seq IN ({marks})", (reason, now, *chunk))
        conn.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk)
        n += found
        freed += size
    return int(n), int(freed)


def _primary_code(error: sqlite3.Error) -> int:
    # sqlite_errorcode is an extended code (SQLITE_CORRUPT_INDEX, ...), or None for errors
    # raised by the sqlite3 module itself.
    return (error.sqlite_errorcode or 0) & 0xFF


def _store_error(path: Path, action: str, error: sqlite3.Error) -> StoreError:
    if _primary_code(error) in _CORRUPT_CODES:
        return StoreCorruptError(f"{path}: {action} failed, the store file is corrupt "
                                 f"({error}); it is moved aside at the next start")
    return StoreError(f"{path}: {action} failed: {error}")


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sidecars(path: Path) -> tuple[Path, Path, Path]:
    """The database file and the -wal and -shm files SQLite keeps beside it."""
    return path, Path(f"{path}-wal"), Path(f"{path}-shm")


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection that neither creates the file nor leaves a -wal or -shm behind.

    Without a -wal file no connection has the store open, and it is read as ``immutable``:
    otherwise SQLite would leave a -wal and -shm owned by whoever is reading (``sudo status``),
    which could lock the daemon's user out of its own store.
    """
    live = Path(f"{path}-wal").exists()
    uri = f"{path.resolve().as_uri()}?mode=ro{'' if live else '&immutable=1'}"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=2.0)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode (isolation_level=None): transactions are explicit BEGIN IMMEDIATE ...
    # COMMIT. Shared between threads under the store's lock.
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)


def _open_verified(path: Path) -> tuple[sqlite3.Connection, Path | None]:
    """A connection to a healthy store at ``path`` (made if missing), and where a corrupt file
    found there was moved to."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        is_new = not path.exists()
        is_empty = not is_new and path.stat().st_size == 0
    except OSError as e:
        raise StoreError(f"{path}: cannot open the store: {e}") from e
    moved_to = None
    if is_new:
        _create(path, last_seq=0)
    else:
        problem = "empty file" if is_empty else _truncation(path)
        if problem is None:
            problem = _check(path)
        if problem is not None:
            salvaged = _salvage_last_seq(path)
            seq_floor = salvaged if salvaged is not None else time.time_ns() // 1000
            moved_to = _move_aside(path, problem)
            _log().error("store_corrupt_moved_aside", path=str(path), moved_to=str(moved_to),
                         reason=problem, seq_floor=seq_floor,
                         seq_floor_from="old file" if salvaged is not None else "clock")
            _create(path, last_seq=seq_floor)
    try:
        return _connect(path), moved_to
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot open the store: {e}") from e


def _check(path: Path) -> str | None:
    """Why the store file is corrupt, or None; read-only.

    Read-only because closing the last read-write connection checkpoints the WAL into the file
    and deletes it: on a corrupt file that would destroy what is to be kept.
    """
    try:
        conn = _connect_read_only(path)
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot open the store: {e}") from e
    try:
        return _problem_with(conn, path)
    except sqlite3.Error as e:
        if _primary_code(e) not in _CORRUPT_CODES:
            raise StoreError(f"{path}: cannot open the store: {e}") from e
        return str(e)
    finally:
        conn.close()


def _truncation(path: Path) -> str | None:
    """Why the file looks cut short, or None.

    quick_check reads a missing tail as zeros and can pass a file cut inside its last page. The
    file header knows the page size and (when its change counters agree) the page count. Only
    without a -wal file: mid-checkpoint, the header may already count pages not yet written
    back, and WAL recovery completes them.
    """
    if Path(f"{path}-wal").exists():
        return None
    try:
        with path.open("rb") as file:
            header = file.read(100)
        size = path.stat().st_size
    except OSError as e:
        raise StoreError(f"{path}: cannot read the store: {e}") from e
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return None  # SQLite itself says "not a database"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return None  # a damaged header: SQLite itself says "not a database"
    pages = int.from_bytes(header[28:32], "big")
    counts_valid = header[24:28] == header[92:96] and pages > 0
    if size % page_size or (counts_valid and size < pages * page_size):
        return f"truncated: {size} bytes, pages of {page_size} bytes" + (
            f", header says {pages} pages" if counts_valid else "")
    return None


def _problem_with(conn: sqlite3.Connection, path: Path) -> str | None:
    """Why the store file is corrupt, or None if it is healthy.

    Raises StoreError for a file that must not be moved aside: another application's database,
    or a store written by a newer gateway.
    """
    lines = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
    if lines != ["ok"]:
        return "integrity_check: " + "; ".join(lines[:3])
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    schema = frozenset(conn.execute(_SCHEMA_ROWS).fetchall())
    tables = {str(row[1]) for row in schema if row[0] == "table"}
    if app_id != APPLICATION_ID:
        if tables and "records" not in tables:
            raise StoreError(f"{path} is another application's SQLite database "
                             f"(application_id {app_id:#x}); not using or moving it")
        return f"application_id {app_id:#x} is not a gateway store's"
    if version != SCHEMA_VERSION:
        # A newer gateway that bumped the version changed the schema too; a version beside our
        # exact schema is a damaged header, and refusing it would stop the daemon for good.
        if version > SCHEMA_VERSION and schema != _expected_schema():
            raise StoreError(f"{path}: store schema version {version} is newer than this "
                             f"gateway's ({SCHEMA_VERSION}); run a newer gateway")
        return f"schema version {version}, expected {SCHEMA_VERSION}"
    if schema != _expected_schema():
        differing = sorted(str(row[1]) for row in schema ^ _expected_schema())
        return f"schema differs from a gateway store's in {', '.join(differing)}"
    return None


def _salvage_last_seq(path: Path) -> int | None:
    """The highest seq a corrupt store may have handed out, from whatever part still answers.

    Each place is tried on its own: a failure there is part of the corruption being handled
    (and reported by the caller), and the other places may still answer.
    """
    try:
        conn = _connect_read_only(path)
    except sqlite3.Error:
        return None
    found: list[int] = []
    try:
        for query in ("SELECT seq FROM sqlite_sequence WHERE name = 'records'",
                      "SELECT max(seq) FROM records", "SELECT max(seq) FROM dead_letters"):
            try:
                row = conn.execute(query).fetchone()
            except sqlite3.Error:
                continue
            if row is not None and isinstance(row[0], int):
                found.append(row[0])
    finally:
        conn.close()
    return max(found) if found else None


def _create(path: Path, *, last_seq: int) -> None:
    """Make an empty store at ``path`` atomically: built beside it, then renamed into place."""
    building = path.with_name(f"{path.name}.creating")
    try:
        for leftover in _sidecars(building):  # an earlier creation that crashed: ours, empty
            leftover.unlink(missing_ok=True)
        # Rollback-journal mode while building, so nothing is left in a WAL at the rename;
        # the first real open switches the file to WAL for good.
        conn = sqlite3.connect(building, isolation_level=None)
        try:
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_schema_script(last_seq))
        finally:
            conn.close()
        _fsync(building)
        os.rename(building, path)
        _fsync(path.parent)
    except (sqlite3.Error, OSError) as e:
        raise StoreError(f"{path}: cannot create the store: {e}") from e


def _move_aside(path: Path, reason: str) -> Path:
    """Rename a corrupt store and its -wal and -shm to ``<name>.corrupt-<UTC time>``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(100):
        target = path.with_name(f"{path.name}.corrupt-{stamp}{f'.{n}' if n else ''}")
        if not any(p.exists() for p in _sidecars(target)):
            break
    else:
        raise StoreCorruptError(f"{path} is corrupt ({reason}) and 100 names to move it aside "
                                "to are taken")
    try:
        for source, destination in zip(_sidecars(path), _sidecars(target), strict=True):
            if source.exists():
                os.rename(source, destination)
        _fsync(path.parent)
    except OSError as e:
        raise StoreCorruptError(f"{path} is corrupt ({reason}) and could not be moved aside "
                                f"to {target}: {e}") from e
    return target


def _fsync(path: Path) -> None:
    """fsync a file, or a folder (so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
