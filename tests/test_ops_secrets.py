"""The daemon as the hardened unit runs it — secrets as systemd credentials, mutual TLS, a
password, a per-device ACL — and every line it wrote, grepped for the secrets.

The broker requires a client certificate and a password and lets this gateway write only its
status and its pack's health and events: telemetry is refused with PUBACK 0x87. The records stay
in the store, are counted and shown by ``status``, and flow once the ACL allows them.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.broker import Broker, BrokerTls, make_pki
from tests.support.daemon import REPO, child_env, gateway_config
from tests.support.subscriber import Subscriber

GATEWAY = "gw-sec"
SERIAL = "SIM-0001"
PASSWORD = "Tr0ub4dor-and-3-horses"
WRONG_PASSWORD = "n0t-the-Passw0rd-at-all"
OWN_TOPICS_ONLY = (f"user {GATEWAY}\n"
                   f"topic write bms/gateway/{GATEWAY}/status\n"
                   f"topic write bms/{SERIAL}/health\n"
                   f"topic write bms/{SERIAL}/events\n"
                   "user reader\ntopic read bms/#\n")
ALL_OWN_TOPICS = (f"user {GATEWAY}\n"
                  f"topic write bms/gateway/{GATEWAY}/status\n"
                  f"topic write bms/{SERIAL}/#\n"
                  "user reader\ntopic read bms/#\n")


class Run:
    """Runs commands as the unit would (``CREDENTIALS_DIRECTORY`` set) and keeps all they wrote."""

    def __init__(self, config: Path, credentials: Path, folder: Path) -> None:
        self.config = config
        self.env = child_env()
        self.env["CREDENTIALS_DIRECTORY"] = str(credentials)
        self.folder = folder
        self.outputs: list[str] = []
        self.logs: list[Path] = []

    def command(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=120, cwd=REPO,
                              env=env or self.env)
        self.outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.command("status", "--json"))
        return result

    def daemon(self) -> subprocess.Popen[bytes]:
        log = self.folder / f"daemon-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("ab") as out:
            return subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c",
                                     str(self.config)], stdout=out, stderr=subprocess.STDOUT,
                                    cwd=REPO, env=self.env)

    def wait_log(self, proc: subprocess.Popen[bytes], pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while pattern not in self.logs[-1].read_text(errors="replace"):
            assert proc.poll() is None, self.logs[-1].read_text()[-4000:]
            assert time.monotonic() < deadline, f"no {pattern}:\n" + \
                self.logs[-1].read_text()[-4000:]
            time.sleep(0.05)

    def wait_status(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not predicate(summary := self.status()):
            assert time.monotonic() < deadline, f"{what}: {summary}"
            time.sleep(0.3)
        return summary

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    def everything_written(self) -> str:
        return "\n".join(self.outputs + [log.read_text(errors="replace") for log in self.logs])


def test_credentials_mutual_tls_and_a_per_device_acl_with_no_secret_in_any_line(
        tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", clients=(GATEWAY, "reader"))
    cert, key = pki.clients[GATEWAY]
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "mqtt-password").write_text(WRONG_PASSWORD + "\n")
    (credentials / "mqtt-client-key").write_bytes(key.read_bytes())
    key_body = [line for line in key.read_text().splitlines() if "-----" not in line]

    broker_tls = BrokerTls(pki.ca_file, pki.server_cert, pki.server_key,
                           require_certificate=True, use_identity_as_username=False)
    reader_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    reader_tls.load_verify_locations(pki.ca_file)
    reader_tls.load_cert_chain(*pki.clients["reader"])
    with Broker(tmp_path / "broker", allow_anonymous=False, tls=broker_tls,
                users={GATEWAY: PASSWORD, "reader": "r3ad-only"},
                acl=OWN_TOPICS_ONLY) as broker, \
            Subscriber(broker.host, broker.port, username="reader", password="r3ad-only",
                       tls_context=reader_tls) as sub:
        config = gateway_config(
            tmp_path, broker_port=broker.port, gateway_id=GATEWAY,
            source={"kind": "simulator", "simulator": {"serial": SERIAL}},
            edge={"health_interval_s": 1.0},
            mqtt={"username": GATEWAY, "retry_backoff_s": 0.2,
                  "password_file": "${CREDENTIALS_DIRECTORY}/mqtt-password"},
            extra={"gateway": {"log_level": "debug"},
                   "mqtt.tls": {"enabled": True, "ca_file": str(pki.ca_file),
                                "cert_file": str(cert),
                                "key_file": "${CREDENTIALS_DIRECTORY}/mqtt-client-key"}})
        run = Run(config, credentials, tmp_path)
        # by hand (no credentials yet) the check notes them; inside the unit it reads them
        by_hand = {k: v for k, v in run.env.items() if k != "CREDENTIALS_DIRECTORY"}
        run.command("check-config", env=by_hand)
        assert "is a systemd credential" in run.outputs[-1]
        run.command("check-config")

        # 1. the wrong password: refused at CONNACK; records wait in the store
        daemon = run.daemon()
        try:
            run.wait_log(daemon, '"broker_connect_failed"', 120)
            run.wait_status(lambda s: s["store_records"] > 0, 30, "records in the store")
        finally:
            run.stop(daemon)
        assert "CONNACK 0x8" in run.logs[-1].read_text()

        # 2. the right password: health flows, telemetry is refused (0x87) and kept
        (credentials / "mqtt-password").write_text(PASSWORD + "\n")
        daemon = run.daemon()
        try:
            run.wait_log(daemon, '"publish_refused"', 60)
            sub.wait_until(lambda: any(topic.endswith("/health") for topic, _ in
                                       sub.envelopes()), 30, "a health record")
            refused = run.wait_status(
                lambda s: s.get("puback_errors_total{0x87}", 0) >= 2, 30, "refusals counted")
            table = run.command("status")
            assert refused["records_dead_lettered_total"] == 0
            assert refused["store_records"] > 0
            assert "puback_errors_total{0x87}" in table
            assert not any(topic.endswith("/telemetry") for topic, _ in sub.envelopes())

            # 3. the ACL lets telemetry through: the kept records are delivered
            broker.set_acl(ALL_OWN_TOPICS)
            sub.wait_until(lambda: any(topic.endswith("/telemetry") for topic, _ in
                                       sub.envelopes()), 30, "the kept telemetry")
            run.wait_log(daemon, '"publish_accepted"', 30)
        finally:
            run.stop(daemon)
        final = run.status()
        sub.wait_until(lambda: sub.received >= final["records_committed_total"]
                       - final["store_records"], 30, "every acked record")

    assert final["records_dead_lettered_total"] == 0
    assert final["records_committed_total"] == sub.received + final["store_records"] \
        + final["records_dropped_total"], final
    refusals = [json.loads(line) for line in run.logs[-1].read_text().splitlines()
                if '"publish_refused"' in line]
    assert refusals[0]["code"] == "0x87"
    assert refusals[0]["topic"] == f"bms/{SERIAL}/telemetry"

    # not one line of all that was written holds a secret
    written = run.everything_written()
    for event in ("broker_connect_failed", "broker_connected", "publish_refused"):
        assert f'"{event}"' in written  # the lines near the secrets are among them
    for secret in (PASSWORD, WRONG_PASSWORD, *key_body):
        assert secret not in written
