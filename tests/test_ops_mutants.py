"""Bad input at start-up: hundreds of mutants (bit flips, truncation, zero fill) of a
configuration, a DBC, a profile and a store file.

Configuration, DBC and profile go through ``bms-gateway check-config`` in-process (it loads all
three, as start-up does): each mutant is either still valid (exit 0) or refused with exit 78 and
one line naming the file — and the line or key where the format has them — never a traceback,
never a hang (each mutant gets a few seconds, enforced by an alarm). Store mutants are opened as
the daemon opens them: a corrupt one is moved aside, kept byte for byte, and reported
(``store_corrupt_moved_aside``), and the fresh store never reuses a sequence number; one that
passes the checks works. A few go through the real daemon too.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from structlog.testing import capture_logs

from gateway.cli import main
from gateway.errors import StoreError
from gateway.model import Record, RecordKind
from gateway.store.sqlite import SqliteStore
from tests.support.broker import free_port
from tests.support.daemon import REPO, child_env, gateway_config

MUTANTS = 200
SECONDS_EACH = 5.0
EXAMPLE = REPO / "config" / "gateway.example.toml"
PROFILE = REPO / "profiles" / "reference.toml"
DBC = REPO / "dbc" / "bms_reference.dbc"


# ---------------------------------------------------------------------------------------------
# mutation


def mutants(original: bytes, seed: int, n: int = MUTANTS) -> Iterator[tuple[str, bytes]]:
    """``n`` mutants of ``original``, a third each: bit flips, truncation, zero fill."""
    rng = random.Random(seed)
    for i in range(n):
        data = bytearray(original)
        kind = ("flip", "truncate", "zero")[i % 3]
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(len(data))
                data[position] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del data[rng.randrange(len(data)):]
        else:
            start = rng.randrange(len(data))
            length = rng.randint(1, max(1, len(data) // 8))
            data[start:start + length] = bytes(len(data[start:start + length]))
        yield f"{kind}#{i}", bytes(data)


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the test's thread after ``seconds``; a hang that an alarm cannot
    interrupt (inside C code) is caught by faulthandler, which dumps every thread and exits."""
    def on_alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds * 6, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str
    code: int | None
    stderr: str
    problem: str | None  # set when the mutant broke a promise


def check_config_mutants(target: Path, original: bytes, config: Path, seed: int,
                         capsys: pytest.CaptureFixture[str],
                         where: Callable[[str], bool]) -> list[Outcome]:
    """Write each mutant to ``target`` and run ``check-config -c config``."""
    outcomes = []
    for name, data in mutants(original, seed):
        target.write_bytes(data)
        problem = None
        code: int | None = None
        started = time.monotonic()
        try:
            with deadline(SECONDS_EACH):
                code = main(["check-config", "-c", str(config)])
        except Hang as exc:
            problem = f"hang: {exc}"
        except BaseException as exc:  # what would have been a traceback in a terminal
            problem = f"{type(exc).__name__}: {exc}"
        err = capsys.readouterr().err
        if problem is None:
            if code not in (0, 78):
                problem = f"exit {code}"
            elif "Traceback" in err:
                problem = "traceback on stderr"
            elif code == 78 and not where(err):
                problem = "the message does not say where"
            elif time.monotonic() - started > SECONDS_EACH:
                problem = "too slow"
        outcomes.append(Outcome(name, code, err.strip(), problem))
    return outcomes


def assert_all_kept_their_promise(outcomes: list[Outcome]) -> None:
    broken = [o for o in outcomes if o.problem]
    assert broken == [], "\n".join(f"{o.name}: {o.problem}: {o.stderr[:300]}" for o in broken)
    refused = [o for o in outcomes if o.code == 78]
    # the mutants did bite: most are refused (the rest stayed valid, e.g. a flip in a string)
    assert len(refused) >= len(outcomes) // 2, [o.stderr for o in outcomes if o.code == 0][:5]


