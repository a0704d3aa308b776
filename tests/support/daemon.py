"""Run ``bms-gateway`` and ``firmware_sim`` as child processes, as an operator would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "profiles"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a TOML configuration from ``{"section.sub": {key: value}}``."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def gateway_config(tmp: Path, *, broker_port: int, source: Mapping[str, Any],
                   gateway_id: str = "gw-test", edge: Mapping[str, Any] | None = None,
                   mqtt: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                   profile: Mapping[str, Any] | None = None, name: str = "gateway.toml") -> Path:
    sections: dict[str, dict[str, Any]] = {
        "gateway": {"id": gateway_id, "log_format": "json", "status_interval_s": 0.5},
        "source": {k: v for k, v in source.items() if not isinstance(v, dict)},
        "profile": dict(profile or {"path": str(PROFILES / "reference.toml")}),
        "edge": {"telemetry_interval_s": 0.0, "health_interval_s": 5.0, **(edge or {})},
        "store": {"path": str(tmp / "store.sqlite")},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 1.0, "publish_interval_s": 0.1, **(mqtt or {})},
    }
    for key, value in source.items():
        if isinstance(value, dict):
            sections[f"source.{key}"] = dict(value)
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    return write_config(tmp / name, sections)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("NOTIFY_SOCKET", None)
    return env


class Daemon:
    """``bms-gateway run -c FILE`` as a child process with its log in a file."""

    def __init__(self, config: Path, log: Path, args: Sequence[str] | None = None) -> None:
        self.config = config
        self.log = log
        self.args = list(args) if args is not None else ["run", "-c", str(config)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *self.args],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                         env=child_env())
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the log says the stages run (numba kernels are warm by then)."""
        self.wait_log("gateway_ready", timeout)

    def wait_log(self, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f'"{event}"' in self.log.read_text(errors="replace"):
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"no {event} within {timeout} s:\n{self.tail()}")

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def status(config: Path, *, wrap: Callable[[list[str]], list[str]] | None = None,
           ) -> dict[str, Any]:
    """``bms-gateway status --json``; ``wrap`` turns the command into another that runs it
    (in the daemon's mount namespace, say)."""
    command = [sys.executable, "-m", "gateway", "status", "-c", str(config), "--json"]
    out = subprocess.run(wrap(command) if wrap is not None else command,
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=child_env(),
                         check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def simulate(args: Sequence[str], *, timeout: float = 300.0) -> None:
    """Run ``python -m firmware_sim ARGS`` to completion."""
    subprocess.run([sys.executable, "-m", "firmware_sim", *args], check=True, timeout=timeout,
                   cwd=REPO, env=child_env(), capture_output=True)
