"""Real kernel SocketCAN on vcan0: the simulator → ``bms-gateway run`` → mosquitto → a subscriber.

Marked ``vcan``: tests/vm/plugin.py runs them directly where the kernel has SocketCAN (as root),
and inside a small QEMU VM otherwise. Starting Python there (software emulation) takes seconds
per process, so one gateway daemon, broker and subscriber serve the whole module, and each test
reads the daemon's counters before and after what it does. Nothing else sends on vcan0 meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import can
import cantools
import pytest
from can.interfaces.socketcan import SocketcanBus

from gateway.cli import status_summary
from gateway.config import load_config
from gateway.decode.profile import load_profile
from tests.support.broker import Broker
from tests.support.daemon import PROFILES, REPO, Daemon, child_env, gateway_config
from tests.support.subscriber import Subscriber
from tests.vm.plugin import CHANNEL, in_test_vm

pytestmark = pytest.mark.vcan

SERIAL = "VCAN-0042"
CELLS = 12
GATEWAY_ID = "gw-vcan"
DBC = REPO / "dbc" / "bms_reference.dbc"
#: the profile tests/support/daemon.py configures
REFERENCE_PROFILE = PROFILES / "reference.toml"
#: the reference profile's node id bits: node n adds n to every frame id
NODE_BITS = 0x00F
#: a shipped scenario that opens with 120 s at rest: cell voltages barely move, so a record can
#: be compared with the simulator's ground truth at about the same instant
AT_REST = "pulses"
#: error class bit of a bus-off error frame (linux/can/error.h)
CAN_ERR_BUSOFF = 0x00000040
#: the daemon's status document is rewritten every 0.5 s (tests/support/daemon.py)
STATUS_SETTLE_S = 1.5

# -- the rig: broker, subscriber, daemon reading vcan0 -----------------------------------------


def ip(*args: str) -> None:
    tool = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    assert tool is not None, "iproute2's ip is needed"
    subprocess.run([tool, *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True, slots=True)
class Rig:
    config: Path
    daemon: Daemon
    subscriber: Subscriber

    def counters(self) -> dict[str, Any]:
        return status_summary(load_config(self.config))

    def idle_counters(self, timeout: float = 30.0) -> dict[str, Any]:
        """The counters once frames_rx_total has stopped moving (the bus is quiet)."""
        deadline = time.monotonic() + timeout
        last = self.counters()
        while time.monotonic() < deadline:
            time.sleep(STATUS_SETTLE_S)
            now = self.counters()
            if now["frames_rx_total"] == last["frames_rx_total"]:
                return now
            last = now
        raise AssertionError(f"the daemon kept receiving frames for {timeout} s")

    def wait_counters(self, predicate: Callable[[dict[str, Any]], bool], what: str,
                      timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.counters()
            if predicate(now):
                return now
            self.assert_alive()
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}: {self.counters()}")

    def assert_alive(self) -> None:
        assert self.daemon.proc is not None
        assert self.daemon.proc.poll() is None, \
            f"the daemon exited with {self.daemon.proc.returncode}:\n{self.daemon.tail()}"

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.daemon.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == name:
                    found.append(entry)
        return found

    def telemetry(self) -> list[dict[str, Any]]:
        """Telemetry records of the simulated pack, as the independent subscriber got them."""
        return [record for topic, envelope in self.subscriber.envelopes()
                if topic == f"bms/{SERIAL}/telemetry" and envelope.get("serial") == SERIAL
                for record in envelope["records"]]


def delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return int(after.get(key, 0)) - int(before.get(key, 0))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    folder = tmp_path_factory.mktemp("vcan")
    with Broker(folder / "broker") as broker, \
            Subscriber(broker.host, broker.port, topic="bms/#") as subscriber:
        config = gateway_config(folder, broker_port=broker.port, gateway_id=GATEWAY_ID, source={
            "kind": "bus", "interface": "socketcan", "channel": CHANNEL,
            "receive_filters": "dbc", "reopen_backoff_s": 0.2, "queue_frames": 1000})
        with Daemon(config, folder / "daemon.log") as daemon:
            daemon.wait_ready(timeout=180)
            yield Rig(config, daemon, subscriber)
            code = daemon.terminate(timeout=30)
            assert code == 0, f"the daemon stopped with {code}:\n{daemon.tail()}"


@pytest.fixture
def link_up_after() -> Iterator[None]:
    """Whatever a test does to vcan0 (down, deleted), it is there and up again afterwards."""
    yield
    if not Path("/sys/class/net", CHANNEL).exists():
        ip("link", "add", "dev", CHANNEL, "type", "vcan")
    ip("link", "set", "dev", CHANNEL, "up")


class Simulation:
    """``python -m firmware_sim`` playing the pack live on vcan0, in the background."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "firmware_sim", "--interface", "socketcan",
                 "--channel", CHANNEL, "--serial", SERIAL, "--cells", str(CELLS), *args],
                cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT)

    def finish(self, timeout: float = 240.0) -> str:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise
        output = self.log.read_text(errors="replace")
        assert code == 0, f"the simulator exited with {code}:\n{output}"
        return output

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


