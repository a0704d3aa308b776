"""Fault matrix, daemon side: SIGKILL and SIGTERM of the daemon under load, and its store's quota
reached while the broker is down. The daemon runs as a child process with a real SQLite store;
a real Mosquitto and an independent subscriber see what it delivers. Each test prints
TESTING.md's accounting; ``lost`` must be 0.

Load: a fleet of 16 packs of 32 cells (about 2,100 frames/s) replayed at real-time pacing from
trace pieces. A restarted daemon goes on with the next piece, so measurement time keeps moving
forward across restarts as on a live bus (the edge core refuses samples older than its state).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.model import Record, RecordKind
from gateway.store.sqlite import SqliteStore
from tests.support.broker import Broker
from tests.support.daemon import REPO, Daemon, child_env, gateway_config, status
from tests.support.faults import (
    account,
    integrity_check,
    log_events,
    read_store,
    write_fleet_traces,
)
from tests.support.subscriber import Subscriber
from tests.support.tmpfs import inside_command, require_tmpfs, tmpfs_command

GATEWAY = "gw-faults"
PACKS = 16
INFLIGHT, BATCH = 16, 100
WINDOW_RECORDS = INFLIGHT * BATCH
KILLS = 20
PIECE_S = 6.0


@pytest.fixture(scope="module")
def pieces(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Consecutive pieces of the fleet's trace, one per daemon run, each longer than a run."""
    return write_fleet_traces(tmp_path_factory.mktemp("fleet"), packs=PACKS, cells=32,
                              seconds=PIECE_S * (KILLS + 1), pieces=KILLS + 1)


def fleet_config(tmp: Path, port: int, trace: Path, *, name: str = "gateway.toml",
                 **extra: dict[str, Any]) -> Path:
    return gateway_config(
        tmp, broker_port=port, gateway_id=GATEWAY, name=name,
        source={"kind": "replay", "files": [str(trace)], "replay_speed": 1.0},
        edge={"telemetry_interval_s": 0.0, "health_interval_s": 1.0},
        mqtt={"inflight": INFLIGHT, "batch_max_records": BATCH}, extra=extra)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               daemon: Daemon | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if daemon is not None and daemon.proc is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited {daemon.proc.returncode} while waiting for "
                                 f"{what}:\n{daemon.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def received_by_kind(sub: Subscriber) -> dict[str, set[int]]:
    """Distinct seqs the subscriber got from this gateway, by record kind (the topic's end)."""
    out: dict[str, set[int]] = {"telemetry": set(), "health": set(), "events": set()}
    for topic, envelope in sub.envelopes():
        if envelope["gateway_id"] == GATEWAY:
            out[topic.rsplit("/", 1)[1]].update(int(r["seq"]) for r in envelope["records"])
    return out


def health_records(sub: Subscriber) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Each serial's health records as (seq, record), in seq order, duplicates once."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for topic, envelope in sub.envelopes():
        if topic.endswith("/health"):
            for record in envelope["records"]:
                out.setdefault(envelope["serial"], {})[int(record["seq"])] = record
    return {serial: sorted(by_seq.items()) for serial, by_seq in out.items()}


# ---------------------------------------------------------------------------------------------


