"""The publisher against a real private Mosquitto: delivery, durability, refusals, status, TLS.

Every test starts its own broker (tests/support/broker.py) and checks deliveries with an
independent subscriber (tests/support/subscriber.py), never through the publisher's own view.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config import MqttSection, TlsSection
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.model import Record, RecordKind
from gateway.publish.encode import CONTENT_TYPE, SCHEMA, format_ts, publish_overhead
from gateway.publish.mqtt import Publisher
from gateway.publish.topics import status_topic
from gateway.store.base import Store
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SqliteStore
from tests.support.broker import Broker, make_pki
from tests.support.subscriber import Subscriber

GATEWAY = "gw-test"
REPO = Path(__file__).resolve().parent.parent
STATUS = status_topic("bms", GATEWAY)


# ---------------------------------------------------------------------------------------------
# helpers


def mqtt_settings(broker: Broker, **overrides: Any) -> MqttSection:
    """Fast timings so faults resolve within a test's time; everything else as configured."""
    values: dict[str, Any] = {"host": broker.host, "port": broker.port, "keepalive_s": 5,
                              "publish_interval_s": 0.05, "reconnect_min_s": 0.05,
                              "reconnect_max_s": 0.5, "retry_backoff_s": 0.1}
    values.update(overrides)
    return MqttSection(**values)


def make_store(kind: str, folder: Path, metrics: Metrics) -> Store:
    if kind == "sqlite":
        return SqliteStore(folder / "store.sqlite", max_bytes=256 * 1024 * 1024,
                           max_records=1_000_000, metrics=metrics)
    return MemoryStore(metrics=metrics)