class Listener:
    """An independent reader of vcan0 (no filters, error frames on), counting what it sees
    until the link goes away under it."""

    def __init__(self) -> None:
        self.bus = can.Bus(interface="socketcan", channel=CHANNEL)
        self.frames: list[can.Message] = []
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                msg = self.bus.recv(timeout=0.1)
            except can.CanError:
                return
            if msg is not None:
                self.frames.append(msg)

    def count(self, predicate: Callable[[can.Message], bool]) -> int:
        return sum(1 for msg in list(self.frames) if predicate(msg))

    def wait_for(self, predicate: Callable[[can.Message], bool], timeout: float) -> can.Message:
        """The first frame seen that matches, waiting for it up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in list(self.frames):
                if predicate(msg):
                    return msg
            time.sleep(0.05)
        raise AssertionError(f"no such frame on {CHANNEL} within {timeout} s "
                             f"({len(self.frames)} frames seen)")

    def close(self) -> None:
        self.stopped.set()
        self._thread.join(5)
        self.bus.shutdown()


def dbc_ids() -> dict[str, int]:
    """Message name → frame id, straight from the DBC file."""
    database = cantools.database.load_file(str(DBC))
    assert isinstance(database, cantools.database.can.Database)
    return {message.name: message.frame_id for message in database.messages}


def iso_ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


# -- the tests ----------------------------------------------------------------------------------


def test_python_can_sends_and_receives_on_vcan0() -> None:
    with can.Bus(interface="socketcan", channel=CHANNEL) as rx, \
            can.Bus(interface="socketcan", channel=CHANNEL) as tx:
        tx.send(can.Message(arbitration_id=0x123, data=b"\x01\x02", is_extended_id=False))
        msg = rx.recv(timeout=5)
    assert msg is not None
    assert (msg.arbitration_id, bytes(msg.data), msg.channel) == (0x123, b"\x01\x02", CHANNEL)


def test_simulated_pack_reaches_an_independent_subscriber(rig: Rig, tmp_path: Path) -> None:
    truth_file = tmp_path / "truth.jsonl"
    before = rig.idle_counters()
    started = time.time()
    with Simulation(tmp_path / "sim.log", "--scenario", AT_REST, "--seconds", "8", "--seed", "7",
                    "--truth", str(truth_file), "--truth-interval", "0.5") as sim:
        sim.finish()
    finished = time.time()
    truth = [json.loads(line) for line in truth_file.read_text().splitlines()]
    # at rest the true cell voltages hold still (they differ from cell to cell by millivolts)
    true_volts = truth[0]["voltage_v"]
    assert len(true_volts) == CELLS
    assert all(line["voltage_v"] == pytest.approx(true_volts, abs=0.0005) for line in truth)

    def this_run() -> list[dict[str, Any]]:
        return [r for r in rig.telemetry() if started <= iso_ts(r["ts"]) <= finished]

    rig.subscriber.wait_until(lambda: any(iso_ts(r["ts"]) >= finished - 2.0 for r in this_run()),
                              60, "telemetry from the end of the simulation")
    after = rig.idle_counters()
    records = this_run()
    assert len(records) >= 8, records
    for record in records:
        # the BMS measures with 1 mV of noise and reports in 1 mV steps
        assert record["cell_voltages_v"] == pytest.approx(true_volts, abs=0.006), record
    assert delta(before, after, "frames_rx_total") > 0
    assert delta(before, after, "frames_rejected_total") == 0
    assert delta(before, after, "frames_dropped_total") == 0
    assert rig.subscriber.duplicates == 0


def test_kernel_filters_pass_only_the_profiles_dbc_ids(rig: Rig) -> None:
    """The daemon's socket gets only frames of the DBC messages its profile reads, from any node:
    the kernel drops the rest (other ids, extended ids, DBC messages the profile ignores)."""
    ids = dbc_ids()
    used = {ids[name] for name in {b.message for b in load_profile(REFERENCE_PROFILE).bindings}}
    unused = set(ids.values()) - used
    assert used and unused  # the reference profile leaves BMS_Balancing alone

    def remote(frame_id: int, extended: bool = False) -> can.Message:
        # remote frames: the decoder rejects them at once (counted), without touching any pack
        return can.Message(arbitration_id=frame_id, is_remote_frame=True, dlc=8,
                           is_extended_id=extended)

    wanted = [remote(frame_id + node) for frame_id in sorted(used) for node in (0, 3)]
    unwanted = [remote(frame_id + node) for frame_id in sorted(unused) for node in (0, 3)]
    # ids of no DBC message under any node, and a used id as an extended (29-bit) id
    foreign = [(0x123, False), (0x4FF, False), (0x570, False), (0x7FF, False),
               (min(used), True), (0x18FF50E5, True)]
    assert not any(not extended and (frame_id & ~NODE_BITS) in ids.values()
                   for frame_id, extended in foreign)
    unwanted += [can.Message(arbitration_id=frame_id, data=bytes(8), is_extended_id=extended)
                 for frame_id, extended in foreign for _ in range(10)]
    before = rig.idle_counters()
    listener = Listener()
    try:
        with can.Bus(interface="socketcan", channel=CHANNEL) as tx:
            for msg in unwanted + wanted:  # the unwanted first: read before the last wanted
                tx.send(msg, timeout=1)
        rig.wait_counters(lambda c: delta(before, c, "frames_rx_total") >= len(wanted),
                          f"{len(wanted)} frames of the profile's messages")
        time.sleep(STATUS_SETTLE_S)
        after = rig.counters()
    finally:
        listener.close()
    # every frame was on the bus: the listener without filters saw them all
    assert listener.count(lambda m: True) == len(unwanted) + len(wanted)
    # and the daemon's socket got exactly the wanted ones
    assert delta(before, after, "frames_rx_total") == len(wanted)
    assert delta(before, after, "frames_rejected_total{remote_frame}") == len(wanted)
    assert delta(before, after, "frames_rejected_total{unknown_id}") == 0


FAULTS = """
[scenario]
base = "pulses"
description = "the opening rest, with error frames, then the BMS bus-off for two seconds"