def test_sigkill_twenty_times_under_load_loses_nothing_committed(
        tmp_path: Path, pieces: list[Path]) -> None:
    """SIGKILL at random moments under load, 20 times, restarting on the next trace piece: the
    store passes its integrity check every time, its lifelong counts never go backwards, every
    committed record is delivered, duplicates stay within the in-flight window per kill, and
    the packs' lifetime counters never go backwards."""
    rng = random.Random(20261124)
    store = tmp_path / "store.sqlite"
    kill_after_s: list[float] = []
    previous = None
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.host, broker.port) as sub:
        for k in range(KILLS):
            config = fleet_config(tmp_path, broker.port, pieces[k], name=f"gateway-{k}.toml")
            with Daemon(config, tmp_path / f"daemon-{k}.log") as daemon:
                daemon.wait_ready()
                kill_after_s.append(rng.uniform(0.3, 3.5))
                time.sleep(kill_after_s[-1])
                daemon.kill()
            assert daemon.proc is not None and daemon.proc.returncode == -9
            assert integrity_check(store) == ["ok"], f"after kill {k + 1}"
            view = read_store(store)
            if previous is not None:
                for name in ("committed", "acked"):
                    assert view.totals.get(name, 0) >= previous.totals.get(name, 0), name
                assert view.last_seq >= previous.last_seq
            previous = view
        # a last, clean run delivers what the killed ones left behind
        config = fleet_config(tmp_path, broker.port, pieces[KILLS], name="gateway-last.toml")
        with Daemon(config, tmp_path / "daemon-last.log") as daemon:
            daemon.wait_ready()
            assert previous is not None
            last_killed = previous.last_seq
            wait_until(lambda: min(read_store(store).stored, default=math.inf) > last_killed,
                       30, "the records of the killed runs to be delivered", daemon)
            assert daemon.terminate(timeout=10) == 0, daemon.tail()
    logs = sorted(tmp_path.glob("daemon-*.log"))
    for log in logs:  # each start's own integrity check passed too: nothing was moved aside
        assert not log_events(log, "store_corrupt_moved_aside"), log
        assert not log_events(log, "stage_crashed"), log
    assert not list(tmp_path.glob("store.sqlite.corrupt-*"))

    counts = status(config)
    accounting = account(counts, sub.received, sub.duplicates)
    view = read_store(store)
    received = {seq for gateway, seq in sub.deliveries if gateway == GATEWAY}
    print(f"\nSIGKILL x{KILLS} at {[round(s, 1) for s in kill_after_s]} s after ready: "
          f"{accounting}")
    assert accounting.committed == view.last_seq > 0
    assert accounting.dropped == accounting.dead_lettered == 0
    assert accounting.lost == 0, accounting
    missing = set(range(1, view.last_seq + 1)) - received - view.stored
    assert not missing, f"{len(missing)} committed records lost, first {sorted(missing)[:20]}"
    assert accounting.duplicates <= KILLS * WINDOW_RECORDS

    # lifetime counters: checkpointed in the same transaction as the records they produced
    series = health_records(sub)
    assert len(series) == PACKS
    for serial, records in series.items():
        assert len(records) >= 10, serial
        for name in ("energyThroughput", "capacityThroughput"):
            values = [record[name] for _, record in records if name in record]
            assert values, (serial, name)
            assert all(b >= a for a, b in itertools.pairwise(values)), (serial, name)