def _names_place(message: str, path: Path) -> bool:
    return str(path) in message and bool(re.search(r"line \d+|key '[^']+'", message))


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")) + "\n"


# ---------------------------------------------------------------------------------------------
# configuration, DBC, profile


def test_configuration_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    original = _strip_comments(EXAMPLE.read_text()).replace(
        'path = "../profiles/reference.toml"', f'path = "{PROFILE}"').encode()
    config.write_bytes(original)
    assert main(["check-config", "-c", str(config)]) == 0, capsys.readouterr().err
    capsys.readouterr()

    def where(message: str) -> bool:
        # a damaged profile path names the profile file and the key that named it
        return _names_place(message, config) or ("profile.path" in message)

    outcomes = check_config_mutants(config, original, config, 1, capsys, where)
    assert_all_kept_their_promise(outcomes)


def test_profile_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "profile.toml"
    original = _strip_comments(PROFILE.read_text()).replace(
        'dbc = "../dbc/bms_reference.dbc"', f'dbc = "{DBC}"').encode()
    profile.write_bytes(original)
    config = gateway_config(tmp_path, broker_port=1883, source={"kind": "bus"},
                            profile={"path": str(profile)})
    assert main(["check-config", "-c", str(config)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    outcomes = check_config_mutants(profile, original, config, 2, capsys,
                                    lambda message: _names_place(message, profile))
    assert_all_kept_their_promise(outcomes)


def test_dbc_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dbc = tmp_path / "bms.dbc"
    original = DBC.read_bytes()
    config = gateway_config(tmp_path, broker_port=1883, source={"kind": "bus"},
                            profile={"path": str(PROFILE), "dbc": str(dbc)})
    dbc.write_bytes(original)
    assert main(["check-config", "-c", str(config)]) == 0, capsys.readouterr().err
    capsys.readouterr()

    def where(message: str) -> bool:
        # a DBC error names the DBC; a DBC that parses but lacks what the profile binds names
        # the profile's key
        return str(dbc) in message or _names_place(message, PROFILE)

    outcomes = check_config_mutants(dbc, original, config, 3, capsys, where)
    assert_all_kept_their_promise(outcomes)
    syntax = [o for o in outcomes if str(dbc) in o.stderr and "syntax error" in o.stderr]
    assert syntax and all(re.search(r"line \d+", o.stderr) for o in syntax)


# ---------------------------------------------------------------------------------------------
# store


def _records(n: int, start: float = 1_795_485_342.0) -> list[Record]:
    kinds = (RecordKind.TELEMETRY, RecordKind.HEALTH, RecordKind.EVENTS)
    return [Record(f"PACK-{i % 3}", kinds[i % 3], start + i,
                   {"current_a": float(i), "note": "x" * (i % 50)}) for i in range(n)]


def _open(path: Path) -> SqliteStore:
    return SqliteStore(path, max_bytes=64 * 1024 * 1024, max_records=100_000)


@pytest.fixture(scope="module")
def healthy_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """A store file with records, a dead letter, checkpoints and meta, closed cleanly."""
    path = tmp_path_factory.mktemp("store") / "store.sqlite"
    store = _open(path)
    seqs = store.commit(_records(400), {"edge/PACK-0": b"\x01" * 300})
    store.ack(seqs[:150])
    leased = store.lease(1)
    store.reject([leased[0].seq], "too_large")
    store.put_meta("status", json.dumps({"metrics": {}}))
    store.close()
    assert not Path(f"{path}-wal").exists()
    return path.read_bytes(), max(seqs)


def test_store_mutants(tmp_path: Path, healthy_store: tuple[bytes, int]) -> None:
    original, last_seq = healthy_store
    broken: list[str] = []
    moved = refused = 0
    for name, data in mutants(original, 4):
        folder = tmp_path / name.replace("#", "-")
        folder.mkdir()
        path = folder / "store.sqlite"
        path.write_bytes(data)
        try:
            with deadline(SECONDS_EACH), capture_logs() as logs:
                try:
                    store = _open(path)
                except StoreError as exc:
                    # refused on purpose (another program's database): named, nothing moved
                    assert str(path) in str(exc)
                    assert path.read_bytes() == data
                    refused += 1
                    continue
                aside = [e for e in logs if e["event"] == "store_corrupt_moved_aside"]
                if aside:
                    moved += 1
                    kept = Path(aside[0]["moved_to"])
                    assert kept.read_bytes() == data, "the corrupt file was not kept as it was"
                    assert aside[0]["log_level"] == "error" and aside[0]["reason"]
                    assert store.stats().records == 0
                # the store works either way, and a new record's seq was never handed out
                leased = store.lease(100_000)
                assert all(r.seq <= last_seq for r in leased)
                store.ack([r.seq for r in leased])
                (new_seq,) = store.commit(_records(1, start=1_800_000_000.0))
                assert new_seq > last_seq, f"seq {new_seq} reused (old file went to {last_seq})"
                store.close()
        except Exception as exc:  # one line per broken promise, all reported at the end
            broken.append(f"{name}: {type(exc).__name__}: {exc}")
        shutil.rmtree(folder)
    assert broken == [], "\n".join(broken)
    assert moved >= MUTANTS // 3, (moved, refused)  # truncations alone are a third


# ---------------------------------------------------------------------------------------------
# through the real daemon


def _damaged_stores(original: bytes) -> dict[str, bytes]:
    header_zeroed = bytes(100) + original[100:]
    return {"truncated": original[: len(original) // 3],
            "header_zeroed": header_zeroed,
            "not_a_database": b"this is not an SQLite file\n" * 100}


def test_the_daemon_moves_a_corrupt_store_aside_and_runs(
        tmp_path: Path, healthy_store: tuple[bytes, int]) -> None:
    original, _ = healthy_store
    for case, data in _damaged_stores(original).items():
        folder = tmp_path / case
        folder.mkdir()
        config = gateway_config(folder, broker_port=free_port(),
                                source={"kind": "simulator"})
        (folder / "store.sqlite").write_bytes(data)
        log = folder / "daemon.log"
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=child_env())
        try:
            deadline_at = time.monotonic() + 120
            while '"gateway_ready"' not in log.read_text(errors="replace"):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline_at, log.read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        text = log.read_text()
        assert code == 0, text
        assert "Traceback" not in text
        aside = [json.loads(line) for line in text.splitlines()
                 if '"store_corrupt_moved_aside"' in line]
        assert len(aside) == 1, text
        assert Path(aside[0]["moved_to"]).read_bytes() == data
        status = subprocess.run([sys.executable, "-m", "gateway", "status", "-c", str(config)],
                                capture_output=True, text=True, timeout=60, cwd=REPO,
                                env=child_env(), check=True).stdout
        assert f"a corrupt store was moved aside and kept: {aside[0]['moved_to']}" in status


@pytest.mark.parametrize(("damage", "where"), [
    (lambda text: text.replace("[mqtt]", "[mqtt"), r"line \d+"),
    (lambda text: text.replace('[gateway]\n', '[gateway]\nlog_levle = "info"\n'),
     r"key 'gateway.log_levle'"),
    (lambda text: text + "\n[source.simulator]\ncells = 100000\n", r"key 'source.simulator"),
])
def test_the_daemon_refuses_a_bad_configuration_with_exit_78(
        tmp_path: Path, damage: Callable[[str], str], where: str) -> None:
    config = gateway_config(tmp_path, broker_port=free_port(), source={"kind": "simulator"})
    config.write_text(damage(config.read_text()))
    done = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=child_env())
    assert done.returncode == 78, done.stderr
    assert "Traceback" not in done.stderr
    assert str(config) in done.stderr and re.search(where, done.stderr), done.stderr