[[fault]]
kind = "error_frames"
start_s = 0.0
duration_s = 4.0
rate_hz = 5.0

[[fault]]
kind = "bus_off"
start_s = 4.0
duration_s = 2.0
"""


def test_error_frames_bus_off_and_link_down_are_counted_and_survived(
        rig: Rig, tmp_path: Path, link_up_after: None) -> None:
    scenario = tmp_path / "faults.toml"
    scenario.write_text(FAULTS)
    pid = rig.daemon.proc.pid if rig.daemon.proc else None
    before = rig.idle_counters()
    lost_before = len(rig.events("bus_lost"))
    recovered_before = len(rig.events("bus_recovered"))
    listener = Listener()
    try:
        with Simulation(tmp_path / "sim.log", "--scenario", str(scenario), "--seconds", "16",
                        "--seed", "3") as sim:
            # the BMS's error frames, its bus-off (one bus-off error frame, then silence), and
            # data frames again: every error frame it sends has been sent by then
            bus_off = listener.wait_for(
                lambda m: m.is_error_frame and bool(m.arbitration_id & CAN_ERR_BUSOFF), 120)
            listener.wait_for(
                lambda m: not m.is_error_frame and m.timestamp > bus_off.timestamp, 30)
            error_frames = listener.count(lambda m: m.is_error_frame)
            # now the interface itself goes away for two seconds (the listener stops with it)
            ip("link", "set", "dev", CHANNEL, "down")
            time.sleep(2.0)
            ip("link", "set", "dev", CHANNEL, "up")
            link_up = time.time()
            sim.finish()
    finally:
        listener.close()
    rig.subscriber.wait_until(lambda: any(iso_ts(r["ts"]) > link_up + 1 for r in rig.telemetry()),
                              60, "telemetry after the link came back")
    after = rig.idle_counters()
    assert error_frames >= 10
    assert delta(before, after, "frames_rejected_total{error_frame}") == error_frames
    assert delta(before, after, "source_errors_total") >= 1
    assert len(rig.events("bus_lost")) == lost_before + 1
    assert len(rig.events("bus_recovered")) == recovered_before + 1
    rig.assert_alive()
    assert rig.daemon.proc is not None and rig.daemon.proc.pid == pid
    assert after["daemon_running"] is True


def test_sender_faster_than_the_reader_drops_counted_frames_and_no_crash(rig: Rig) -> None:
    frame_id = dbc_ids()["BMS_PackStatus"]
    # remote frames of a profile's message pass the kernel filters and cost the decoder nothing
    frame = struct.pack("=IB3x8s", frame_id | socket.CAN_RTR_FLAG, 8, bytes(8))
    burst = 20_000
    before = rig.idle_counters()
    with SocketcanBus(channel=CHANNEL) as tx:
        sock = tx.socket
        for _ in range(burst):  # straight to the socket: far faster than any Python reader
            sock.send(frame)
    after = rig.idle_counters()
    received = delta(before, after, "frames_rx_total")
    overflowed = delta(before, after, "frames_dropped_total{socket_overflow}")
    assert overflowed > 0, f"no socket overflow counted; received {received} of {burst}"
    assert received + overflowed == burst
    # queue drops are among the received frames; every received frame is accounted for
    assert delta(before, after, "frames_rejected_total{remote_frame}") + delta(
        before, after, "frames_dropped_total{queue_full}") == received
    rig.assert_alive()
    # and it goes on reading
    with can.Bus(interface="socketcan", channel=CHANNEL) as tx:
        for _ in range(10):
            tx.send(can.Message(arbitration_id=frame_id, is_remote_frame=True, dlc=8,
                                is_extended_id=False))
    rig.wait_counters(lambda c: delta(after, c, "frames_rx_total") == 10, "10 more frames")


# -- systemd-networkd with the shipped files ----------------------------------------------------

NETWORKD = Path("/lib/systemd/systemd-networkd")
N_SLCAN = 17  # the kernel's SLCAN line discipline: a serial line becomes a "can" netdev


@pytest.fixture
def networkd_files(tmp_path: Path) -> Iterator[Path]:
    """The shipped .netdev/.network files where networkd reads runtime configuration."""
    if not in_test_vm():
        pytest.skip("starts its own systemd-networkd and replaces vcan0: only inside the test VM")
    if not NETWORKD.exists():
        pytest.fail(f"{NETWORKD} is missing (Debian package systemd)")
    runtime = Path("/run/systemd/network")
    runtime.mkdir(parents=True, exist_ok=True)
    for name in ("vcan0.netdev", "vcan0.network", "can0.network"):
        shutil.copy(REPO / "systemd" / name, runtime / name)
    yield runtime
    shutil.rmtree(runtime)


def link_details(name: str) -> dict[str, Any]:
    tool = shutil.which("ip") or "/usr/sbin/ip"
    out = subprocess.run([tool, "-d", "-j", "link", "show", "dev", name], capture_output=True,
                         text=True, timeout=30, check=True)
    details: dict[str, Any] = json.loads(out.stdout)[0]
    return details


def test_systemd_networkd_makes_vcan0_and_configures_can0(
        networkd_files: Path, tmp_path: Path, link_up_after: None) -> None:
    """vcan0.netdev and vcan0.network create and raise vcan0; can0.network sets the bit rate of a
    real CAN netdev: the kernel's SLCAN driver on a pseudo-terminal, which names it can0. SLCAN
    has no bus-off restart, so the kernel refuses RestartSec= there (networkd then marks the
    link failed); that networkd asked for it is what shows the key is read."""
    ip("link", "del", "dev", CHANNEL)
    master, slave = os.openpty()
    tty.setraw(slave)
    log = tmp_path / "networkd.log"
    try:
        fcntl.ioctl(slave, termios.TIOCSETD, struct.pack("i", N_SLCAN))
        assert link_details("can0")["linkinfo"]["info_kind"] == "can"
        env = {**os.environ, "SYSTEMD_LOG_LEVEL": "debug"}
        # networkd waits for udev unless /sys is read-only (its sign of a container), so it
        # gets a private mount namespace with /sys read-only; it runs as root here
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f"mount --bind /sys /sys && mount -o remount,bind,ro /sys && exec {NETWORKD}"],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = log.read_text(errors="replace")
                if "vcan0: State changed: configuring -> configured" in text \
                        and "can0: Setting restart" in text:
                    break
                assert proc.poll() is None, text[-4000:]
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(30)
        can0 = link_details("can0")
    finally:
        os.close(slave)  # the line discipline, and can0 with it, goes away
        os.close(master)
    text = log.read_text(errors="replace")
    vcan0 = link_details(CHANNEL)
    assert vcan0["linkinfo"]["info_kind"] == "vcan" and "UP" in vcan0["flags"], text[-4000:]
    for name in ("vcan0.netdev", "vcan0.network", "can0.network"):
        assert f"{name}:" not in text, f"networkd complained about {name}:\n{text}"
    assert "can0: Setting bitrate = 500000 bit/s" in text, text[-4000:]
    # a driver with fixed bit rates (SLCAN's) reports the rate alone, as bittiming_bitrate
    assert can0["linkinfo"]["info_data"]["bittiming_bitrate"] == 500_000, can0
    assert "can0: Setting restart = 100ms" in text, text[-4000:]