def telemetry(serial: str, i: int, **extra: Any) -> Record:
    body: dict[str, Any] = {"current_a": round(0.5 * i, 3), "pack_voltage_v": 51.2,
                            "cell_voltages_v": [3.2 + 0.001 * c for c in range(16)]}
    body.update(extra)
    return Record(serial, RecordKind.TELEMETRY, 1_795_485_342.0 + i * 0.1, body)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def running(publisher: Publisher) -> Iterator[None]:
    """Run the publisher on its own thread, as the supervisor does; stop it and check it
    returned in bounded time without raising."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def body() -> None:
        try:
            publisher.run(stop)
        except BaseException as exc:  # reported by the test below, not lost in the thread
            failures.append(exc)

    thread = threading.Thread(target=body, name="publisher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive(), "publisher did not return within 20 s of stop"
    if failures:
        raise failures[0]


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as running_broker:
        yield running_broker


# ---------------------------------------------------------------------------------------------
# delivery


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_records_arrive_with_topic_envelope_seq_and_ts(broker: Broker, tmp_path: Path,
                                                       store_kind: str) -> None:
    metrics = Metrics()
    store = make_store(store_kind, tmp_path, metrics)
    records = [telemetry("PACK-1", i) for i in range(30)]
    records += [Record("PACK-2", RecordKind.HEALTH, 1_795_485_400.25, {"soh_pct": 97.5}),
                Record("PACK-2", RecordKind.EVENTS, 1_795_485_401.5, {"event": "overcharge"})]
    seqs = store.commit(records)
    wake = threading.Event()
    publisher = Publisher(mqtt_settings(broker), GATEWAY, store, metrics, wake=wake)
    with Subscriber(broker.host, broker.port) as sub, running(publisher):
        sub.wait_for_records(len(records), timeout=20)
        wait_for(lambda: store.stats().records == 0, 10, "the store to be emptied by acks")
        assert time.monotonic() - publisher.last_progress < 2
    store.close()

    assert set(sub.deliveries) == {(GATEWAY, seq) for seq in seqs}
    assert sub.malformed == []
    by_seq = dict(zip(seqs, records, strict=True))
    for topic, envelope in sub.envelopes():
        assert envelope["schema"] == SCHEMA
        assert envelope["gateway_id"] == GATEWAY
        assert topic == f"bms/{envelope['serial']}/{envelope['kind']}"
        got = [r["seq"] for r in envelope["records"]]
        assert got == sorted(got)
        for record in envelope["records"]:
            source = by_seq[record["seq"]]
            assert (source.serial, source.kind.value) == (envelope["serial"], envelope["kind"])
            assert record["ts"] == format_ts(source.ts)
            assert {k: v for k, v in record.items() if k not in ("seq", "ts")} == source.body
    assert {m.content_type for m in sub.messages if m.envelope is not None} == {CONTENT_TYPE}
    assert metrics.get("records_acked_total") == len(records)
    assert metrics.gauge("broker_state") == "disconnected"  # after the clean stop


def test_records_are_deleted_only_after_puback(broker: Broker) -> None:
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    wake = threading.Event()
    publisher = Publisher(mqtt_settings(broker, batch_max_records=10), GATEWAY, store, metrics,
                          wake=wake)
    with Subscriber(broker.host, broker.port) as sub, running(publisher):
        wait_for(lambda: metrics.gauge("broker_state") == "connected", 10, "connected")
        with broker.paused():
            store.commit([telemetry("PACK-1", i) for i in range(40)])
            wake.set()
            wait_for(lambda: metrics.get("records_published_total") == 40, 10,
                     "all 40 records published to the stopped broker")
            time.sleep(0.3)  # acks would have had ample time to arrive, were any sent
            assert store.stats().records == 40
            assert metrics.get("records_acked_total") == 0
        wait_for(lambda: store.stats().records == 0, 10, "acks after the broker resumed")
        sub.wait_for_records(40, timeout=10)
    assert metrics.get("records_acked_total") == 40


def test_backlog_drains_in_full_batches(broker: Broker) -> None:
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    store.commit([telemetry(("PACK-A", "PACK-B")[i % 2], i) for i in range(1000)])
    # a long interval: only full envelopes go out at once, so this proves the backlog path
    settings = mqtt_settings(broker, batch_max_records=50, publish_interval_s=60.0, inflight=4)
    publisher = Publisher(settings, GATEWAY, store, metrics)
    with Subscriber(broker.host, broker.port) as sub, running(publisher):
        sub.wait_for_records(1000, timeout=20)
    envelopes = sub.envelopes()
    assert len(envelopes) == 20
    assert all(len(env["records"]) == 50 for _, env in envelopes)
    for serial in ("PACK-A", "PACK-B"):
        seqs = [r["seq"] for _, env in envelopes if env["serial"] == serial
                for r in env["records"]]
        assert seqs == sorted(seqs) and len(seqs) == 500
    assert sub.duplicates == 0


def test_steady_state_batches_what_arrives_within_the_interval(broker: Broker) -> None:
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    wake = threading.Event()
    publisher = Publisher(mqtt_settings(broker, publish_interval_s=0.4), GATEWAY, store, metrics,
                          wake=wake)
    with Subscriber(broker.host, broker.port) as sub, running(publisher):
        wait_for(lambda: metrics.gauge("broker_state") == "connected", 10, "connected")
        for i in range(40):  # one record every 30 ms for 1.2 s
            store.commit([telemetry("PACK-1", i)])
            wake.set()
            time.sleep(0.03)
        sub.wait_for_records(40, timeout=10)
    messages = len(sub.envelopes())
    # about one message per 0.4 s interval; a record-per-message publisher would send 40
    assert messages <= 12, messages


def test_byte_bound_splits_envelopes_and_dead_letters_a_record_too_large_alone(
        broker: Broker) -> None:
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    records = [telemetry("PACK-1", i) for i in range(60)]
    records[30] = telemetry("PACK-1", 30, blob="x" * 5000)
    seqs = store.commit(records)
    publisher = Publisher(mqtt_settings(broker, batch_max_bytes=2048), GATEWAY, store, metrics)
    with Subscriber(broker.host, broker.port) as sub, capture_logs() as logs, \
            running(publisher):
        sub.wait_for_records(59, timeout=10)
        wait_for(lambda: store.stats().records == 0, 10, "the store to be empty")
    assert all(len(m.payload) <= 2048 for m in sub.messages if m.envelope is not None)
    assert (GATEWAY, seqs[30]) not in sub.deliveries
    assert [(d.seq, d.reason) for d in store.dead_letters()] == [(seqs[30], "payload_too_large")]
    assert metrics.get("records_dead_lettered_total", "payload_too_large") == 1
    assert len(events(logs, "records_dead_lettered")) == 1


def test_broker_maximum_packet_size_from_connack_is_respected(tmp_path: Path) -> None:
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    store.commit([telemetry("PACK-1", i) for i in range(200)])
    with Broker(tmp_path / "broker", max_packet_size=1500) as broker, \
            Subscriber(broker.host, broker.port) as sub:
        publisher = Publisher(mqtt_settings(broker), GATEWAY, store, metrics)
        with running(publisher):
            sub.wait_for_records(200, timeout=10)
    topic = "bms/PACK-1/telemetry"
    assert max(len(m.payload) for m in sub.messages if m.envelope) + publish_overhead(topic) \
        <= 1500
    assert metrics.get("broker_disconnects_total") == 0


def test_broker_that_drops_oversized_messages_is_learned_and_oversized_record_dead_lettered(
        tmp_path: Path) -> None:
    """Mosquitto's ``message_size_limit`` is not announced in CONNACK; Mosquitto answers an
    oversized PUBLISH with PUBACK 0x95, which MQTT 5 does not allow on PUBACK, so paho drops the
    connection (protocol error). The publisher must not re-send the same message forever."""
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    records = [telemetry("PACK-1", i) for i in range(120)]
    records[60] = telemetry("PACK-1", 60, blob="z" * 3000)
    seqs = store.commit(records)
    broker = Broker(tmp_path / "broker", message_size_limit=1000)
    settings = mqtt_settings(broker, batch_max_records=100, inflight=2)
    with broker, Subscriber(broker.host, broker.port) as sub, capture_logs() as logs:
        publisher = Publisher(settings, GATEWAY, store, metrics)
        with running(publisher):
            sub.wait_for_records(119, timeout=30)
            wait_for(lambda: store.stats().records == 0, 10, "the store to be empty")
    assert [(d.seq, d.reason) for d in store.dead_letters()] == [(seqs[60], "payload_too_large")]
    assert (GATEWAY, seqs[60]) not in sub.deliveries
    assert max(len(m.payload) for m in sub.messages if m.envelope) <= 1000
    assert events(logs, "broker_size_limit_suspected")


# ---------------------------------------------------------------------------------------------
# faults


def accounting(store: Store, sub: Subscriber, metrics: Metrics) -> str:
    """TESTING.md's accounting of a run, for a failure message or the test's output."""
    stats = store.stats()
    dropped = sum(stats.dropped_total.values())
    lost = stats.committed_total - sub.received - stats.records - dropped
    return (f"committed={stats.committed_total} received={sub.received} "
            f"still_stored={stats.records} dropped={dropped} lost={lost} "
            f"duplicates={sub.duplicates} acked={stats.acked_total} "
            f"published={metrics.get('records_published_total')} "
            f"dead_letters={stats.dead_letters}")


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_broker_killed_and_restarted_loses_nothing(tmp_path: Path, store_kind: str) -> None:
    inflight, batch, kills = 8, 20, 3
    metrics = Metrics()
    store = make_store(store_kind, tmp_path, metrics)
    wake = threading.Event()
    broker = Broker(tmp_path / "broker", persistence=True).start()
    settings = mqtt_settings(broker, inflight=inflight, batch_max_records=batch,
                             publish_interval_s=0.02)
    publisher = Publisher(settings, GATEWAY, store, metrics, wake=wake)
    kills_done = threading.Event()
    # held by the test while it sets up a kill: the producer commits nothing meanwhile
    production = threading.Lock()
    serial = iter(range(1_000_000))

    def commit(n: int) -> None:
        store.commit([telemetry(f"PACK-{i % 3}", i) for i in
                      (next(serial) for _ in range(n))])
        wake.set()

    def produce() -> None:
        # about 700 records/s until the last restart, bounded at 60 s
        for _ in range(4000):
            if kills_done.is_set():
                return
            if production.acquire(timeout=10):
                try:
                    commit(10)
                finally:
                    production.release()
            time.sleep(0.015)

    def context() -> str:
        return accounting(store, sub, metrics)

    reconnect_s: list[float] = []
    try:
        with Subscriber(broker.host, broker.port) as sub:
            # The subscriber's session must outlive each SIGKILL (a killed broker writes
            # nothing): snapshot it now, while nothing is in flight to it.
            broker.save_persistence()
            producer = threading.Thread(target=produce, daemon=True)
            with capture_logs() as logs, running(publisher):
                producer.start()
                for k in range(kills):
                    acked = metrics.get("records_acked_total")
                    wait_for(lambda a=acked: metrics.get("records_acked_total") > a, 10,
                             "records flowing")
                    with production:
                        # Mosquitto acknowledges a publish before its copy to the subscriber
                        # is safe, and a SIGKILLed broker loses that copy: a loss the gateway
                        # cannot see. So every kill starts from a quiet point, every record
                        # acknowledged and at the subscriber (checked seq by seq: a count can
                        # be made up by duplicates), then freezes the broker (SIGSTOP) with a
                        # window of fresh records in flight into it and kills it. From then on
                        # the only copies of those records, and of everything the producer
                        # commits during the outage, are in the gateway's store.
                        wait_for(lambda: store.stats().records == 0, 10, "a drained store")
                        sub.wait_for_seqs(GATEWAY, range(1, store.stats().last_seq + 1),
                                          timeout=10, context=context)
                        broker.pause()
                        sent = metrics.get("mqtt_messages_published_total")
                        commit(inflight * batch)
                        wait_for(lambda s=sent: metrics.get("mqtt_messages_published_total")
                                 == s + inflight, 10, "a full window of publishes into the "
                                 "frozen broker")
                        broker.kill()
                    wait_for(lambda k=k: metrics.get("broker_disconnects_total") == k + 1, 10,
                             "the publisher to notice the loss")
                    time.sleep(0.2)
                    broker.start()
                    restarted = time.monotonic()
                    wait_for(lambda: metrics.gauge("broker_state") == "connected",
                             settings.reconnect_max_s + 2, "reconnect within backoff + 2 s")
                    reconnect_s.append(time.monotonic() - restarted)
                    sub.wait_until(lambda k=k: sub.subscribes == k + 2, 10,
                                   "the subscriber to be back")
                kills_done.set()
                producer.join(timeout=10)
                sub.wait_for_seqs(GATEWAY, range(1, store.stats().last_seq + 1), timeout=30,
                                  context=context)
                wait_for(lambda: store.stats().records == 0, 10, "the backlog to drain")
    finally:
        kills_done.set()
        broker.stop()
    stats = store.stats()
    summary = accounting(store, sub, metrics)
    store.close()

    committed, received = stats.committed_total, sub.received
    lost = committed - received - stats.records - sum(stats.dropped_total.values())
    print(f"\naccounting[{store_kind}]: {summary} "
          f"reconnect_s={[round(s, 2) for s in reconnect_s]}")
    assert committed > kills * inflight * batch
    assert lost == 0, summary
    assert set(sub.deliveries) == {(GATEWAY, seq) for seq in range(1, committed + 1)}
    assert sub.duplicates <= kills * inflight * batch, summary
    assert len(events(logs, "broker_lost")) == kills
    assert len(events(logs, "broker_recovered")) == kills
    assert all(entry["outage_s"] > 0 for entry in events(logs, "broker_recovered"))


def test_acl_refusal_keeps_records_until_the_acl_allows_them(tmp_path: Path) -> None:
    deny_telemetry = ("topic read bms/#\n"
                      "topic write bms/+/health\n"
                      "topic write bms/gateway/#\n")
    allow_all = "topic readwrite bms/#\n"
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    seqs = store.commit([telemetry("PACK-1", 0), Record("PACK-1", RecordKind.HEALTH, 1.0,
                                                        {"soh_pct": 99.0}),
                         telemetry("PACK-1", 1)])
    with Broker(tmp_path / "broker", acl=deny_telemetry) as broker, \
            Subscriber(broker.host, broker.port) as sub, capture_logs() as logs:
        publisher = Publisher(mqtt_settings(broker), GATEWAY, store, metrics)
        with running(publisher):
            sub.wait_for_records(1, timeout=10)  # the health record is allowed
            wait_for(lambda: metrics.get("records_retried_total") >= 6, 10,
                     "several refused rounds")
            assert metrics.get("puback_errors_total", "0x87") >= 3
            assert store.stats().records == 2
            assert store.dead_letters() == []
            assert set(sub.deliveries) == {(GATEWAY, seqs[1])}
            refused = events(logs, "publish_refused")
            # logged on the transition into "refused", not once per round
            assert [(e["code"], e["topic"], e["action"]) for e in refused] == \
                [("0x87", "bms/PACK-1/telemetry", "retry")]

            broker.set_acl(allow_all)
            sub.wait_for_records(3, timeout=10)
            wait_for(lambda: store.stats().records == 0, 10, "the store to be empty")
    assert set(sub.deliveries) == {(GATEWAY, seq) for seq in seqs}
    assert events(logs, "publish_accepted")[0]["topic"] == "bms/PACK-1/telemetry"
    assert metrics.get("records_acked_total") == 3


def test_a_broker_that_keeps_dropping_the_connection_is_retried_ever_more_slowly(
        tmp_path: Path) -> None:
    """Mosquitto drops the connection after each refused publish. A reconnect backoff reset
    by every CONNACK would retry at reconnect_min_s, 20 times a second here, for as long as
    the refusal lasts; only a connection that lasted resets it."""
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    store.commit([telemetry("PACK-1", i) for i in range(5)])
    with Broker(tmp_path / "broker", acl="topic read bms/#\n") as broker, \
            capture_logs() as logs:
        settings = mqtt_settings(broker, reconnect_min_s=0.05, reconnect_max_s=0.8,
                                 retry_backoff_s=0.05)
        publisher = Publisher(settings, GATEWAY, store, metrics)
        with running(publisher):
            time.sleep(4.0)
    drops = metrics.get("broker_disconnects_total")
    # backoff 0.05, 0.1, 0.2, 0.4, then 0.4 to 0.8 s: at most about a dozen in 4 s
    assert 3 <= drops <= 15, drops
    assert len(events(logs, "broker_lost")) == drops
    assert store.stats().records == 5
    assert metrics.get("records_acked_total") == 0


# ---------------------------------------------------------------------------------------------
# status and Last Will


def test_status_is_retained_online_then_offline_after_a_clean_stop(broker: Broker) -> None:
    metrics = Metrics()
    publisher = Publisher(mqtt_settings(broker), GATEWAY, MemoryStore(metrics=metrics), metrics)
    with Subscriber(broker.host, broker.port, topic=STATUS) as sub:
        with running(publisher):
            sub.wait_for_status(STATUS, "online")
            # a subscriber arriving later is told by the retained message
            with Subscriber(broker.host, broker.port, topic=STATUS) as late:
                late.wait_for_status(STATUS, "online")
                assert late.statuses[STATUS][-1] == ("online", True)
        sub.wait_for_status(STATUS, "offline")
    with Subscriber(broker.host, broker.port, topic=STATUS) as after:
        after.wait_for_status(STATUS, "offline")
        assert after.statuses[STATUS] == [("offline", True)]


def test_retained_status_survives_a_broker_restart_until_its_store_is_wiped(
        tmp_path: Path) -> None:
    metrics = Metrics()
    with Broker(tmp_path / "broker", persistence=True) as broker:
        publisher = Publisher(mqtt_settings(broker), GATEWAY, MemoryStore(metrics=metrics),
                              metrics)
        with running(publisher):
            wait_for(lambda: metrics.gauge("broker_state") == "connected", 10, "connected")
        port = broker.port
        broker.restart()  # a clean stop writes the retained message to the broker's store
        assert broker.port == port
        with Subscriber(broker.host, broker.port, topic=STATUS) as sub:
            sub.wait_for_status(STATUS, "offline")
        broker.stop()
        broker.wipe_persistence()
        broker.start()
        with Subscriber(broker.host, broker.port, topic=STATUS) as sub:
            time.sleep(0.3)  # a retained message would arrive right after the subscription
            assert sub.statuses == {}


CHILD = """
import sys, threading
from gateway.config import MqttSection
from gateway.metrics import Metrics
from gateway.publish.mqtt import Publisher
from gateway.store.memory import MemoryStore

