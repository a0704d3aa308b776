"""Fault matrix: garbage on the bus. 100,000 frames, most of them random (11- and 29-bit ids,
known ids with random or truncated payloads, DLC 0–15 with CAN FD lengths, error frames
including bus-off, remote frames) among a real pack's frames. Nothing crashes, records still
come from the real pack, and every frame sent is counted exactly once: decoded, ignored or
rejected by reason.

Once in-process through the real decoder, assembler, edge core and pipeline; once through the
daemon as a child process, from a candump trace, counted by ``bms-gateway status``.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

import can
import cantools

from firmware_sim import Simulator
from gateway.config import EdgeSection
from gateway.decode.assembler import PackAssembler
from gateway.decode.profile import load_profile
from gateway.edge.core import EdgeCore
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.sources.base import FrameQueue, frame_from_message
from gateway.store.memory import MemoryStore
from tests.support.broker import Broker
from tests.support.daemon import PROFILES, REPO, child_env, gateway_config, status
from tests.support.subscriber import Subscriber

SENT = 100_000
#: frames of the real pack among them
PACK_FRAMES = 20_000
SERIAL = "GARBAGE-01"
#: payload lengths of CAN FD DLC codes 9 to 15
FD_LENGTHS = (12, 16, 20, 24, 32, 48, 64)
#: error classes in the id of a SocketCAN error frame (bus-off among them)
ERROR_CLASSES = (0x02, 0x04, 0x08, 0x10, 0x40, 0x80)
CAN_ERR_FLAG = 0x20000000


def garbage_frames(seed: int = 7) -> list[can.Message]:
    """SENT frames in time order: a real pack's frames with random garbage in between."""
    rng = random.Random(seed)
    sim = Simulator.from_scenario("nominal", cells=16, serial=SERIAL, seed=seed)
    pack = list(sim.messages(PACK_FRAMES / 78 + 10.0, channel="can0"))[:PACK_FRAMES]
    assert len(pack) == PACK_FRAMES
    db = cantools.database.load_file(str(REPO / "dbc" / "bms_reference.dbc"))
    known = [(m.frame_id, m.is_extended_frame, m.length) for m in db.messages]
    stamps = [m.timestamp for m in pack]

    def payload(n: int) -> bytes:
        return rng.randbytes(n)

    out = list(pack)
    for _ in range(SENT - PACK_FRAMES):
        ts = rng.uniform(stamps[0], stamps[-1])
        roll = rng.random()
        if roll < 0.25:  # any 11-bit id
            message = can.Message(arbitration_id=rng.randrange(0x800), is_extended_id=False,
                                  data=payload(rng.randint(0, 8)))
        elif roll < 0.40:  # any 29-bit id
            message = can.Message(arbitration_id=rng.randrange(1 << 29), is_extended_id=True,
                                  data=payload(rng.randint(0, 8)))
        elif roll < 0.70:  # a known id of any node: random, truncated or overlong payloads
            frame_id, extended, length = rng.choice(known)
            message = can.Message(arbitration_id=frame_id + rng.randrange(16),
                                  is_extended_id=extended,
                                  data=payload(rng.choice((0, 1, length - 1, length, 8))))
        elif roll < 0.85:  # CAN FD, DLC 9 to 15, a known or random id
            frame_id, extended, _ = rng.choice(known)
            message = can.Message(arbitration_id=rng.choice((frame_id, rng.randrange(0x800))),
                                  is_extended_id=extended, is_fd=True,
                                  bitrate_switch=rng.random() < 0.5,
                                  data=payload(rng.choice(FD_LENGTHS)))
        elif roll < 0.93:  # error frames, bus-off among them
            message = can.Message(arbitration_id=CAN_ERR_FLAG | rng.choice(ERROR_CLASSES),
                                  is_error_frame=True, data=payload(8))
        else:  # remote frames
            frame_id, extended, length = rng.choice(known)
            message = can.Message(arbitration_id=frame_id, is_extended_id=extended,
                                  is_remote_frame=True, dlc=length)
        message.timestamp = ts
        message.channel = "can0"
        out.append(message)
    out.sort(key=lambda message: message.timestamp)  # stable: the pack's own order is kept
    return out


def test_random_frames_in_process_every_frame_counted(tmp_path: Path) -> None:
    messages = garbage_frames()
    metrics = Metrics()
    profile = load_profile(PROFILES / "reference.toml")
    edge_settings = EdgeSection(telemetry_interval_s=0.0)
    edge = EdgeCore(edge_settings, metrics)
    edge.warm_up()
    store = MemoryStore(metrics=metrics)
    queue = FrameQueue(SENT, metrics)
    pipeline = Pipeline(queue, PackAssembler(profile, metrics, limits=edge_settings), edge,
                        store, metrics)
    queue.put_many((frame_from_message(m) for m in messages), block=True,
                   stop=threading.Event())
    queue.close()
    pipeline.run(threading.Event())  # returns at the end of the input; raises on a crash
    decoded = metrics.get("frames_decoded_total")
    ignored = metrics.get("frames_ignored_total")
    rejected = metrics.get("frames_rejected_total")
    reasons = metrics.snapshot()["counters"]["frames_rejected_total"]
    print(f"\n{SENT} frames in-process: decoded={decoded} ignored={ignored} "
          f"rejected={rejected} {dict(sorted(reasons.items()))}; "
          f"records={store.stats().committed_total}")
    assert decoded + ignored + rejected == SENT
    assert {"unknown_id", "malformed", "error_frame", "remote_frame"} <= set(reasons)
    assert decoded >= PACK_FRAMES  # the real pack's frames, and garbage that happens to fit
    assert store.stats().committed_by_kind.get("telemetry", 0) > 100
    assert pipeline.packs and SERIAL in pipeline.packs


def test_random_frames_through_the_daemon_every_frame_counted(tmp_path: Path) -> None:
    trace = tmp_path / "garbage.log"
    with can.Logger(str(trace)) as writer:
        for message in garbage_frames():
            writer.on_message_received(message)
    with can.LogReader(str(trace)) as reader:
        reread = list(reader)
    assert len(reread) == SENT
    assert any(m.is_fd and len(m.data) == 64 for m in reread)
    assert any(m.is_error_frame for m in reread) and any(m.is_remote_frame for m in reread)
    with Broker(tmp_path / "broker") as broker, Subscriber(broker.host, broker.port) as sub:
        config = gateway_config(tmp_path, broker_port=broker.port, source={"kind": "bus"},
                                edge={"telemetry_interval_s": 0.0})
        done = subprocess.run([sys.executable, "-m", "gateway", "replay", "-c", str(config),
                               "--fast", str(trace)], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=child_env())
        assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
        assert "stage_crashed" not in done.stdout + done.stderr
        counts = status(config)
        sub.wait_for_records(counts["records_committed_total"], timeout=30)
    decoded = counts.get("frames_decoded_total", 0)
    ignored = counts.get("frames_ignored_total", 0)
    rejected = counts["frames_rejected_total"]
    reasons = {key: value for key, value in counts.items()
               if key.startswith("frames_rejected_total{")}
    print(f"\n{SENT} frames through the daemon: rx={counts['frames_rx_total']} "
          f"decoded={decoded} ignored={ignored} rejected={rejected} {reasons}; "
          f"records committed={counts['records_committed_total']} "
          f"delivered={sub.received}")
    assert counts["frames_rx_total"] == SENT
    assert decoded + ignored + rejected == SENT
    assert counts["records_committed_total"] > 100
    assert counts["store_records"] == 0
