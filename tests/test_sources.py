"""Sources: the bounded queue, a live python-can bus, and trace replay of real files."""

from __future__ import annotations

import gzip
import threading
import time
import uuid
from pathlib import Path

import can
import pytest

from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.model import Frame
from gateway.sources.base import FrameQueue
from gateway.sources.bus import BusSource
from gateway.sources.replay import ReplaySource, check_trace


def _frames(n: int, start: int = 0) -> list[Frame]:
    return [Frame(ts=float(i), can_id=0x100, data=i.to_bytes(4, "little"))
            for i in range(start, start + n)]


def test_full_queue_drops_the_oldest_and_counts() -> None:
    metrics = Metrics()
    q = FrameQueue(100, metrics)
    q.put_many(_frames(150), block=False, stop=threading.Event())
    batch = q.get_batch(1000, 0.01)
    assert [f.ts for f in batch] == [float(i) for i in range(50, 150)]
    assert metrics.get("frames_dropped_total", "queue_full") == 50


def test_blocking_queue_waits_and_loses_nothing() -> None:
    metrics = Metrics()
    q = FrameQueue(100, metrics)
    stop = threading.Event()
    producer = threading.Thread(target=q.put_many, args=(_frames(1000),),
                                kwargs={"block": True, "stop": stop})
    producer.start()
    got: list[Frame] = []
    deadline = time.monotonic() + 10
    while len(got) < 1000 and time.monotonic() < deadline:
        got.extend(q.get_batch(64, 0.05))
    producer.join(5)
    assert [f.ts for f in got] == [float(i) for i in range(1000)]
    assert metrics.get("frames_dropped_total") == 0


def _run_source(source: BusSource | ReplaySource, q: FrameQueue, *, until_frames: int,
                timeout: float = 20.0) -> list[Frame]:
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,))
    thread.start()
    got: list[Frame] = []
    deadline = time.monotonic() + timeout
    while len(got) < until_frames and time.monotonic() < deadline and not q.closed_and_empty:
        got.extend(q.get_batch(4096, 0.05))
    stop.set()
    thread.join(10)
    got.extend(q.get_batch(1 << 20, 0))
    assert not thread.is_alive()
    return got


def test_bus_source_receives_from_a_virtual_bus() -> None:
    channel = f"test-{uuid.uuid4().hex}"
    metrics = Metrics()
    q = FrameQueue(10_000, metrics)
    source = BusSource(q, metrics, interface="virtual", channel=channel)
    sender = can.Bus(interface="virtual", channel=channel)
    started = threading.Event()

    def send() -> None:
        started.wait(5)
        time.sleep(0.2)
        for i in range(500):
            sender.send(can.Message(arbitration_id=0x500 + (i % 3), data=bytes([i % 256] * 8),
                                    is_extended_id=False))

    threading.Thread(target=send).start()
    started.set()
    got = _run_source(source, q, until_frames=500)
    sender.shutdown()
    assert len(got) == 500
    assert [f.data[0] for f in got] == [i % 256 for i in range(500)]
    assert metrics.get("frames_rx_total") == 500


def test_bus_source_names_a_bad_interface() -> None:
    source = BusSource(FrameQueue(10, Metrics()), Metrics(), interface="no-such-interface",
                       channel="x")
    with pytest.raises(OSError, match="no-such-interface"):
        source.open_bus()


@pytest.mark.parametrize("name", ["logfile.asc", "test_CanMessage.asc.gz", "test_CanMessage.blf",
                                  "test_CanFdMessage.blf", "test_CanMessage.trc",
                                  "test_CanMessage_V1_0_BUS1.trc"])
def test_replay_reads_python_can_format_samples(realworld: Path, name: str) -> None:
    path = realworld / "python-can-formats" / name
    expected = list(can.LogReader(path))
    metrics = Metrics()
    q = FrameQueue(100_000, metrics)
    got = _run_source(ReplaySource(q, metrics, files=[path], speed=0.0), q,
                      until_frames=len(expected))
    assert len(got) == len(expected) > 0
    assert [f.ts for f in got] == [m.timestamp for m in expected]  # trace time is kept
    assert [f.can_id for f in got] == [m.arbitration_id for m in expected]
    assert [f.data for f in got] == [bytes(m.data) for m in expected]


def test_replay_of_the_foxbms_trace_keeps_trace_time(realworld: Path) -> None:
    path = realworld / "foxbms" / "can-log.trc"
    metrics = Metrics()
    q = FrameQueue(1000, metrics)
    got = _run_source(ReplaySource(q, metrics, files=[path], speed=0.0), q, until_frames=9)
    assert len(got) == 9
    assert [hex(f.can_id) for f in got][:3] == ["0x243", "0x241", "0x220"]
    assert got[1].ts - got[0].ts == pytest.approx(0.009, abs=1e-6)


def test_real_time_pacing_follows_trace_time(tmp_path: Path) -> None:
    path = tmp_path / "paced.log"
    path.write_text("".join(f"({1000 + i * 0.1:.6f}) vcan0 123#{i:02X}\n" for i in range(6)))
    metrics = Metrics()
    q = FrameQueue(1000, metrics)
    started = time.monotonic()
    got = _run_source(ReplaySource(q, metrics, files=[path], speed=1.0), q, until_frames=6)
    assert len(got) == 6
    assert time.monotonic() - started >= 0.45


def test_empty_trace_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.log"
    path.write_text("")
    q = FrameQueue(10, Metrics())
    source = ReplaySource(q, Metrics(), files=[path], speed=0.0)
    with pytest.raises(ConfigError, match="holds no CAN frame") as info:
        source.run(threading.Event())
    assert str(path) in str(info.value)


def test_unknown_trace_format_and_missing_file(tmp_path: Path) -> None:
    odd = tmp_path / "trace.xyz"
    odd.write_text("x")
    with pytest.raises(ConfigError, match="unknown trace format"):
        check_trace(odd)
    with pytest.raises(ConfigError, match="not found"):
        check_trace(tmp_path / "missing.log")
    gz = tmp_path / "t.log.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write("(1.0) vcan0 123#00\n")
    check_trace(gz)
