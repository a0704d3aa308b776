"""The command line as a user meets it: demo, status, replay errors, exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.support.broker import Broker
from tests.support.daemon import REPO, child_env, gateway_config, status
from tests.support.subscriber import Subscriber


def test_demo_shows_records_for_the_simulated_serial(tmp_path: Path) -> None:
    config = (REPO / "config" / "demo.toml").read_text().replace(
        'path = "../var/demo/store.sqlite"', f'path = "{tmp_path / "demo.sqlite"}"').replace(
        'path = "../profiles/reference.toml"', f'path = "{REPO / "profiles/reference.toml"}"')
    demo_config = tmp_path / "demo.toml"
    demo_config.write_text(config)
    with Broker(tmp_path / "broker") as broker, \
            Subscriber(broker.host, broker.port) as sub:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", "--seconds", "12", "--broker",
             f"127.0.0.1:{broker.port}", "-c", str(demo_config)],
            capture_output=True, text=True, timeout=120, cwd=REPO, env=child_env())
        assert done.returncode == 0, done.stderr[-3000:]
        # the live view prints a line per serial; the count grows while the demo runs
        counts = [int(m) for m in re.findall(r"SIM-0001: telemetry\s+(\d+)", done.stdout)]
        assert counts and counts[-1] >= 5, done.stdout[-2000:]
        assert counts == sorted(counts)
        # what the view counted came from the broker, as any consumer sees it
        serials = {env["serial"] for _, env in sub.envelopes()}
        assert serials == {"SIM-0001"}
        assert sub.statuses["bms/gateway/demo-gateway/status"][-1][0] == "offline"


def test_status_when_the_daemon_does_not_run(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, broker_port=1, source={"kind": "bus"})
    trace = tmp_path / "t.log"
    subprocess.run([sys.executable, "-m", "firmware_sim", "--scenario", "nominal", "--seconds",
                    "5", "--cells", "6", "--out", str(trace)], check=True, cwd=REPO,
                   capture_output=True, env=child_env())
    # a replay with an unreachable broker: records stay in the store
    done = subprocess.run([sys.executable, "-m", "gateway", "replay", "-c", str(config),
                           "--fast", str(trace)], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=child_env())
    assert done.returncode == 0, done.stderr[-3000:]
    s = status(config)
    for key in ("frames_rx_total", "frames_rejected_total", "records_committed_total",
                "records_acked_total", "records_dropped_total", "store_records",
                "broker_state"):
        assert key in s
    assert s["daemon_running"] is False
    assert s["broker_state"] == "daemon not running"
    import can
    assert s["frames_rx_total"] == sum(1 for _ in can.LogReader(trace))
    assert s["records_committed_total"] == s["store_records"] > 0
    assert s["records_acked_total"] == 0
    table = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(config)],
                           capture_output=True, text=True, timeout=60, cwd=REPO,
                           env=child_env(), check=True).stdout
    assert "records committed" in table and "SIM-0001" in table


def test_status_of_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, broker_port=1, source={"kind": "bus"})
    done = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=child_env())
    assert done.returncode != 0
    assert "store.sqlite" in done.stderr and "Traceback" not in done.stderr


def test_replay_of_an_empty_trace_exits_78_naming_it(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, broker_port=1, source={"kind": "bus"})
    empty = tmp_path / "empty.log"
    empty.write_text("")
    done = subprocess.run([sys.executable, "-m", "gateway", "replay", "-c", str(config),
                           "--fast", "--out", str(tmp_path / "o.jsonl"), str(empty)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=child_env())
    assert done.returncode == 78
    assert "empty.log" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_run_with_a_bad_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "g"\n[store]\nmax_bytes = -1\n')
    done = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=child_env())
    assert done.returncode == 78
    assert "store.max_bytes" in done.stderr


def test_status_json_is_one_object(tmp_path: Path) -> None:
    config = gateway_config(tmp_path, broker_port=1, source={"kind": "bus"})
    from gateway.store.sqlite import SqliteStore
    SqliteStore(tmp_path / "store.sqlite", max_bytes=1 << 20, max_records=1000).close()
    out = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(config), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=REPO, env=child_env(),
                         check=True).stdout
    assert isinstance(json.loads(out), dict)