def test_sigterm_exits_within_ten_seconds_and_the_restart_duplicates_nothing(
        tmp_path: Path, pieces: list[Path]) -> None:
    """SIGTERM under load: exit 0 within 10 s, every acknowledgement taken in first, so the
    restarted daemon sends nothing twice. Then SIGTERM with the broker frozen (nothing will
    ever be acknowledged): still out within 10 s, and nothing is lost after a restart."""
    store = tmp_path / "store.sqlite"
    stop_s: list[float] = []

    def run(config: Path, log: Path, seconds: float, *, frozen: Broker | None = None) -> None:
        with Daemon(config, log) as daemon:
            daemon.wait_ready()
            wait_until(lambda: store.exists() and read_store(store).acked > 0, 30,
                       "records flowing", daemon)
            time.sleep(seconds)
            if frozen is not None:
                frozen.pause()
                time.sleep(0.5)  # publishes go out into the frozen broker
            stopping = time.monotonic()
            code = daemon.terminate(timeout=10)
            stop_s.append(time.monotonic() - stopping)
            assert code == 0, daemon.tail()
        assert log_events(log, "gateway_stopping")[-1]["reason"] == "SIGTERM"

    with Broker(tmp_path / "broker") as broker, Subscriber(broker.host, broker.port) as sub:
        run(fleet_config(tmp_path, broker.port, pieces[0], name="first.toml"),
            tmp_path / "first.log", 4.0)
        run(fleet_config(tmp_path, broker.port, pieces[1], name="second.toml"),
            tmp_path / "second.log", 3.0)
        duplicates_after_clean_restart = sub.duplicates
        run(fleet_config(tmp_path, broker.port, pieces[2], name="third.toml"),
            tmp_path / "third.log", 2.0, frozen=broker)
        broker.resume()
        config = fleet_config(tmp_path, broker.port, pieces[3], name="fourth.toml")
        run(config, tmp_path / "fourth.log", 2.0)
        sub.wait_for_seqs(GATEWAY, set(range(1, read_store(store).last_seq + 1))
                          - read_store(store).stored, timeout=10)
    counts = status(config)
    accounting = account(counts, sub.received, sub.duplicates)
    print(f"\nSIGTERM x4 (the third into a frozen broker): {accounting}; "
          f"stopped in {[round(s, 1) for s in stop_s]} s; duplicates after the clean restart="
          f"{duplicates_after_clean_restart}")
    assert all(s <= 10 for s in stop_s)
    assert duplicates_after_clean_restart == 0
    assert accounting.lost == 0, accounting
    assert accounting.duplicates <= WINDOW_RECORDS  # only what the frozen broker took


# ---------------------------------------------------------------------------------------------


# Played live at 10 × speed, where frames carry wall-clock time: 30 simulated seconds are 3 s
# of measurement time, longer than the edge core's debounce, so each window makes two events.
EVENTFUL_SCENARIO = """
[scenario]
base = "nominal"
description = "nominal, with a cell sensor stuck (and flagged) for 30 s in every 60 s"
""" + "".join(f"""
[[fault]]
kind = "stuck_cell"
cell = 3
flagged = true
start_s = {60.0 * i + 10.0}
duration_s = 30.0
""" for i in range(30))


