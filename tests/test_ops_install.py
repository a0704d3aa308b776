"""scripts/install.sh into a scratch root: the tree it leaves, what a second run keeps, and what
uninstall removes and keeps.

The script runs for real (`--root DIR`, as when preparing an image): its own pip builds and
installs the package from a copy of this checkout into DIR/opt/bms-gateway/venv. Only the
dependencies are not downloaded again: the test makes that virtual environment beforehand with a
path file pointing at the running environment's packages (numba, numpy, ... would take a minute to
install), and passes pip `--no-deps` — as a gateway upgraded in place has its dependencies already.
pip itself comes the same way; building the package fetches its build backend (setuptools) through
pip's configured index, as any install does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "install.sh"
OPT = "/opt/bms-gateway"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _prepared_root(tmp_path: Path) -> Path:
    """A root whose /opt/bms-gateway/venv has the gateway's dependencies (see module doc)."""
    root = tmp_path / "root"
    venv = root / OPT.lstrip("/") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    purelib = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
         "['purelib'])"], capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    (purelib / "gateway-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def _in(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _checkout_files() -> set[str]:
    return {p.name for p in REPO.iterdir()}


def test_install_upgrade_and_uninstall_in_a_scratch_root(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    root = _prepared_root(tmp_path)
    before = _checkout_files()

    done = _run("install", "--root", str(root), "--pip-option=--no-deps", "--can",
                "--bitrate", "250000", "--vcan")
    assert done.returncode == 0, done.stderr
    assert _checkout_files() == before, "the install left files in the checkout"

    # the package: a copy in its own virtual environment, on the PATH
    venv_python = _in(root, f"{OPT}/venv/bin/python")
    # run from elsewhere: from the checkout, its own gateway/ would be imported first
    where = subprocess.run([str(venv_python), "-c", "import gateway; print(gateway.__file__)"],
                           capture_output=True, text=True, check=True, timeout=60,
                           cwd=tmp_path).stdout
    assert where.startswith(str(_in(root, OPT))), where
    assert os.readlink(_in(root, "/usr/local/bin/bms-gateway")) == f"{OPT}/venv/bin/bms-gateway"
    for shipped in ("dbc/bms_reference.dbc", "profiles/reference.toml", "README.md",
                    "docs/operations.md", "config/gateway.example.toml"):
        assert _in(root, f"{OPT}/{shipped}").is_file(), shipped

    # the configuration: the example, with the profile where the install put it
    config_file = _in(root, "/etc/bms-gateway/config.toml")
    assert config_file.stat().st_mode & 0o777 == 0o644
    config = tomllib.loads(config_file.read_text())
    example = tomllib.loads((REPO / "config" / "gateway.example.toml").read_text())
    assert config["profile"]["path"] == f"{OPT}/profiles/reference.toml"
    example["profile"]["path"] = config["profile"]["path"]
    assert config == example
    assert _in(root, "/etc/credstore").stat().st_mode & 0o777 == 0o700

    # the installed command accepts it (paths mapped into the scratch root)
    checked = tmp_path / "checked.toml"
    checked.write_text(config_file.read_text()
                       .replace(f'"{OPT}/', f'"{_in(root, OPT)}/')
                       .replace('"/var/lib/bms-gateway/', f'"{tmp_path}/'))
    ok = subprocess.run([str(_in(root, f"{OPT}/venv/bin/bms-gateway")), "check-config", "-c",
                         str(checked)], capture_output=True, text=True, timeout=120,
                        cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout

    # units: the service enabled, CAN interfaces for systemd-networkd
    unit = _in(root, "/etc/systemd/system/bms-gateway.service")
    assert unit.read_text() == (REPO / "systemd" / "bms-gateway.service").read_text()
    wants = _in(root, "/etc/systemd/system/multi-user.target.wants/bms-gateway.service")
    if shutil.which("systemctl") is not None:
        assert os.readlink(wants) == "/etc/systemd/system/bms-gateway.service"
    can0 = _in(root, "/etc/systemd/network/can0.network").read_text()
    assert "\nBitRate=250000\n" in can0
    for name in ("vcan0.netdev", "vcan0.network"):
        assert (_in(root, f"/etc/systemd/network/{name}").read_text()
                == (REPO / "systemd" / name).read_text())

    # a second run upgrades the package and keeps what the operator changed
    config_file.write_text(config_file.read_text().replace('id = "gw-0001"', 'id = "site-7"'))
    again = _run("install", "--root", str(root), "--pip-option=--no-deps", "--can")
    assert again.returncode == 0, again.stderr
    assert 'id = "site-7"' in config_file.read_text()
    assert "kept the existing /etc/bms-gateway/config.toml" in again.stderr
    assert "\nBitRate=250000\n" in _in(root, "/etc/systemd/network/can0.network").read_text()

    # uninstall: the service and what the script added go; configuration and store stay
    store = _in(root, "/var/lib/private/bms-gateway/store.sqlite")
    store.parent.mkdir(parents=True)
    store.write_bytes(b"undelivered records")
    credential = _in(root, "/etc/credstore/bms-gateway.mqtt-password")
    credential.write_text("s3cret\n")
    gone = _run("uninstall", "--root", str(root))
    assert gone.returncode == 0, gone.stderr
    for removed in (OPT, "/usr/local/bin/bms-gateway", "/etc/systemd/system/bms-gateway.service",
                    "/etc/systemd/network/can0.network", "/etc/systemd/network/vcan0.netdev",
                    "/etc/systemd/network/vcan0.network"):
        assert not os.path.lexists(_in(root, removed)), removed
    assert not os.path.lexists(wants)
    assert 'id = "site-7"' in config_file.read_text()
    assert store.read_bytes() == b"undelivered records"
    assert credential.exists()

    purged = _run("uninstall", "--root", str(root), "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not config_file.exists()
    assert not store.exists()
    assert not credential.exists()


def test_network_files_already_there_are_kept_and_not_removed(tmp_path: Path) -> None:
    """A site's own can0.network (another bit rate, say) is neither overwritten nor removed."""
    root = _prepared_root(tmp_path)
    own = _in(root, "/etc/systemd/network/can0.network")
    own.parent.mkdir(parents=True)
    own.write_text("[Match]\nName=can0\n[CAN]\nBitRate=125000\n")
    done = _run("install", "--root", str(root), "--pip-option=--no-deps", "--can")
    assert done.returncode == 0, done.stderr
    assert "kept the existing /etc/systemd/network/can0.network" in done.stderr
    assert _run("uninstall", "--root", str(root)).returncode == 0
    assert own.read_text().endswith("BitRate=125000\n")


def test_bad_options_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = _run("install", "--root", str(root), "--bitrate", "fast")
    assert done.returncode != 0
    assert "--bitrate must be bit/s" in done.stderr
    assert not any(root.rglob("*"))
    unknown = _run("install", "--root", str(root), "--colour")
    assert unknown.returncode == 2
    assert "unknown option: --colour" in unknown.stderr
