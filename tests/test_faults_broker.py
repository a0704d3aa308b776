"""Fault matrix, broker side: the daemon as a child process, a real Mosquitto, a real SQLite store.

The load is a fleet of 16 simulated packs of 32 cells on one bus, about 2,100 frames/s,
replayed from a candump trace at real-time pacing. Each test prints TESTING.md's accounting;
``lost`` must be 0: every committed record reaches the independent subscriber, is still stored,
or was dropped by a counted policy. Mosquitto acknowledges a publish before its copy to the
subscriber is safe, so a broker is only ever killed once the subscriber holds everything the
broker acknowledged (``kill_broker_when_caught_up``): a loss can only be the gateway's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker
from tests.support.daemon import REPO, Daemon, child_env, gateway_config, status
from tests.support.faults import (
    account,
    kill_broker_when_caught_up,
    log_events,
    log_time,
    read_store,
    write_fleet_traces,
)
from tests.support.subscriber import Subscriber

GATEWAY = "gw-faults"
PACKS = 16
INFLIGHT, BATCH = 16, 100
#: the most records one outage may duplicate: every message of a full window re-sent
WINDOW_RECORDS = INFLIGHT * BATCH
RECONNECT_MAX_S = 1.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 s of the fleet: longer than any run here, so the replay never ends on its own."""
    return write_fleet_traces(tmp_path_factory.mktemp("fleet"), packs=PACKS, cells=32,
                              seconds=90.0)[0]


def fleet_config(tmp: Path, port: int, trace: Path, **mqtt: Any) -> Path:
    return gateway_config(
        tmp, broker_port=port, gateway_id=GATEWAY,
        source={"kind": "replay", "files": [str(trace)], "replay_speed": 1.0},
        edge={"telemetry_interval_s": 0.0, "health_interval_s": 2.0},
        mqtt={"inflight": INFLIGHT, "batch_max_records": BATCH,
              "reconnect_max_s": RECONNECT_MAX_S, **mqtt})


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


def received_seqs(sub: Subscriber) -> set[int]:
    return {seq for gateway, seq in sub.deliveries if gateway == GATEWAY}


def check_nothing_lost(config: Path, store: Path, sub: Subscriber) -> str:
    """After the daemon stopped: every seq it committed reached the subscriber or is still in
    its store (these tests drop nothing by policy). Returns the accounting line."""
    counts = status(config)
    accounting = account(counts, sub.received, sub.duplicates)
    view = read_store(store)
    assert accounting.committed == view.last_seq > 0
    assert accounting.dropped == accounting.dead_lettered == 0, accounting
    assert accounting.lost == 0, accounting
    missing = set(range(1, view.last_seq + 1)) - received_seqs(sub) - view.stored
    assert not missing, f"{len(missing)} committed records lost, first {sorted(missing)[:20]}"
    return str(accounting)


def test_broker_killed_five_times_in_a_minute_at_2000_frames_per_second(
        tmp_path: Path, fleet: Path) -> None:
    """Five SIGKILLs of the broker, 1 to 10 s each, during a 60 s run: nothing lost, each
    reconnect within the backoff + 2 s, duplicates within the in-flight window per outage,
    each transition logged once."""
    outages_s = (1.0, 10.0, 3.0, 6.0, 2.0)
    up_s, run_s = 5.0, 60.0
    broker = Broker(tmp_path / "broker", persistence=True)
    config = fleet_config(tmp_path, broker.port, fleet)
    store, log = tmp_path / "store.sqlite", tmp_path / "daemon.log"
    reconnect_s: list[float] = []
    with broker, Subscriber(broker.host, broker.port) as sub:
        # the subscriber's session must survive each SIGKILL: a killed broker writes nothing
        broker.save_persistence()
        with Daemon(config, log) as daemon:
            daemon.wait_ready()
            started = time.monotonic()
            wait_until(lambda: store.exists() and read_store(store).acked > 0, 30,
                       "the first acknowledged records", daemon)
            for k, outage in enumerate(outages_s):
                time.sleep(up_s)
                kill_broker_when_caught_up(broker, sub, store, GATEWAY)
                time.sleep(outage)
                restarted = time.time()  # the daemon may be back before start() returns
                broker.start()
                wait_until(lambda k=k: len(log_events(log, "broker_recovered")) > k,
                           RECONNECT_MAX_S + 10, "broker_recovered", daemon)
                reconnect_s.append(log_time(log_events(log, "broker_recovered")[k])
                                   - restarted)
                sub.wait_until(lambda k=k: sub.subscribes == k + 2, 10,
                               "the subscriber to be back")
            # the backlog of the last outage drains while the fleet keeps sending
            wait_until(lambda: len(read_store(store).stored) < 500, 30, "a drained backlog",
                       daemon)
            time.sleep(max(0.0, run_s - (time.monotonic() - started)))
            ran_s = time.monotonic() - started
            stopping = time.monotonic()
            assert daemon.terminate(timeout=10) == 0, daemon.tail()
            stop_s = time.monotonic() - stopping
    counts = status(config)
    accounting = check_nothing_lost(config, store, sub)
    print(f"\nbroker killed x{len(outages_s)} {list(outages_s)} s: {accounting}; "
          f"frames/s={counts['frames_rx_total'] / ran_s:.0f} over {ran_s:.0f} s; "
          f"reconnect_s={[round(s, 2) for s in reconnect_s]}; stopped in {stop_s:.1f} s")
    assert sub.duplicates <= len(outages_s) * WINDOW_RECORDS
    assert all(0 <= s <= RECONNECT_MAX_S + 2 for s in reconnect_s), reconnect_s
    # transitions, not records, are logged (repeats of the same warning within a minute are
    # held back by the log's repeat limiter; the counter is exact)
    assert counts["broker_disconnects_total"] == len(outages_s)
    assert 1 <= len(log_events(log, "broker_lost")) <= len(outages_s)
    assert len(log_events(log, "broker_recovered")) == len(outages_s)
    assert len(log_events(log, "broker_connect_failed")) <= 2 * len(outages_s)


