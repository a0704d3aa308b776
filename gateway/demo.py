"""``bms-gateway demo``: the firmware simulator and the gateway together, with a live view.

Publishes to ``--broker``, or to localhost:1883 if a broker answers there, or else to a private
mosquitto started on a free loopback port. Without mosquitto installed it says how to install it and
runs anyway: records are then kept in the store, to be delivered when a broker appears.
The view subscribes to the broker like any consumer would, and redraws one line per serial.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import Config, load_config
from gateway.errors import ConfigError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.toml"


def broker_answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrivateMosquitto:
    """A throwaway mosquitto on a free loopback port, for the demo only."""

    def __init__(self, binary: str) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="bms-demo-mosquitto-")
        self.port = free_port()
        conf = Path(self.dir.name) / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nlog_dest none\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not broker_answers("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the private mosquitto did not start")
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.dir.cleanup()


class LiveView:
    """Subscribes to ``{prefix}/#`` and redraws a line per serial once a second."""

    def __init__(self, host: str, port: int, prefix: str, out: TextIO) -> None:
        self.prefix = prefix
        self.out = out
        self.tty = out.isatty()
        self.packs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self._drawn = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"bms-demo-view-{free_port()}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        client.subscribe(f"{self.prefix}/+/+", qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            envelope = json.loads(msg.payload)
            serial, kind, records = envelope["serial"], envelope["kind"], envelope["records"]
        except (ValueError, KeyError, TypeError):
            return
        with self.lock:
            pack = self.packs.setdefault(serial, {"telemetry": 0, "health": 0, "events": 0})
            pack[kind] = pack.get(kind, 0) + len(records)
            last = records[-1]
            pack["seq"] = last.get("seq")
            pack["ts"] = last.get("ts")
            if kind == "telemetry":
                pack["last"] = last

    def draw(self, elapsed: float) -> None:
        with self.lock:
            lines = [f"bms-gateway demo — {elapsed:5.0f} s — records received per serial "
                     f"(topic {self.prefix}/<serial>/<kind>)"]
            if not self.packs:
                lines.append("  waiting for the first records…")
            for serial, p in sorted(self.packs.items()):
                t = p.get("last", {})
                figures = ""
                if t:
                    figures = (f"  {t.get('pack_voltage_v', 0):7.2f} V "
                               f"{t.get('current_a', 0):8.2f} A"
                               f"  SOC {t.get('bms_soc_pct', 0):5.1f} %"
                               f"  cells {t.get('cell_voltage_min_v', 0):.4f}…"
                               f"{t.get('cell_voltage_max_v', 0):.4f} V")
                lines.append(f"  {serial}: telemetry {p['telemetry']:6d}  health {p['health']:3d}"
                             f"  events {p['events']:3d}  seq {p.get('seq')}  ts {p.get('ts')}"
                             f"{figures}")
        if self.tty:
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self.out.write("\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            self.out.write(" | ".join(lines[1:]) + "\n")
        self.out.flush()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _pick_broker(broker: str | None, stack: ExitStack, out: TextIO) -> tuple[str, int] | None:
    if broker:
        host, _, port = broker.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--broker must be HOST:PORT, got {broker!r}")
        return host, int(port)
    if broker_answers("localhost", 1883):
        out.write("demo: publishing to the broker on localhost:1883\n")
        return "localhost", 1883
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None)
    if binary is None:
        return None
    private = PrivateMosquitto(binary)
    stack.callback(private.close)
    out.write(f"demo: started a private mosquitto on 127.0.0.1:{private.port}\n")
    return "127.0.0.1", private.port


def run_demo(*, seconds: float | None, broker: str | None, config_path: Path | None,
             out: TextIO = sys.stdout) -> int:
    from gateway.app import Gateway
    from gateway.logging import configure_logging

    config: Config = load_config(config_path or DEMO_CONFIG)
    with ExitStack() as stack:
        endpoint = _pick_broker(broker, stack, out)
        if endpoint is None:
            out.write("demo: no MQTT broker answers on localhost:1883 and mosquitto is not "
                      "installed.\n      Install it with:  sudo apt-get install -y mosquitto\n"
                      "      Running anyway: records are kept in the store "
                      f"({config.store.path}) until a broker is reachable.\n")
            endpoint = (config.mqtt.host, config.mqtt.port)
        host, port = endpoint
        config = dataclasses.replace(config,
                                     mqtt=dataclasses.replace(config.mqtt, host=host, port=port))
        # the live view is the demo's output; the gateway's own log stays quiet unless it matters
        configure_logging("warning", config.gateway.log_format)
        out.write(f"demo: gateway {config.gateway.id}, simulated pack "
                  f"{config.source.simulator.serial} ({config.source.simulator.cells} cells), "
                  f"store {config.store.path}\n")
        out.flush()
        gateway = Gateway(config)
        gateway.supervisor.install_signal_handlers()
        view = LiveView(host, port, config.mqtt.topic_prefix, out)
        stack.callback(view.close)
        started = time.monotonic()
        finished = threading.Event()

        def redraw() -> None:
            while not finished.wait(1.0):
                elapsed = time.monotonic() - started
                view.draw(elapsed)
                if seconds is not None and elapsed >= seconds:
                    gateway.supervisor.request_stop()

        drawer = threading.Thread(target=redraw, name="demo-view", daemon=True)
        drawer.start()
        code = gateway.run()
        finished.set()
        drawer.join(2)
        view.draw(time.monotonic() - started)
        return code
