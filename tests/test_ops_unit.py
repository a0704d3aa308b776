"""The hardened unit: what `systemd-analyze security` rates it, what it grants, and what it leaves
out on purpose (issue: operations and security)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "bms-gateway.service"
MAX_EXPOSURE = 2.0


def _settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, in order; a key given several times keeps every value."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _analyze() -> str:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing (Debian package systemd)")
        pytest.skip("systemd-analyze is not installed")
    return analyze


def _runnable_unit(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this environment's console script, which
    `systemd-analyze` insists exists."""
    executable = Path(sys.executable).parent / "bms-gateway"
    if not executable.exists():
        pytest.skip("the bms-gateway console script is not installed in this environment")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/bms-gateway/venv/bin/bms-gateway",
                                             str(executable)))
    return unit


def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    unit = _runnable_unit(tmp_path)
    done = subprocess.run([_analyze(), "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, done.stdout
    # what the hardening is for passes (listed by name: newer systemd versions add checks)
    failing = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("✗")}
    assert failing.isdisjoint({
        "User=/DynamicUser=", "NoNewPrivileges=", "ProtectSystem=", "ProtectHome=",
        "PrivateTmp=", "PrivateDevices=", "PrivateUsers=", "ProtectKernelModules=",
        "ProtectKernelTunables=", "ProtectControlGroups=", "RestrictSUIDSGID=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN", "CapabilityBoundingSet=~CAP_NET_ADMIN",
        "CapabilityBoundingSet=~CAP_SYS_PTRACE", "RestrictNamespaces=~user",
        "RestrictAddressFamilies=~AF_PACKET", "RestrictAddressFamilies=~AF_NETLINK",
        "SystemCallFilter=~@privileged", "SystemCallFilter=~@mount", "SystemCallFilter=~@module",
        "SystemCallArchitectures=", "UMask=",
    }), done.stdout


def test_unit_grants_no_privilege_and_only_the_needed_sockets() -> None:
    unit = _settings()
    assert unit["DynamicUser"] == ["yes"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["AmbientCapabilities"] == [""]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["RestrictAddressFamilies"] == ["AF_CAN AF_INET AF_INET6 AF_UNIX"]
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["StateDirectory"] == ["bms-gateway"]
    assert unit["CacheDirectory"] == ["bms-gateway"]
    assert unit["ConfigurationDirectory"] == ["bms-gateway"]
    assert any("NUMBA_CACHE_DIR=%C/bms-gateway/numba" in e for e in unit["Environment"])
    # numba's JIT cannot run under MemoryDenyWriteExecute: left out, with the reason written
    assert "MemoryDenyWriteExecute" not in unit
    comments = " ".join(line.lstrip("# ") for line in UNIT.read_text().splitlines()
                        if line.startswith("#"))
    why = comments[comments.index("MemoryDenyWriteExecute="):][:500]
    assert "numba" in why and "left out" in why, "the unit must say why it is not set"


def test_secrets_come_as_credentials_the_example_configuration_names() -> None:
    """The unit loads the password and the client key from the credential store by name (a
    missing one is skipped by systemd), and the example shows how the configuration reads them."""
    credentials = dict(v.split(":", 1) for v in _settings()["LoadCredential"])
    assert credentials == {"mqtt-password": "bms-gateway.mqtt-password",
                           "mqtt-client-key": "bms-gateway.mqtt-client-key"}
    # names without a slash: looked up in /etc/credstore, and skipped when absent
    assert not any("/" in source for source in credentials.values())
    example = (REPO / "config" / "gateway.example.toml").read_text()
    for name in credentials:
        assert f'"${{CREDENTIALS_DIRECTORY}}/{name}"' in example
        assert f"/etc/credstore/{credentials[name]}" in example


def test_network_files_bring_up_can_without_the_daemon_needing_a_capability() -> None:
    can0 = (REPO / "systemd" / "can0.network").read_text()
    assert re.search(r"^\[CAN\]$", can0, re.M)
    assert re.search(r"^BitRate=\d+$", can0, re.M)
    # bus-off restart by the controller itself
    assert re.search(r"^RestartSec=\S+$", can0, re.M)
    vcan = (REPO / "systemd" / "vcan0.netdev").read_text()
    assert re.search(r"^Kind=vcan$", vcan, re.M)
