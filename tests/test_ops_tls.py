"""TLS against a private Mosquitto that requires client certificates, with a throwaway CA.

The right certificates deliver; a missing client certificate, an untrusted CA, an expired
certificate (the broker's or the gateway's), a server certificate for another host name and a
server stuck below TLS 1.2 are all refused — and every record stays in the store, delivered later
by a correctly configured publisher from the very same store.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config import MqttSection, TlsSection
from gateway.metrics import Metrics
from gateway.model import Record, RecordKind
from gateway.publish.mqtt import Publisher
from gateway.store.sqlite import SqliteStore
from tests.support.broker import Broker, BrokerTls, Pki, make_pki, require_program
from tests.support.subscriber import Subscriber

GATEWAY = "gw-test"


# ---------------------------------------------------------------------------------------------
# certificates


def issue(pki: Pki, name: str, cn: str, extensions: str, *, days: int) -> tuple[Path, Path]:
    """A certificate from ``pki``'s CA; ``days = -1`` makes one that expired a day ago (checked
    with ``openssl verify``, so a refusal of it is for that reason)."""
    folder = pki.ca_file.parent
    openssl = require_program("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60, cwd=folder)

    key, csr = folder / f"{name}.key", folder / f"{name}.csr"
    cert, ext = folder / f"{name}.crt", folder / f"{name}.ext"
    ext.write_text(extensions, encoding="ascii")
    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    run("req", "-new", "-key", str(key), "-subj", f"/CN={cn}", "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(pki.ca_file), "-CAkey",
        str(folder / "ca.key"), "-CAcreateserial", "-days", str(days), "-sha256", "-extfile",
        str(ext), "-out", str(cert))
    verdict = subprocess.run([openssl, "verify", "-CAfile", str(pki.ca_file), str(cert)],
                             capture_output=True, text=True, timeout=60)
    assert ("certificate has expired" in verdict.stdout + verdict.stderr) == (days < 0), verdict
    return cert, key


@dataclass(frozen=True, slots=True)
class Certs:
    pki: Pki
    other_ca: Pki
    expired_server: tuple[Path, Path]
    wrong_host_server: tuple[Path, Path]
    expired_client: tuple[Path, Path]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("pki")
    pki = make_pki(folder / "ca", clients=(GATEWAY, "reader"))
    server = "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    return Certs(
        pki=pki,
        other_ca=make_pki(folder / "other", ca_name="someone-else"),
        expired_server=issue(pki, "server-expired", "127.0.0.1", server, days=-1),
        wrong_host_server=issue(pki, "server-elsewhere", "broker.example.net",
                                "subjectAltName=DNS:broker.example.net\n"
                                "extendedKeyUsage=serverAuth\n", days=2),
        expired_client=issue(pki, "client-expired", GATEWAY, "extendedKeyUsage=clientAuth\n",
                             days=-1),
    )


# ---------------------------------------------------------------------------------------------
# helpers


def settings(port: int, tls: TlsSection) -> MqttSection:
    return MqttSection(host="127.0.0.1", port=port, keepalive_s=5, publish_interval_s=0.05,
                       reconnect_min_s=0.05, reconnect_max_s=0.3, retry_backoff_s=0.1, tls=tls)


def tls(certs: Certs, *, ca: Path | None = None, client: tuple[Path, Path] | None = None,
        **extra: Any) -> TlsSection:
    cert, key = client if client is not None else ("", "")
    return TlsSection(enabled=True, ca_file=str(ca or certs.pki.ca_file), cert_file=str(cert),
                      key_file=str(key), **extra)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def running(publisher: Publisher) -> Iterator[None]:
    stop = threading.Event()
    failures: list[BaseException] = []

    def body() -> None:
        try:
            publisher.run(stop)
        except BaseException as exc:  # re-raised below, in the test's thread
            failures.append(exc)

    thread = threading.Thread(target=body, name="publisher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive(), "publisher did not stop within 20 s"
    if failures:
        raise failures[0]


def refused(store: SqliteStore, mqtt: MqttSection) -> str:
    """Run a publisher until its second failed connect; return the logged reason. It must never
    have been connected, and the store must still hold every record."""
    before = store.stats().records
    metrics = Metrics()
    states: set[str] = set()
    publisher = Publisher(mqtt, GATEWAY, store, metrics)
    with capture_logs() as logs, running(publisher):
        def failed_twice() -> bool:
            states.add(str(metrics.gauge("broker_state")))
            return metrics.get("broker_connect_failures_total") >= 2
        wait_for(failed_twice, 15, "two refused connects")
    assert "connected" not in states
    assert metrics.get("records_published_total") == 0
    assert store.stats().records == before
    assert store.dead_letters() == []
    failures = [e for e in logs if e["event"] == "broker_connect_failed"]
    assert failures, logs
    return " | ".join(str(e["reason"]) for e in failures)


def reader_context(certs: Certs) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(certs.pki.ca_file)
    context.load_cert_chain(*certs.pki.clients["reader"])
    return context


def new_store(folder: Path, n: int) -> tuple[SqliteStore, list[int]]:
    store = SqliteStore(folder / "store.sqlite", max_bytes=64 * 1024 * 1024,
                        max_records=100_000)
    seqs = store.commit([Record("PACK-1", RecordKind.TELEMETRY, 1_795_485_342.0 + i,
                                {"current_a": float(i)}) for i in range(n)])
    return store, seqs


ACL = (f"user {GATEWAY}\ntopic write bms/#\n"
       "user reader\ntopic read bms/#\n")


# ---------------------------------------------------------------------------------------------
# tests


def test_client_side_refusals_keep_every_record_and_the_right_certificates_deliver(
        tmp_path: Path, certs: Certs) -> None:
    store, seqs = new_store(tmp_path, 5)
    with Broker(tmp_path / "broker", tls=certs.pki.broker_tls(), acl=ACL) as broker:
        # no client certificate: the broker requires one. The reason is its TLS alert, or an
        # EOF when the broker's close overtakes the alert; the broker's log says which check
        reason = refused(store, settings(broker.port, tls(certs)))
        assert re.search(r"CERTIFICATE_REQUIRED|EOF occurred", reason), reason
        assert "peer did not return a certificate" in broker.log_tail(20_000)
        # the gateway does not trust the broker's CA
        reason = refused(store, settings(broker.port, tls(certs, ca=certs.other_ca.ca_file,
                                                          client=certs.pki.clients[GATEWAY])))
        assert "CERTIFICATE_VERIFY_FAILED" in reason
        # the gateway's own certificate has expired (and only that: same CA, same name as the
        # one accepted below): the broker's verification refuses it
        refused(store, settings(broker.port, tls(certs, client=certs.expired_client)))
        assert "certificate verify failed" in broker.log_tail(20_000)
        # verification is on unless switched off: with no CA file the system's CAs are used,
        # and they do not know this broker
        default = TlsSection(enabled=True, cert_file=str(certs.pki.clients[GATEWAY][0]),
                             key_file=str(certs.pki.clients[GATEWAY][1]))
        assert default.insecure_skip_verify is False
        assert "CERTIFICATE_VERIFY_FAILED" in refused(store, settings(broker.port, default))

        with Subscriber(broker.host, broker.port, tls_context=reader_context(certs)) as sub:
            right = Publisher(settings(broker.port, tls(certs, client=certs.pki.clients[GATEWAY])),
                              GATEWAY, store, Metrics())
            with running(right):
                sub.wait_for_records(5, timeout=15)
                wait_for(lambda: store.stats().records == 0, 10, "the store to drain")
    assert set(sub.deliveries) == {(GATEWAY, seq) for seq in seqs}
    store.close()


@pytest.mark.parametrize(("server", "expected"), [
    ("expired_server", r"certificate has expired"),
    ("wrong_host_server", r"mismatch|doesn't match|not valid for"),
])
def test_server_certificate_expired_or_for_another_host_is_refused(
        tmp_path: Path, certs: Certs, server: str, expected: str) -> None:
    cert, key = getattr(certs, server)
    broker_tls = BrokerTls(certs.pki.ca_file, cert, key, require_certificate=True,
                           use_identity_as_username=True)
    store, _ = new_store(tmp_path, 3)
    with Broker(tmp_path / "broker", tls=broker_tls, acl=ACL) as broker:
        reason = refused(store, settings(broker.port,
                                         tls(certs, client=certs.pki.clients[GATEWAY])))
    assert "CERTIFICATE_VERIFY_FAILED" in reason
    assert re.search(expected, reason), reason
    store.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_a_server_that_speaks_only_tls_1_1_is_refused(tmp_path: Path, certs: Certs) -> None:
    """A TLS 1.1 server (which a client allowing 1.1 would reach: checked first) is refused."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.pki.server_cert, certs.pki.server_key)
    server.minimum_version = server.maximum_version = ssl.TLSVersion.TLSv1_1
    server.set_ciphers("DEFAULT:@SECLEVEL=0")  # TLS 1.1's signatures need the lowest level
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), server.wrap_socket(conn, server_side=True) as tls_:
                tls_.settimeout(1)
                tls_.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        lenient = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        lenient.load_verify_locations(certs.pki.ca_file)
        lenient.minimum_version = ssl.TLSVersion.TLSv1_1
        lenient.set_ciphers("DEFAULT:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                lenient.wrap_socket(raw, server_hostname="127.0.0.1") as old:
            assert old.version() == "TLSv1.1"

        store, _ = new_store(tmp_path, 2)
        reason = refused(store, settings(port, tls(certs, client=certs.pki.clients[GATEWAY])))
        assert re.search(r"PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL", reason), reason
        store.close()
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()
