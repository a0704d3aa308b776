"""End to end with real parts: firmware_sim → (SLCAN over a pty | candump trace | the real foxBMS
trace) → ``bms-gateway`` as a child process → a private mosquitto → an independent subscriber."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import cantools
import pytest

from gateway.publish.encode import format_ts
from tests.support.broker import Broker
from tests.support.daemon import (
    PROFILES,
    REPO,
    Daemon,
    child_env,
    gateway_config,
    simulate,
    status,
)
from tests.support.subscriber import Subscriber

DBC = REPO / "dbc" / "bms_reference.dbc"
CELLS = 16
RESOLUTION_V = 0.0001  # BMS_CellVoltages: 0.1 mV per bit


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as b:
        yield b


def expected_cycles(trace: Path, cells: int = CELLS) -> list[tuple[float, list[float | None]]]:
    """(ts, cell voltages) of every complete voltage cycle in a trace, decoded with cantools
    directly from the DBC — independently of the gateway's profile code. A cycle completes with
    the frame of the last block that holds one of the pack's cells."""
    db = cantools.database.load_file(str(DBC))
    msg = db.get_message_by_name("BMS_CellVoltages")
    last_block = (cells - 1) // 3
    cycles: list[tuple[float, list[float | None]]] = []
    current: list[float | None] = [None] * cells
    for frame in can.LogReader(trace):
        if frame.arbitration_id != msg.frame_id:
            continue
        values = msg.decode(bytes(frame.data))
        block = values["CellVoltageBlock"]
        if block == 0:
            current = [None] * cells
        for j in range(3):
            i = block * 3 + j
            if i < cells and not (values["CellVoltageInvalid"] >> j) & 1:
                current[i] = values[f"CellVoltage{j}"]
        if block == last_block:
            cycles.append((frame.timestamp, list(current)))
    return cycles


def telemetry(sub: Subscriber, serial: str) -> list[dict[str, Any]]:
    """Telemetry records of one serial in arrival order."""
    out = []
    for topic, envelope in sub.envelopes():
        if topic == f"bms/{serial}/telemetry":
            out.extend(envelope["records"])
    return out


def assert_seq_strictly_increasing(records: list[dict[str, Any]]) -> None:
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(set(seqs)), "seq must be strictly increasing in arrival order"


def assert_voltages_match(record: dict[str, Any], expected: list[float | None]) -> None:
    got = record["cell_voltages_v"]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert g is None
        else:
            assert g == pytest.approx(e, abs=RESOLUTION_V / 2 + 1e-9)


def test_slcan_pty_live_end_to_end(tmp_path: Path, broker: Broker) -> None:
    """The simulator plays an SLCAN adapter on a pseudo-terminal; the daemon reads it through
    python-can's slcan interface (pyserial), exactly as it would read a USB adapter."""
    serial, seed, seconds = "E2E-SLCAN-01", 11, 40
    # the same seed gives the same frames byte for byte: this trace is what the live run sends
    reference = tmp_path / "reference.log"
    simulate(["--scenario", "nominal", "--seconds", str(seconds), "--cells", str(CELLS),
              "--seed", str(seed), "--serial", serial, "--out", str(reference)])
    cycles = [v for _, v in expected_cycles(reference)]

    sim = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", "--scenario", "nominal", "--seconds", str(seconds),
         "--cells", str(CELLS), "--seed", str(seed), "--serial", serial, "--slcan-pty"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=child_env())
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline()
        match = re.match(r"SLCAN (\S+)", line)
        assert match, f"simulator said {line!r}; stderr: {sim.stderr.read() if sim.poll() else ''}"
        pty = match.group(1)
        config = gateway_config(tmp_path, broker_port=broker.port, source={
            "kind": "bus", "interface": "slcan", "channel": pty})
        with Subscriber(broker.host, broker.port) as sub, \
                Daemon(config, tmp_path / "daemon.log") as daemon:
            started = time.time()
            sub.wait_until(lambda: len(telemetry_unlocked(sub, serial)) >= 30, 90,
                           "30 telemetry records over SLCAN")
            records = telemetry(sub, serial)
            assert daemon.terminate(timeout=10) == 0
        assert_seq_strictly_increasing(records)
        # measurement time: the receive time of the frame that completed the cycle
        stamps = [r["ts"] for r in records]
        assert stamps == sorted(stamps)
        assert format_ts(started - 5) <= stamps[0] and stamps[-1] <= format_ts(time.time())
        # the cycles the daemon saw are consecutive cycles of what the simulator sent
        first = next(i for i, c in enumerate(cycles) if _same(c, records[0]["cell_voltages_v"]))
        for k, record in enumerate(records):
            assert_voltages_match(record, cycles[first + k])
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)


