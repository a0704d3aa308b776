"""Boot the test VM and run one shell script of the host's inside it, as root, with vcan0 up.

QEMU emulates in software (``-accel tcg -cpu max``): ``/dev/kvm`` may exist on a CI machine and
still not work (an MSR assertion with ``-cpu host``, a hang otherwise), and the guest's work is
small. The host's root is shared read-write over 9p, so the script, the repository, the virtual
environment and the result files are at the same paths inside — except /tmp, /run and /dev,
which are the guest's own (see :data:`tests.vm.image.INIT_SCRIPT`).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.image import (
    EXIT_MARKER,
    MOUNT_TAG,
    READY_MARKER,
    RUN_PARAMETER,
    VmError,
    VmImage,
)

#: host folders the guest replaces with its own, so a script or result file there is not shared
GUEST_OWN = (Path("/tmp"), Path("/run"), Path("/dev"), Path("/proc"), Path("/sys"))

#: guest memory: the gateway, the simulator, mosquitto and pytest side by side, numba included
MEMORY_MIB = 2048


@dataclass(frozen=True, slots=True)
class VmRun:
    """What one boot did. ``ready_after_s`` is the guest's uptime once lo and vcan0 were up (None:
    it never got there); ``exit_status`` is the script's (None: the guest never reported one)."""

    console: Path
    wall_s: float
    ready_after_s: float | None
    exit_status: int | None
    timed_out: bool

    def console_tail(self, chars: int = 8000) -> str:
        try:
            text = self.console.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no console log)"
        return text[-chars:] if len(text) > chars else text

    def describe(self) -> str:
        if self.timed_out:
            return f"the VM was stopped after {self.wall_s:.0f} s (time limit)"
        if self.ready_after_s is None:
            return "the VM did not boot to a shell with vcan0"
        if self.exit_status is None:
            return "the VM stopped without reporting the script's exit status"
        return f"the VM ran the script (exit status {self.exit_status})"


def qemu_binary() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        raise VmError(f"the test VM runs an amd64 kernel over the host's own root, so it needs an "
                      f"x86_64 host (this one is {platform.machine()})")
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise VmError("qemu-system-x86_64 is not installed (Debian package 'qemu-system-x86')")
    return found


def shared_path(path: Path) -> Path:
    """``path`` made absolute, refused when the guest would not see the host's file there."""
    path = path.resolve()
    for own in GUEST_OWN:
        if path.is_relative_to(own):
            raise VmError(f"{path} is under {own}, which the VM does not share with the host "
                          "(set XDG_CACHE_HOME to a folder elsewhere)")
    return path


def run_script(image: VmImage, script: Path, console: Path, *, timeout_s: float,
               cpus: int = 2) -> VmRun:
    """Boot, run ``/bin/sh script`` in the host's root as root, power off; the console (kernel
    warnings, the guest's markers and the script's output) goes to ``console``."""
    script = shared_path(script)
    # passthrough keeps the guest's file owners on the host, which only root may do; 'none' is
    # the same for a user without that right (ownership changes are ignored)
    security = "passthrough" if os.geteuid() == 0 else "none"
    argv = [
        qemu_binary(), "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-m", str(MEMORY_MIB),
        "-nodefaults", "-no-user-config", "-display", "none", "-net", "none", "-no-reboot",
        "-serial", "stdio",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", f"console=ttyS0 panic=-1 quiet {RUN_PARAMETER}={script}",
        "-virtfs", f"local,path=/,mount_tag={MOUNT_TAG},security_model={security},"
                   "multidevs=remap",
    ]
    started = time.monotonic()
    timed_out = False
    with console.open("wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # the time limit, or the test run interrupted (^C does not reach its session)
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    wall_s = time.monotonic() - started
    text = console.read_text(encoding="utf-8", errors="replace")
    ready = re.search(rf"^{READY_MARKER} ([0-9.]+)", text, re.MULTILINE)
    status = re.search(rf"^{EXIT_MARKER} (\d+)", text, re.MULTILINE)
    return VmRun(console=console, wall_s=wall_s,
                 ready_after_s=float(ready.group(1)) if ready else None,
                 exit_status=int(status.group(1)) if status else None, timed_out=timed_out)