def test_broker_restarted_with_its_persistence_wiped_loses_nothing(tmp_path: Path,
                                                                   fleet: Path) -> None:
    """The broker comes back with nothing: no sessions, no retained messages, none of the
    messages it had taken. The gateway trusts only its store, so nothing is lost, and its
    retained status is ``online`` again."""
    broker = Broker(tmp_path / "broker", persistence=True, gateway_listener=True)
    config = fleet_config(tmp_path, broker.gateway_port, fleet)
    store, log = tmp_path / "store.sqlite", tmp_path / "daemon.log"
    status_topic = f"bms/gateway/{GATEWAY}/status"
    with broker, Subscriber(broker.host, broker.port) as sub, Daemon(config, log) as daemon:
        daemon.wait_ready()
        wait_until(lambda: store.exists() and read_store(store).acked > 500, 30,
                   "records flowing", daemon)
        at_kill = kill_broker_when_caught_up(broker, sub, store, GATEWAY)
        broker.wipe_persistence()
        # Up for the subscriber alone, so it has a session (a wiped broker has none) before
        # the gateway can publish again; a clean restart keeps that session.
        broker.start(gateway=False)
        sub.wait_until(lambda: sub.subscribes == 2, 10, "the subscriber's new session")
        broker.restart()
        sub.wait_until(lambda: sub.subscribes == 3, 10, "the subscriber to be back")
        wait_until(lambda: len(log_events(log, "broker_recovered")) == 1, 20,
                   "broker_recovered", daemon)
        wait_until(lambda: read_store(store).acked > at_kill.acked + 2000, 30,
                   "the backlog to drain", daemon)
        with Subscriber(broker.host, broker.port, topic=status_topic) as late:
            late.wait_for_status(status_topic, "online")
            assert late.statuses[status_topic][-1] == ("online", True)
        assert daemon.terminate(timeout=10) == 0, daemon.tail()
    accounting = check_nothing_lost(config, store, sub)
    print(f"\nbroker restarted with its persistence wiped: {accounting}")
    assert sub.duplicates <= WINDOW_RECORDS


