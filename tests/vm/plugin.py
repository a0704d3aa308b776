"""pytest plugin: the tests marked ``vcan`` run on real SocketCAN, directly or inside the test VM.

The tests are collected on the host as usual. Before the run loop starts, the plugin decides how to
run them:

- directly, where ``AF_CAN`` sockets work and this process can create (if missing) and raise
  ``vcan0`` — then nothing changes;
- otherwise in the test VM (:mod:`tests.vm.machine`), booted once for all of them: the guest runs
  ``python -m pytest -m vcan <their node ids>`` from the same repository and virtual environment,
  and appends every test report, serialized the way pytest-xdist does, to a shared file. Each
  host item then logs its guest reports instead of running, so pass, fail, skip, the failure's
  traceback and captured output, ``-x``, ``--junitxml`` and the summary all behave as usual.

A VM that cannot be built or does not boot skips the tests with the reason, except under
``CI=true``, where it fails them with the VM's console log. A VM that booted but did not report a
test (a crash, the time limit) fails that test either way.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

import pytest
from _pytest.reports import BaseReport, TestReport

from tests.vm.image import GUEST_SETUP_FAILED, VmError, cache_root, ensure_image
from tests.vm.machine import VmRun, qemu_binary, run_script, shared_path

MARKER = "vcan"
CHANNEL = "vcan0"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: set inside the guest: the vcan tests run there directly, and their reports go to this file
REPORTS_ENV = "BMS_GATEWAY_VM_REPORTS"

#: a hang guard for the whole VM run (boot, imports, every vcan test), far above the few minutes
#: it takes
VM_TIMEOUT_S = 1200.0

#: host environment variables the guest's tests see (everything else is left behind: a TMPDIR
#: under the host's /tmp, for one, would not exist in the guest)
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "CI", "PYTHONPATH", "PYTHONHASHSEED")

#: numba compiles the kernels of the gateway and of the simulator in seconds natively but in minutes
#: under TCG, and its cache is keyed by CPU model and features. So the host compiles them for a
#: generic x86-64 into a cache folder the guest shares (same source paths, same numba), by
#: simulating a few seconds into a trace and replaying it through the demo configuration's pipeline;
#: the guest then only loads them.
NUMBA_GUEST_ENV = {"NUMBA_CPU_NAME": "generic"}
WARM_UP_SIMULATED_S = 5

#: how many past runs' folders (script, reports, console log) are kept at least, for a look
KEPT_RUNS = 3

When = Literal["setup", "call", "teardown"]
Outcome = Literal["passed", "failed", "skipped"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("vcan").addoption(
        "--vcan-vm", action="store_true",
        help="run the tests marked vcan in the QEMU test VM even where the host has SocketCAN")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: needs kernel SocketCAN ({CHANNEL}); runs "
                            "in a QEMU VM where the host kernel has no CAN")
    config.pluginmanager.register(VcanRunner(config), "bms-gateway-vcan")


def in_test_vm() -> bool:
    """True inside the test VM's pytest run (a machine of its own, as root)."""
    return REPORTS_ENV in os.environ


def direct_socketcan_problem() -> str | None:
    """None when the tests can use vcan0 here; otherwise why not. Creates and raises vcan0 if
    needed (this needs root, as the tests that take vcan0 down and up again do anyway)."""
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
    except (AttributeError, OSError) as exc:
        return f"this kernel has no SocketCAN ({exc})"
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if ip is None:
        return "iproute2's ip is not installed"
    steps = [] if Path("/sys/class/net", CHANNEL).exists() else [
        [ip, "link", "add", "dev", CHANNEL, "type", "vcan"]]
    steps.append([ip, "link", "set", "dev", CHANNEL, "up"])
    for argv in steps:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            return f"'{' '.join(argv[1:])}' failed: {result.stderr.strip()}"
    return None