metrics = Metrics()
settings = MqttSection(host=sys.argv[1], port=int(sys.argv[2]), keepalive_s=5)
Publisher(settings, sys.argv[3], MemoryStore(metrics=metrics), metrics).run(threading.Event())
"""


def test_last_will_says_offline_when_the_gateway_dies_abruptly(broker: Broker) -> None:
    with Subscriber(broker.host, broker.port, topic=STATUS) as sub:
        child = subprocess.Popen([sys.executable, "-c", CHILD, broker.host, str(broker.port),
                                  GATEWAY], cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            sub.wait_for_status(STATUS, "online", timeout=30)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
            sub.wait_for_status(STATUS, "offline", timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    with Subscriber(broker.host, broker.port, topic=STATUS) as after:
        after.wait_for_status(STATUS, "offline")
        assert after.statuses[STATUS] == [("offline", True)]


# ---------------------------------------------------------------------------------------------
# credentials and TLS


def test_username_and_password_file(tmp_path: Path) -> None:
    users = {"gateway": "s3cret", "reader": "r3ad"}
    (tmp_path / "good").write_text("s3cret\n", encoding="utf-8")
    (tmp_path / "bad").write_text("wrong\n", encoding="utf-8")
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    seqs = store.commit([telemetry("PACK-1", 0)])
    with Broker(tmp_path / "broker", allow_anonymous=False, users=users) as broker, \
            Subscriber(broker.host, broker.port, username="reader", password="r3ad") as sub:
        refused_metrics = Metrics()
        refused = Publisher(mqtt_settings(broker, username="gateway",
                                          password_file=str(tmp_path / "bad")),
                            GATEWAY, store, refused_metrics)
        with capture_logs() as logs, running(refused):
            wait_for(lambda: refused_metrics.get("broker_connect_failures_total") >= 2, 10,
                     "refused connects")
        failures = events(logs, "broker_connect_failed")
        # Mosquitto 2.0 answers a wrong password with 0x87 (not authorized), others with 0x86
        assert re.search(r"CONNACK 0x8[67]", failures[0]["reason"]), failures[0]
        assert len(failures) == 1  # the same reason again is not logged again
        assert store.stats().records == 1

        accepted = Publisher(mqtt_settings(broker, username="gateway",
                                           password_file=str(tmp_path / "good")),
                             GATEWAY, store, metrics)
        with running(accepted):
            sub.wait_for_records(1, timeout=10)
    assert set(sub.deliveries) == {(GATEWAY, seqs[0])}


def test_unreadable_password_file_is_a_configuration_error(tmp_path: Path) -> None:
    settings = MqttSection(username="gateway", password_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"mqtt\.password_file"):
        Publisher(settings, GATEWAY, MemoryStore(), Metrics())


def test_tls_with_client_certificates_and_per_client_acl(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", clients=("gw-test", "reader"))
    other_ca = make_pki(tmp_path / "other", ca_name="someone-else")
    acl = ("user gw-test\ntopic write bms/#\n"
           "user reader\ntopic read bms/#\n")
    metrics = Metrics()
    store = MemoryStore(metrics=metrics)
    seqs = store.commit([telemetry("PACK-1", i) for i in range(5)])
    cert, key = pki.clients["gw-test"]
    reader = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    reader.load_verify_locations(pki.ca_file)
    reader.load_cert_chain(*pki.clients["reader"])
    with Broker(tmp_path / "broker", tls=pki.broker_tls(), acl=acl) as broker, \
            Subscriber(broker.host, broker.port, tls_context=reader) as sub:
        untrusted = TlsSection(enabled=True, ca_file=str(other_ca.ca_file), cert_file=str(cert),
                               key_file=str(key))
        wrong_metrics = Metrics()
        wrong = Publisher(mqtt_settings(broker, tls=untrusted), GATEWAY, store, wrong_metrics)
        with capture_logs() as logs, running(wrong):
            wait_for(lambda: wrong_metrics.get("broker_connect_failures_total") >= 1, 10,
                     "the untrusted server certificate to be refused")
        assert "CERTIFICATE_VERIFY_FAILED" in events(logs, "broker_connect_failed")[0]["reason"]
        assert store.stats().records == 5

        # insecure_skip_verify accepts the same server without checking it (lab use only)
        unchecked = TlsSection(enabled=True, ca_file=str(other_ca.ca_file), cert_file=str(cert),
                               key_file=str(key), insecure_skip_verify=True)
        unchecked_metrics = Metrics()
        lab = Publisher(mqtt_settings(broker, tls=unchecked), GATEWAY, MemoryStore(),
                        unchecked_metrics)
        with running(lab):
            wait_for(lambda: unchecked_metrics.gauge("broker_state") == "connected", 10,
                     "a connection without verification")

        trusted = TlsSection(enabled=True, ca_file=str(pki.ca_file), cert_file=str(cert),
                             key_file=str(key))
        publisher = Publisher(mqtt_settings(broker, tls=trusted), GATEWAY, store, metrics)
        with running(publisher):
            sub.wait_for_records(5, timeout=10)
    assert set(sub.deliveries) == {(GATEWAY, seq) for seq in seqs}