def test_acl_denies_telemetry_for_ten_seconds_nothing_deleted_then_delivered(
        tmp_path: Path, fleet: Path) -> None:
    """Mosquitto refuses every telemetry publish for 10 s (PUBACK 0x87): nothing refused is
    deleted, health keeps flowing, each refused topic is logged once, and everything arrives
    once the ACL allows it again."""
    allow_all = "topic readwrite bms/#\n"
    deny_telemetry = ("topic read bms/#\n"
                      "topic write bms/+/health\n"
                      "topic write bms/+/events\n"
                      "topic write bms/gateway/#\n")
    broker = Broker(tmp_path / "broker", acl=allow_all)
    config = fleet_config(tmp_path, broker.port, fleet, retry_backoff_s=0.5)
    store, log = tmp_path / "store.sqlite", tmp_path / "daemon.log"

    def health_received() -> int:
        return sum(len(envelope["records"]) for topic, envelope in sub.envelopes()
                   if topic.endswith("/health"))

    with broker, Subscriber(broker.host, broker.port) as sub, Daemon(config, log) as daemon:
        daemon.wait_ready()
        wait_until(lambda: store.exists() and read_store(store).acked > 500, 30,
                   "records flowing", daemon)
        broker.set_acl(deny_telemetry)
        denied_at = read_store(store)
        health_before = health_received()
        time.sleep(10.0)
        during = read_store(store)
        refusals = status(config).get("puback_errors_total{0x87}", 0)
        broker.set_acl(allow_all)
        wait_until(lambda: len(read_store(store).stored) < 500, 30,
                   "the refused backlog to drain", daemon)
        assert daemon.terminate(timeout=10) == 0, daemon.tail()
    accounting = check_nothing_lost(config, store, sub)
    print(f"\nACL denied telemetry for 10 s: {accounting}; refusals 0x87={refusals}; "
          f"connection drops={len(log_events(log, 'broker_lost'))}; "
          f"stored at the end of the denial={len(during.stored)}")
    assert refusals > 0
    # refused records stayed: 10 s of the fleet's telemetry is in the store at its end
    assert len(during.stored) > len(denied_at.stored) + 1000
    assert health_received() > health_before  # other topics kept flowing
    # Mosquitto drops the connection after each refused publish, often before its PUBACK 0x87
    # gets through: only some topics are known refused, each logged once, and accepted later.
    refused = [e["topic"] for e in log_events(log, "publish_refused")]
    telemetry_topics = {f"bms/FLEET-{n:02d}/telemetry" for n in range(PACKS)}
    assert refused and len(refused) == len(set(refused)) and set(refused) <= telemetry_topics
    assert {e["code"] for e in log_events(log, "publish_refused")} == {"0x87"}
    assert {e["topic"] for e in log_events(log, "publish_accepted")} == set(refused)
    # each drop is a transition and is logged, but the backoff spaces the reconnects out
    # (about 1 s once grown: 10 s of refusals, not one drop per refused publish)
    flaps = len(log_events(log, "broker_lost"))
    assert 0 < flaps <= 30, flaps


def test_records_the_broker_can_never_take_are_dead_lettered_and_shown_by_status(
        tmp_path: Path, fleet: Path) -> None:
    """A broker whose maximum packet (announced in CONNACK) is too small for one kind of the
    fleet's records (health, about 2 KB, here; telemetry is under 1 KB): those are refused for
    good, moved to the dead-letter table, counted by reason and listed by ``bms-gateway
    status``; the others flow; nothing is lost, and each kind's records are accounted for."""
    broker = Broker(tmp_path / "broker", max_packet_size=1500)
    config = fleet_config(tmp_path, broker.port, fleet)
    store, log = tmp_path / "store.sqlite", tmp_path / "daemon.log"
    with broker, Subscriber(broker.host, broker.port) as sub, Daemon(config, log) as daemon:
        daemon.wait_ready()
        wait_until(lambda: store.exists() and len(read_store(store).dead) > 30, 30,
                   "records to be dead-lettered", daemon)
        assert daemon.terminate(timeout=10) == 0, daemon.tail()
    counts = status(config)
    accounting = account(counts, sub.received, sub.duplicates)
    view = read_store(store)
    text = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=child_env(),
                          check=True).stdout
    received: dict[str, set[int]] = {}
    for topic, envelope in sub.envelopes():
        received.setdefault(topic.rsplit("/", 1)[1], set()).update(
            r["seq"] for r in envelope["records"])
    dead: dict[str, int] = {}
    for kind in view.dead.values():
        dead[kind] = dead.get(kind, 0) + 1
    print(f"\nbroker maximum packet 1500 bytes: {accounting}; dead letters by kind {dead}, "
          f"delivered by kind { {k: len(v) for k, v in received.items()} }")
    assert accounting.lost == 0, accounting
    assert accounting.dead_lettered == len(view.dead) == counts[
        "records_dead_lettered_total{payload_too_large}"] > 0
    assert accounting.received > 0
    for kind in ("telemetry", "health", "events"):  # every record of each kind accounted for
        stored = sum(1 for k in view.kinds.values() if k == kind)
        assert counts.get(f"records_committed_total{{{kind}}}", 0) == (
            len(received.get(kind, ())) + dead.get(kind, 0) + stored), kind
    recent = counts["dead_letters_recent"]
    assert [d["seq"] for d in recent] == sorted(view.dead, reverse=True)[:5]
    assert {d["reason"] for d in recent} == {"payload_too_large"}
    assert "newest dead letters" in text and "payload_too_large" in text
    # logged once per stream losing records, not per batch
    logged = [(e["serial"], e["kind"]) for e in log_events(log, "records_dead_lettered")]
    assert len(logged) == len(set(logged)) <= PACKS * len(dead)
