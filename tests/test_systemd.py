"""The shipped systemd unit: valid for systemd itself, and saying what the daemon relies on."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "bms-gateway.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_is_notify_with_watchdog_restart_and_directories() -> None:
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert "78" in service["RestartPreventExitStatus"].split()
    assert service["StateDirectory"] == "bms-gateway"
    assert service["CacheDirectory"] == "bms-gateway"
    assert "NUMBA_CACHE_DIR=%C/bms-gateway/numba" in service["Environment"]
    assert "run -c /etc/bms-gateway/config.toml" in service["ExecStart"]
    # the example's default store path is inside the StateDirectory
    example = (REPO / "config" / "gateway.example.toml").read_text()
    assert 'path = "/var/lib/bms-gateway/store.sqlite"' in example


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing (Debian package systemd)")
        pytest.skip("systemd-analyze is not installed")
    executable = Path(sys.executable).parent / "bms-gateway"
    if not executable.exists():
        pytest.skip("the bms-gateway console script is not installed in this environment")
    unit = tmp_path / "bms-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/bms-gateway/venv/bin/bms-gateway",
                                             str(executable)))
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "bms-gateway.service" in line]
    assert done.returncode == 0, done.stderr
    assert problems == []