def test_quota_reached_while_the_broker_is_down(tmp_path: Path) -> None:
    """With the broker away and a 400-record quota, the daemon stays up and drops telemetry,
    oldest first, every drop counted; no health or events record is dropped; when the broker
    returns the backlog drains, and the accounting closes exactly."""
    max_records = 400
    scenario = tmp_path / "eventful.toml"
    scenario.write_text(EVENTFUL_SCENARIO)
    broker = Broker(tmp_path / "broker", persistence=True, gateway_listener=True)
    config = gateway_config(
        tmp_path, broker_port=broker.gateway_port, gateway_id=GATEWAY,
        source={"kind": "simulator", "simulator": {"scenario": str(scenario), "cells": 16,
                                                     "serial": "QUOTA-01", "speed": 10.0}},
        edge={"telemetry_interval_s": 0.0, "health_interval_s": 1.0},
        extra={"store": {"max_records": max_records}})
    store, log = tmp_path / "store.sqlite", tmp_path / "daemon.log"
    with Daemon(config, log) as daemon:
        daemon.wait_ready()
        wait_until(lambda: store.exists()
                   and read_store(store).totals.get("dropped:quota", 0) > 1000, 60,
                   "1,000 records dropped under quota", daemon)
        during = status(config)
        # one snapshot: with the broker away nothing is acknowledged or leased, so every seq
        # handed out and no longer stored was dropped under quota
        outage = read_store(store)
        assert during["daemon_running"] is True
        assert during["broker_state"] in ("connecting", "disconnected")
        # exact: everything committed is stored or counted as dropped (one snapshot)
        assert during["records_committed_total"] == (during["store_records"]
                                                     + during["records_dropped_total{quota}"])
        assert during["store_records"] <= max_records
        # The broker comes back. The subscriber gets its session first (the gateway's listener
        # stays shut meanwhile), and a clean restart keeps that session for it.
        broker.start(gateway=False)
        try:
            with Subscriber(broker.host, broker.port) as sub:
                broker.restart()
                sub.wait_until(lambda: sub.subscribes == 2, 10, "the subscriber to be back")
                wait_until(lambda: len(read_store(store).stored) < 50, 30,
                           "the backlog to drain", daemon)
                assert daemon.terminate(timeout=10) == 0, daemon.tail()
        finally:
            broker.stop()
    counts = status(config)
    accounting = account(counts, sub.received, sub.duplicates)
    got = received_by_kind(sub)
    stored = read_store(store).kinds
    committed = {kind: counts.get(f"records_committed_total{{{kind}}}", 0)
                 for kind in ("telemetry", "health", "events")}
    print(f"\nquota of {max_records} reached with the broker down: {accounting}; committed by "
          f"kind {committed}; stored at the peak {len(outage.kinds)} "
          f"({sum(1 for k in outage.kinds.values() if k != 'telemetry')} health and events)")
    assert accounting.lost == 0, accounting
    assert accounting.dropped == counts["records_dropped_total{quota}"] > 1000
    assert sum(committed.values()) == accounting.committed
    # health and events: every one committed arrived (or is still stored)
    for kind in ("health", "events"):
        kept = got[kind] | {seq for seq, k in stored.items() if k == kind}
        assert len(kept) == committed[kind] > 0, kind
    # telemetry: every drop was telemetry, and while the broker was away (no record leased,
    # which the quota never drops) the drops were exactly the oldest telemetry records
    dropped = (set(range(1, accounting.committed + 1)) - set().union(*got.values())
               - set(stored))
    assert len(dropped) == accounting.dropped
    telemetry = sorted(dropped | got["telemetry"]
                       | {seq for seq, k in stored.items() if k == "telemetry"})
    assert len(telemetry) == committed["telemetry"]
    dropped_in_outage = outage.gone()
    assert dropped_in_outage == set(telemetry[:len(dropped_in_outage)])
    assert len(dropped_in_outage) == outage.totals["dropped:quota"]
    # transitions logged once each, not per record
    assert len(log_events(log, "store_full")) == 1
    assert len(log_events(log, "store_drained")) == 1
    assert not log_events(log, "stage_crashed")