def telemetry_unlocked(sub: Subscriber, serial: str) -> list[dict[str, Any]]:
    # called inside wait_until's predicate, with the subscriber's lock held
    return [r for m in sub.messages if m.envelope is not None
            and m.topic == f"bms/{serial}/telemetry" for r in m.envelope["records"]]


def _same(expected: list[float | None], got: list[float | None]) -> bool:
    return all((e is None and g is None) or (e is not None and g is not None
               and abs(e - g) <= RESOLUTION_V / 2 + 1e-9) for e, g in zip(expected, got,
                                                                         strict=True))


def test_candump_replay_end_to_end(tmp_path: Path, broker: Broker) -> None:
    """A candump trace the simulator wrote, replayed as fast as possible and published: every
    complete cycle arrives once, with the trace's own time and the exact cell voltages."""
    serial = "E2E-REPLAY-01"
    trace = tmp_path / "sim.log"
    simulate(["--scenario", "pulses", "--seconds", "30", "--cells", str(CELLS), "--seed", "5",
              "--serial", serial, "--out", str(trace), "--start-time", "1767225600"])
    cycles = expected_cycles(trace)
    config = gateway_config(tmp_path, broker_port=broker.port, source={"kind": "bus"})
    with Subscriber(broker.host, broker.port) as sub:
        daemon = Daemon(config, tmp_path / "replay.log",
                        args=["replay", "-c", str(config), "--fast", str(trace)])
        with daemon:
            assert daemon.wait(180) == 0, daemon.tail()
        records = telemetry(sub, serial)
        # samples wait for the serial and the cell count (1 s messages): the first cycles go
        sub.wait_until(lambda: len(telemetry_unlocked(sub, serial)) >= len(cycles) - 12, 30,
                       "the replayed telemetry")
        records = telemetry(sub, serial)
    assert_seq_strictly_increasing(records)
    by_ts = {format_ts(ts): v for ts, v in cycles}
    assert len(records) >= len(cycles) - 12
    for record in records:
        assert record["ts"] in by_ts, "ts must be the trace time of the completing frame"
        assert_voltages_match(record, by_ts[record["ts"]])
    assert records[-1]["ts"] == format_ts(cycles[-1][0])


def test_replay_out_writes_envelopes_as_json_lines(tmp_path: Path) -> None:
    serial = "E2E-OUT-01"
    trace = tmp_path / "sim.asc"
    simulate(["--scenario", "nominal", "--seconds", "15", "--cells", str(CELLS), "--seed", "2",
              "--serial", serial, "--out", str(trace)])
    cycles = expected_cycles(trace)
    out = tmp_path / "records.jsonl"
    config = gateway_config(tmp_path, broker_port=1, source={"kind": "bus"})
    done = subprocess.run([sys.executable, "-m", "gateway", "replay", "-c", str(config), "--fast",
                           "--out", str(out), str(trace)], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env=child_env())
    assert done.returncode == 0, done.stderr[-4000:]
    envelopes = [json.loads(line) for line in out.read_text().splitlines()]
    assert {e["schema"] for e in envelopes} and all(e["gateway_id"] == "gw-test"
                                                    for e in envelopes)
    records = [r for e in envelopes if e["kind"] == "telemetry" for r in e["records"]]
    assert_seq_strictly_increasing(records)
    by_ts = {format_ts(ts): v for ts, v in cycles}
    assert len(records) >= len(cycles) - 12
    for record in records:
        assert_voltages_match(record, by_ts[record["ts"]])
    # the store of the configuration was not touched: --out keeps nothing
    assert not (tmp_path / "store.sqlite").exists()