class VcanRunner:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.reports_file = os.environ.get(REPORTS_ENV)
        self.vm_items: set[str] = set()
        self.reports: dict[str, list[BaseReport]] = defaultdict(list)
        self.collect_errors: list[BaseReport] = []
        self.run: VmRun | None = None
        self.release = ""
        self.unavailable: str | None = None

    # -- the guest side: append every report to the shared file -------------------------------

    def _record(self, report: BaseReport) -> None:
        if self.reports_file is None:
            return
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        with open(self.reports_file, "a", encoding="utf-8") as out:
            out.write(json.dumps(data) + "\n")

    def pytest_runtest_logreport(self, report: TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._record(report)

    # -- the host side --------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """Run the VM (when needed) before the loop, outside any test's own time limit."""
        if self.reports_file is not None or self.config.option.collectonly:
            return
        if session.testsfailed and not self.config.option.continue_on_collection_errors:
            return
        items = [item for item in session.items if item.get_closest_marker(MARKER)]
        if not items:
            return
        why = ("--vcan-vm was given" if self.config.getoption("vcan_vm")
               else direct_socketcan_problem())
        if why is None:
            return
        self.vm_items = {item.nodeid for item in items}
        self._run_vm([item.nodeid for item in items], why)

    def _say(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"vcan: {line}")

    def _run_vm(self, nodeids: list[str], why: str) -> None:
        try:
            qemu_binary()
            image = ensure_image()
            self.release = image.release
            folder = _new_run_folder()
            reports = folder / "reports.jsonl"
            script = folder / "run.sh"
            numba_env = {**NUMBA_GUEST_ENV, "NUMBA_CACHE_DIR": str(shared_path(
                cache_root() / "numba"))}
            script.write_text(self._script(nodeids, reports, numba_env), encoding="utf-8")
            self._say(f"{why}: running {len(nodeids)} tests in a QEMU VM "
                      f"(kernel {image.release}); console log {folder / 'console.log'}")
            self._warm_numba(numba_env, folder)
            self.run = run_script(image, script, folder / "console.log", timeout_s=VM_TIMEOUT_S)
        except VmError as exc:
            self.unavailable = f"the test VM is unavailable: {exc}"
            self._say(self.unavailable)
            return
        if reports.is_file():
            for line in reports.read_text(encoding="utf-8").splitlines():
                report = self.config.hook.pytest_report_from_serializable(
                    config=self.config, data=json.loads(line))
                if isinstance(report, TestReport):
                    report.sections.append(("vcan VM", f"ran in the test VM, kernel "
                                            f"{self.release}; console log {self.run.console}"))
                    self.reports[report.nodeid].append(report)
                else:
                    self.collect_errors.append(report)
        ready = ("never" if self.run.ready_after_s is None
                 else f"after {self.run.ready_after_s:.1f} s")
        self._say(f"VM ready {ready}, done after {self.run.wall_s:.1f} s: {self.run.describe()}")

    def _warm_numba(self, numba_env: dict[str, str], folder: Path) -> None:
        """Fill the guest's numba cache on the host (see :data:`NUMBA_GUEST_ENV`). A failure is
        only reported: the guest then compiles for itself, slowly, and its tests show the error."""
        trace = folder / "warm-up.log"
        steps = [
            ["-m", "firmware_sim", "--seconds", str(WARM_UP_SIMULATED_S), "--out", str(trace)],
            ["-m", "gateway", "replay", "--fast", "-c", "config/demo.toml",
             "--out", str(folder / "warm-up.jsonl"), str(trace)],
        ]
        for step in steps:
            result = subprocess.run([sys.executable, *step], cwd=self.config.rootpath,
                                    env={**os.environ, **numba_env}, capture_output=True,
                                    text=True, timeout=600, check=False)
            if result.returncode != 0:
                self._say(f"compiling the numba kernels for the VM failed at "
                          f"'{' '.join(step)}': {result.stderr.strip()[-1500:]}")
                return

    def _script(self, nodeids: list[str], reports: Path, numba_env: dict[str, str]) -> str:
        env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        env |= numba_env
        env[REPORTS_ENV] = str(reports)
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", MARKER,
                "-q", "-rfEs", "--color=no", f"--rootdir={self.config.rootpath}"]
        timeout = self.config.getoption("timeout", None)
        if timeout is not None:
            argv.append(f"--timeout={timeout}")
        lines = ["# written by tests/vm/plugin.py; run as root inside the test VM",
                 f"cd {shlex.quote(str(self.config.rootpath))}"]
        lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
        lines.append("exec " + " ".join(shlex.quote(arg) for arg in argv + nodeids))
        return "\n".join(lines) + "\n"

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item,
                                nextitem: pytest.Item | None) -> bool | None:
        if item.nodeid not in self.vm_items:
            return None
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for report in self._reports_for(item):
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _reports_for(self, item: pytest.Item) -> list[TestReport]:
        """The guest's reports of ``item``, completed with one that says why they stop short."""
        got = [r for r in self.reports.get(item.nodeid, []) if isinstance(r, TestReport)]
        if any(r.when == "teardown" for r in got):
            return got
        when: When = "setup"
        if got:
            setup_passed = any(r.when == "setup" and r.passed for r in got)
            has_call = any(r.when == "call" for r in got)
            when = "call" if setup_passed and not has_call else "teardown"
        if self.run is None or self.run.ready_after_s is None:
            reason = self.unavailable or (self.run.describe() if self.run else "no VM ran")
            if not IN_CI:
                return [self._report(item, "skipped", when, _skip_repr(item, reason))]
            reason += " (CI=true: the vcan tests must run)"
        else:
            reason = f"no result from the test VM for this test: {self.run.describe()}"
            if self.run.exit_status == GUEST_SETUP_FAILED:
                reason = "the test VM could not set itself up"
        text = reason
        for error in self.collect_errors:
            text += f"\n\n--- collection error in the VM: {error.nodeid} ---\n{error.longreprtext}"
        if self.run is not None:
            text += (f"\n\n--- console log ({self.run.console}), last lines ---\n"
                     f"{self.run.console_tail()}")
        return [*got, self._report(item, "failed", when, text)]

    def _report(self, item: pytest.Item, outcome: Outcome, when: When,
                longrepr: str | tuple[str, int, str]) -> TestReport:
        return TestReport(item.nodeid, item.location, dict.fromkeys(item.keywords, 1), outcome,
                          longrepr, when)


def _skip_repr(item: pytest.Item, reason: str) -> tuple[str, int, str]:
    return (str(item.path), (item.location[1] or 0) + 1, f"Skipped: {reason}")


def _new_run_folder() -> Path:
    """A fresh folder for one VM run's script, reports and console log. Older ones are pruned,
    but never one young enough to belong to a run still going on (another checkout or session
    of the same user shares this cache)."""
    runs = shared_path(cache_root() / "runs")
    runs.mkdir(parents=True, exist_ok=True)
    previous = sorted(runs.iterdir())[:-KEPT_RUNS]
    for old in previous:
        if time.time() - old.stat().st_mtime > 2 * VM_TIMEOUT_S:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs))