def test_a_full_filesystem_while_the_broker_is_down(tmp_path: Path,
                                                     pieces: list[Path]) -> None:
    """The store alone on a 6 MiB filesystem (a private tmpfs) with no reserve, given a 256 MB
    quota it can never reach, and 60 s of the fleet replayed as fast as it goes with the broker
    down: the disk fills, the daemon stays up and drops telemetry, counted; once the broker is
    back it drains everything it kept and exits by itself (end of the replay)."""
    require_tmpfs()
    disk = tmp_path / "disk"
    disk.mkdir()
    size = 6 << 20
    broker = Broker(tmp_path / "broker", persistence=True, gateway_listener=True)
    config = gateway_config(
        tmp_path, broker_port=broker.gateway_port, gateway_id=GATEWAY,
        source={"kind": "replay", "files": [str(p) for p in pieces[:10]], "replay_speed": 0.0},
        # a health record is about 2 KB: every 5 s they fit the disk with room for telemetry
        edge={"telemetry_interval_s": 0.0, "health_interval_s": 5.0},
        extra={"store": {"path": str(disk / "store.sqlite"), "min_free_bytes": 0}})
    log, final = tmp_path / "daemon.log", tmp_path / "final-status.json"
    # the daemon, then (the tmpfs goes with the namespace) its final status, in the namespace
    script = ('"$1" -m gateway run -c "$2" > "$3" 2>&1; code=$?; '
              '"$1" -m gateway status -c "$2" --json > "$4"; exit $code')
    daemon = subprocess.Popen(
        tmpfs_command(disk, size, ["sh", "-c", script, "sh", sys.executable, str(config),
                                   str(log), str(final)]),
        cwd=REPO, env=child_env(), start_new_session=True)
    # the tmpfs as the daemon sees it; SQLite itself must read it from inside the namespace
    mounted = Path(f"/proc/{daemon.pid}/root") / disk.relative_to("/")

    def running() -> bool:
        if daemon.poll() is not None:
            raise AssertionError(f"daemon exited {daemon.returncode}:\n"
                                 f"{log.read_text(errors='replace')[-4000:]}")
        return True

    try:
        wait_until(lambda: running() and len(log_events(log, "replay_finished")) == 10, 120,
                   "the replay to finish with the broker down")
        during = status(config, wrap=lambda command: inside_command(daemon.pid, command))
        footprint = sum(p.stat().st_size for p in mounted.iterdir())
        assert during["daemon_running"] is True
        assert during["records_dropped_total{quota}"] > 0
        assert during["records_committed_total"] == (during["store_records"]
                                                     + during["records_dropped_total{quota}"])
        assert footprint < size
        broker.start(gateway=False)
        try:
            with Subscriber(broker.host, broker.port) as sub:
                broker.restart()
                assert daemon.wait(timeout=60) == 0, log.read_text(errors="replace")[-4000:]
        finally:
            broker.stop()
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
    counts = json.loads(final.read_text())
    accounting = account(counts, sub.received, sub.duplicates)
    got = received_by_kind(sub)
    print(f"\n6 MiB filesystem filled with the broker down: {accounting}; stored at the end of "
          f"the replay {during['store_records']} records in {footprint} bytes (file and WAL)")
    assert accounting.lost == 0, accounting
    assert accounting.still_stored == 0 and accounting.dropped > 0
    for kind in ("health", "events"):
        assert len(got[kind]) == counts.get(f"records_committed_total{{{kind}}}", 0), kind
    assert len(log_events(log, "store_full")) == 1
    assert not log_events(log, "stage_crashed")


def test_a_corrupt_store_is_moved_aside_kept_and_replaced(tmp_path: Path,
                                                          pieces: list[Path]) -> None:
    """A store file cut in half (a disk that lost its tail) at start: the daemon moves it
    aside, keeps it byte for byte, logs the alarm, shows it in ``status``, and carries on with
    a fresh store whose seqs never reuse the old ones."""
    store = tmp_path / "store.sqlite"
    old = SqliteStore(store, max_bytes=1 << 30, max_records=1 << 20)
    old.commit([Record("OLD-1", RecordKind.TELEMETRY, 1_767_225_600.0 + i, {"n": i})
                for i in range(500)])
    old.close()
    store.write_bytes(store.read_bytes()[:store.stat().st_size // 2])
    damaged = store.read_bytes()
    log = tmp_path / "daemon.log"
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.host, broker.port) as sub:
        config = fleet_config(tmp_path, broker.port, pieces[0])
        with Daemon(config, log) as daemon:
            daemon.wait_ready()
            wait_until(lambda: read_store(store).acked > 100, 30, "records flowing", daemon)
            counts = status(config)
            text = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(config)],
                                  capture_output=True, text=True, timeout=60, cwd=REPO,
                                  env=child_env(), check=True).stdout
            assert daemon.terminate(timeout=10) == 0, daemon.tail()
    (alarm,) = log_events(log, "store_corrupt_moved_aside")
    aside = Path(alarm["moved_to"])
    print(f"\ncorrupt store at start: moved to {aside.name} ({alarm['reason']}); "
          f"seqs go on from {alarm['seq_floor']} ({alarm['seq_floor_from']})")
    assert alarm["level"] == "error"
    assert aside.parent == tmp_path and aside.read_bytes() == damaged
    assert counts["store_moved_aside"] == str(aside)
    assert str(aside) in text and "moved aside" in text
    assert min(seq for _, seq in sub.deliveries) > 500
