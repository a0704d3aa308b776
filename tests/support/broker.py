"""A private Mosquitto broker for tests: its own config file, loopback port and persistence folder.

Each :class:`Broker` writes a fresh ``mosquitto.conf`` into its work folder and runs
``mosquitto -c`` on a free 127.0.0.1 port. Tests drive faults through it: ``kill()`` (SIGKILL, no
persistence write), ``restart()`` on the same port, ``pause()``/``resume()`` (SIGSTOP/SIGCONT: the
TCP connection stays up but nothing is acknowledged), ``set_acl()`` (rewrite the ACL file and
SIGHUP, which makes Mosquitto re-read it), ``save_persistence()`` (SIGUSR1), and, with
``gateway_listener``, ``start(gateway=False)``: up for everyone but the gateway. ``make_pki()``
makes a throwaway CA with server and client certificates (``openssl``) for a TLS listener.

Delivery tests set ``max_inflight_messages 0`` and ``max_queued_messages 0`` so the broker itself
never drops a message queued for a slow or reconnecting subscriber: any loss a test sees is then
the gateway's, not the broker's queue limit.

Where the broker is not installed the tests skip with an install hint; under ``CI=true`` they fail,
because CI installs it and a silent skip would hide a broken set-up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
INSTALL_HINT = "Mosquitto is not installed: apt-get install mosquitto (Debian package 'mosquitto')"

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def require_program(name: str) -> str:
    """Absolute path of a Mosquitto program; skip (fail under CI) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        if IN_CI:
            pytest.fail(f"{name} not found and CI=true requires it. {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    return found


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """Files for a TLS listener. ``require_certificate`` makes client certificates mandatory and
    (with ``use_identity_as_username``) turns the certificate's CN into the ACL user name."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False
    use_identity_as_username: bool = False


class Broker:
    """One private Mosquitto process; use as a context manager or call ``start``/``stop``."""

    def __init__(self, workdir: Path, *, allow_anonymous: bool = True,
                 users: Mapping[str, str] | None = None, acl: str | None = None,
                 persistence: bool = False, message_size_limit: int = 0,
                 max_packet_size: int = 0, tls: BrokerTls | None = None,
                 extra_config: Sequence[str] = (), gateway_listener: bool = False) -> None:
        self.executable = require_program("mosquitto")
        self.host = "127.0.0.1"
        self.port = free_port()
        #: a second listener for the gateway alone (``gateway_listener``): ``start(gateway=False)``
        #: leaves it closed, so a test can set the broker up before the gateway gets in
        self.gateway_port = free_port() if gateway_listener else self.port
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "mosquitto.conf"
        self.log_file = workdir / "mosquitto.log"
        self.acl_file = workdir / "acl"
        self.password_file = workdir / "passwords"
        self.persistence_dir = workdir / "persistence"
        self.persistence_file = self.persistence_dir / "mosquitto.db"
        self._process: subprocess.Popen[bytes] | None = None
        self._write_config(allow_anonymous=allow_anonymous, users=users, acl=acl,
                           persistence=persistence, message_size_limit=message_size_limit,
                           max_packet_size=max_packet_size, tls=tls, extra=extra_config)

    # -----------------------------------------------------------------------------------------
    # configuration

    def _write_config(self, *, allow_anonymous: bool, users: Mapping[str, str] | None,
                      acl: str | None, persistence: bool, message_size_limit: int,
                      max_packet_size: int, tls: BrokerTls | None,
                      extra: Sequence[str]) -> None:
        lines = [
            "per_listener_settings false",
            # started as root, Mosquitto would otherwise switch to the 'mosquitto' user, which
            # cannot read this test's private folder
            "user root" if os.geteuid() == 0 else "",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "max_inflight_messages 0",
            "max_queued_messages 0",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if tls is not None:
            lines += [f"cafile {tls.ca_file}", f"certfile {tls.cert_file}",
                      f"keyfile {tls.key_file}", "tls_version tlsv1.2",
                      f"require_certificate {'true' if tls.require_certificate else 'false'}",
                      f"use_identity_as_username "
                      f"{'true' if tls.use_identity_as_username else 'false'}"]
        if persistence:
            self.persistence_dir.mkdir(exist_ok=True)
            # autosave 0: the database is written only on SIGUSR1 and clean shutdown, so a test
            # decides exactly what a SIGKILLed broker comes back with
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/",
                      "persistence_file mosquitto.db", "autosave_interval 0"]
        else:
            lines.append("persistence false")
        if message_size_limit:
            lines.append(f"message_size_limit {message_size_limit}")
        if max_packet_size:
            lines.append(f"max_packet_size {max_packet_size}")
        if users:
            self._write_passwords(users)
            lines.append(f"password_file {self.password_file}")
        if acl is not None:
            self.acl_file.write_text(acl, encoding="utf-8")
            lines.append(f"acl_file {self.acl_file}")
        lines += list(extra)
        self._config_lines = [line for line in lines if line]
        self._write_config_file(gateway=True)

    def _write_config_file(self, *, gateway: bool) -> None:
        lines = list(self._config_lines)
        if gateway and self.gateway_port != self.port:
            lines.insert(lines.index(f"listener {self.port} {self.host}") + 1,
                         f"listener {self.gateway_port} {self.host}")
        self.config_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _write_passwords(self, users: Mapping[str, str]) -> None:
        tool = require_program("mosquitto_passwd")
        self.password_file.write_text("", encoding="utf-8")
        for name, password in users.items():
            subprocess.run([tool, "-b", str(self.password_file), name, password], check=True,
                           capture_output=True, timeout=30)

    def set_acl(self, text: str) -> None:
        """Replace the ACL file and make the running broker re-read it (SIGHUP)."""
        self.acl_file.write_text(text, encoding="utf-8")
        self.reload()

    # -----------------------------------------------------------------------------------------
    # process control

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, gateway: bool = True) -> Broker:
        """Start (the gateway's listener too, unless ``gateway`` is False)."""
        if self.running:
            raise RuntimeError("broker already running")
        self._write_config_file(gateway=gateway)
        log = self.log_file.open("ab")
        try:
            self._process = subprocess.Popen(
                [self.executable, "-c", str(self.config_file)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode} at start: "
                                   f"{self.log_tail()}")
            if port_accepts(self.host, self.port) and (
                    not gateway or port_accepts(self.host, self.gateway_port)):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not accept on port {self.port} within "
                           f"{START_TIMEOUT_S} s: {self.log_tail()}")

    def stop(self) -> None:
        """Clean shutdown (SIGTERM; Mosquitto writes its persistence database), SIGKILL if it
        does not exit in time. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        self._process = None

    def kill(self) -> None:
        """Abrupt death: SIGKILL, nothing written to disk. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
        self._process = None

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same port and configuration."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def _signal(self, signum: int) -> None:
        if not self.running or self._process is None:
            raise RuntimeError("broker is not running")
        os.kill(self._process.pid, signum)

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration, ACL and password files."""
        self._signal(signal.SIGHUP)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is read or acknowledged."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def save_persistence(self, timeout: float = 10.0) -> None:
        """SIGUSR1: write the persistence database now; return once the file has changed."""
        before = self._db_signature()
        self._signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self._db_signature()
            if now is not None and now != before:
                # Mosquitto writes a temporary file and renames it: once renamed it is complete
                return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not write {self.persistence_file} within {timeout} s")

    def _db_signature(self) -> tuple[int, int] | None:
        try:
            st = self.persistence_file.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def wipe_persistence(self) -> None:
        """Delete the persistence database (only while the broker is stopped)."""
        if self.running:
            raise RuntimeError("stop the broker before wiping its persistence")
        if self.persistence_dir.exists():
            shutil.rmtree(self.persistence_dir)
            self.persistence_dir.mkdir()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and client certificates by name.

    ``clients[name]`` is ``(cert_file, key_file)``; the client certificate's CN is ``name``, which
    ``use_identity_as_username`` turns into the broker-side user name for ACLs.
    """

    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: Mapping[str, tuple[Path, Path]]

    def broker_tls(self, *, require_certificate: bool = True) -> BrokerTls:
        return BrokerTls(self.ca_file, self.server_cert, self.server_key,
                         require_certificate=require_certificate,
                         use_identity_as_username=require_certificate)


def make_pki(folder: Path, clients: Sequence[str] = (), *, ca_name: str = "test-ca") -> Pki:
    """Generate the CA, server and client certificates (EC P-256, valid two days) in ``folder``."""
    openssl = require_program("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60, cwd=folder)

    def new_key(name: str) -> Path:
        key = folder / f"{name}.key"
        run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
            str(key))
        return key

    def issue(name: str, cn: str, extensions: str) -> tuple[Path, Path]:
        key = new_key(name)
        csr, cert, ext = folder / f"{name}.csr", folder / f"{name}.crt", folder / f"{name}.ext"
        ext.write_text(extensions, encoding="ascii")
        run("req", "-new", "-key", str(key), "-subj", f"/CN={cn}", "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert))
        return cert, key

    ca_key = new_key("ca")
    ca_cert = folder / "ca.crt"
    run("req", "-x509", "-new", "-key", str(ca_key), "-subj", f"/CN={ca_name}", "-days", "2",
        "-sha256", "-out", str(ca_cert))
    server_cert, server_key = issue(
        "server", "127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    issued = {name: issue(f"client-{name}", name, "extendedKeyUsage=clientAuth\n")
              for name in clients}
    return Pki(ca_cert, server_cert, server_key, issued)
