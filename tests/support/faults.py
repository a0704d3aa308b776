"""What the fault tests share: a fleet's trace, the store file as the daemon left it, the
daemon's log, and TESTING.md's accounting.

The store is read with read-only SQLite connections, whether or not the daemon has it open (WAL
readers never block its writer), so a test can tell which records were acknowledged without
asking the daemon: every seq up to the last one handed out that is no longer stored, dropped or
dead-lettered was acknowledged by the broker.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import can

from firmware_sim import Simulator
from tests.support.broker import Broker
from tests.support.subscriber import Subscriber

#: trace time of the fleet's first frame (2026-01-01T00:00:00Z)
FLEET_START = 1_767_225_600.0


def write_fleet_traces(folder: Path, *, packs: int, cells: int, seconds: float,
                       pieces: int = 1, seed: int = 100) -> list[Path]:
    """A fleet of ``packs`` simulated BMSs (node ids 0…, serials ``FLEET-00``…) on one bus,
    ``seconds`` of candump trace cut into ``pieces`` consecutive files of equal length.

    Pieces let a test restart the daemon on the next one: the trace's time, which is the
    records' measurement time, keeps moving forward across restarts, as a live bus's would.
    32 cells make about 134 frames/s per pack at the nominal scenario's periods.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sims = [Simulator.from_scenario("nominal", cells=cells, serial=f"FLEET-{n:02d}",
                                    seed=seed + n, node_id=n, start_time=FLEET_START)
            for n in range(packs)]
    frames = heapq.merge(*(sim.messages(seconds, channel="can0") for sim in sims),
                         key=lambda message: message.timestamp)
    length = seconds / pieces
    paths = [folder / f"fleet-{i:02d}.log" for i in range(pieces)]
    writers = [can.Logger(str(path)) for path in paths]
    try:
        for message in frames:
            piece = min(pieces - 1, int((message.timestamp - FLEET_START) / length))
            writers[piece].on_message_received(message)
    finally:
        for writer in writers:
            writer.stop()
    return paths


def count_frames(trace: Path) -> int:
    with can.LogReader(str(trace)) as reader:
        return sum(1 for _ in reader)


# ---------------------------------------------------------------------------------------------
# the store file


def _read_only(path: Path) -> sqlite3.Connection:
    """Read-only, creating nothing: without a -wal file nobody has the store open, and it is
    read as immutable (no -shm made). The path is made absolute, not resolved: a store seen
    through ``/proc/<pid>/root`` (a private tmpfs) must not be resolved to the outside view."""
    live = Path(f"{path}-wal").exists()
    uri = f"{path.absolute().as_uri()}?mode=ro{'' if live else '&immutable=1'}"
    return sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None)


@dataclass(frozen=True, slots=True)
class StoreView:
    """One consistent snapshot of a store file."""

    last_seq: int
    #: seq → kind of every record stored, and of every dead letter
    kinds: dict[int, str]
    dead: dict[int, str]
    totals: dict[str, int]

    @property
    def stored(self) -> frozenset[int]:
        return frozenset(self.kinds)

    @property
    def acked(self) -> int:
        return self.totals.get("acked", 0)

    def gone(self) -> set[int]:
        """Seqs handed out that are neither stored nor dead-lettered: acknowledged, or dropped
        under quota (a test that reads this reads ``totals`` too)."""
        return set(range(1, self.last_seq + 1)) - self.stored - set(self.dead)


def read_store(path: Path) -> StoreView:
    conn = _read_only(path)
    try:
        conn.execute("BEGIN")
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        kinds = {int(seq): str(kind) for seq, kind in conn.execute("SELECT seq, kind FROM records")}
        dead = {int(seq): str(kind)
                for seq, kind in conn.execute("SELECT seq, kind FROM dead_letters")}
        totals = {str(name): int(value)
                  for name, value in conn.execute("SELECT name, value FROM totals")}
        conn.execute("COMMIT")
    finally:
        conn.close()
    return StoreView(0 if row is None else int(row[0]), kinds, dead, totals)


def integrity_check(path: Path) -> list[str]:
    """``PRAGMA integrity_check`` of the store as it lies (with a dead writer's WAL, if any):
    ``["ok"]`` for a healthy file."""
    conn = _read_only(path)
    try:
        return [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# the daemon's log


def log_events(log: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (of one event name), in order; none before the log exists."""
    out: list[dict[str, Any]] = []
    if not log.exists():
        return out
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if name is None or entry.get("event") == name:
            out.append(entry)
    return out


def log_time(entry: dict[str, Any]) -> float:
    """A log line's wall-clock time (POSIX seconds)."""
    return datetime.fromisoformat(str(entry["timestamp"]).replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------------------------
# accounting


@dataclass(frozen=True, slots=True)
class Accounting:
    """TESTING.md's accounting. Dead letters are drops by policy too, counted apart."""

    committed: int
    received: int
    still_stored: int
    dropped: int
    dead_lettered: int
    duplicates: int

    @property
    def lost(self) -> int:
        return (self.committed - self.received - self.still_stored - self.dropped
                - self.dead_lettered)

    def __str__(self) -> str:
        return (f"committed={self.committed} received={self.received} "
                f"still_stored={self.still_stored} dropped={self.dropped} "
                f"dead_lettered={self.dead_lettered} lost={self.lost} "
                f"duplicates={self.duplicates}")


def account(status: dict[str, Any], received: int, duplicates: int) -> Accounting:
    """The accounting from ``bms-gateway status --json`` (the store's exact, lifelong counts)
    and what the independent subscriber saw."""
    return Accounting(committed=int(status["records_committed_total"]), received=received,
                      still_stored=int(status["store_records"]),
                      dropped=int(status["records_dropped_total"]),
                      dead_lettered=int(status["records_dead_lettered_total"]),
                      duplicates=duplicates)


# ---------------------------------------------------------------------------------------------
# killing the broker without letting it lose what it acknowledged


def settled(store: Path, *, quiet_s: float = 0.3, timeout: float = 10.0) -> StoreView:
    """The store once its acknowledged count has held still for ``quiet_s``: with the broker
    frozen, the publisher has then taken in every PUBACK that was already on its way."""
    deadline = time.monotonic() + timeout
    view = read_store(store)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        again = read_store(store)
        if again.acked == view.acked:
            return again
        view = again
    raise AssertionError(f"the acknowledged count of {store} did not settle within {timeout} s")


def kill_broker_when_caught_up(broker: Broker, sub: Subscriber, store: Path, gateway_id: str,
                               *, tries: int = 3) -> StoreView:
    """SIGKILL the broker at a moment when every record it acknowledged is at the subscriber.

    Mosquitto acknowledges a publish once it has queued the copies for its subscribers, not
    once they are delivered, and a SIGKILLed Mosquitto loses what it had not delivered: a loss
    no publisher can see. So the broker is frozen (SIGSTOP), the acknowledgements already on
    their way are let in, and the broker is killed only once the subscriber holds every record
    the store no longer does (for a store that drops nothing under quota). Were a copy stuck
    in the frozen broker, it is thawed for a moment and frozen again. Whatever is missing later
    is the gateway's loss.
    """
    for _ in range(tries):
        broker.pause()
        view = settled(store)
        try:
            sub.wait_for_seqs(gateway_id, view.gone(), timeout=5)
        except AssertionError:
            broker.resume()
            time.sleep(1.0)
            continue
        broker.kill()
        return view
    raise AssertionError(f"the subscriber never caught up with the broker in {tries} tries")