def test_foxbms_real_trace_end_to_end(tmp_path: Path, broker: Broker, realworld: Path) -> None:
    """The real foxBMS 2 trace through the foxBMS profile, with foxBMS's own DBC."""
    trace = realworld / "foxbms" / "can-log.trc"
    db = cantools.database.load_file(str(realworld / "foxbms" / "foxbms.dbc"))
    frames = list(can.LogReader(trace))
    volt = next(f for f in frames if f.arbitration_id == 0x250)
    decoded = db.decode_message(0x250, bytes(volt.data), decode_choices=False)
    mux = decoded["f_CellVoltages_Mux"]
    expected = {mux * 4 + j: decoded[f"CellVoltage_{mux * 4 + j:03d}"] / 1000 for j in range(4)}
    config = gateway_config(tmp_path, broker_port=broker.port, source={"kind": "bus"},
                            profile={"path": str(PROFILES / "foxbms2.toml"),
                                     "dbc": str(realworld / "foxbms" / "foxbms.dbc"),
                                     "serial": "FOXBMS-TRACE-1"})
    with Subscriber(broker.host, broker.port) as sub:
        daemon = Daemon(config, tmp_path / "fox.log",
                        args=["replay", "-c", str(config), "--fast", str(trace)])
        with daemon:
            assert daemon.wait(180) == 0, daemon.tail()
        sub.wait_until(lambda: len(telemetry_unlocked(sub, "FOXBMS-TRACE-1")) >= 1, 20,
                       "foxBMS telemetry")
        records = telemetry(sub, "FOXBMS-TRACE-1")
    voltages = records[-1]["cell_voltages_v"]
    for i, v in expected.items():
        assert voltages[i] == pytest.approx(v, abs=0.0005)
    assert records[-1]["ts"] <= format_ts(frames[-1].timestamp)


def test_sigkill_then_restart_delivers_every_committed_record(tmp_path: Path) -> None:
    """Records committed while the broker is away survive a SIGKILL of the daemon and are
    delivered after the restart."""
    broker = Broker(tmp_path / "broker")  # not started yet: the port is free, nothing answers
    config = gateway_config(tmp_path, broker_port=broker.port, source={
        "kind": "simulator", "simulator": {"serial": "E2E-KILL-01", "cells": 8, "speed": 5.0}},
        edge={"telemetry_interval_s": 0.5})
    with Daemon(config, tmp_path / "first.log") as first:
        first.wait_ready()
        deadline = time.monotonic() + 60
        while status(config)["records_committed_total"] < 20:
            assert time.monotonic() < deadline, first.tail()
            time.sleep(0.3)
        first.kill()
    with sqlite3.connect(tmp_path / "store.sqlite") as db:
        committed = {seq for (seq,) in db.execute("SELECT seq FROM records")}
    assert len(committed) >= 20
    with broker, Subscriber(broker.host, broker.port) as sub, \
            Daemon(config, tmp_path / "second.log") as second:
        sub.wait_until(lambda: committed <= {s for _, s in sub.deliveries}, 60,
                       "every record committed before the kill")
        assert second.terminate() == 0
    after = status(config)
    assert after["records_committed_total"] >= len(committed)
    assert not math.isnan(after["records_acked_total"])
    assert os.path.exists(tmp_path / "store.sqlite")
