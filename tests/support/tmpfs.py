"""Run a command with a small tmpfs of its own: a filesystem that really fills up.

``unshare --mount`` gives the command a private mount namespace (a normal user also needs
``--user --map-root-user``), where a tmpfs of a fixed size is mounted over a folder. Nobody
outside sees the mount; it vanishes with the command. While it runs, another command can join its
namespace (``inside_command``) to see the files; ``/proc/<pid>/root`` shows them too, but not
to SQLite, which resolves that link to the outside view.

Where the kernel or a security policy refuses namespaces, tests skip and say why: the test then
needs a machine (or a CI runner) that allows ``unshare``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

#: mounts the tmpfs, then replaces itself with the command: ``sh -c SCRIPT sh SIZE DIR ARGV...``
_SCRIPT = 'mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@"'


def tmpfs_command(mountpoint: Path, size_bytes: int, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so that it runs with a ``size_bytes`` tmpfs mounted at ``mountpoint``.

    The wrapper execs the command in place (same pid), so signals sent to the child reach it.
    """
    unshare = shutil.which("unshare") or "unshare"
    namespaces = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    return [unshare, *namespaces, "sh", "-c", _SCRIPT, "sh", str(size_bytes), str(mountpoint),
            *argv]


def inside_command(pid: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run in the mount namespace of process ``pid`` (one ``tmpfs_command`` made)."""
    nsenter = shutil.which("nsenter") or "nsenter"
    namespaces = ["--mount"] if os.geteuid() == 0 else ["--user", "--preserve-credentials",
                                                         "--mount"]
    return [nsenter, f"--target={pid}", *namespaces, "--", *argv]


@functools.cache
def tmpfs_problem() -> str | None:
    """Why a private tmpfs cannot be had here, or None when it can."""
    for program in ("unshare", "nsenter"):
        if shutil.which(program) is None:
            return f"{program} (util-linux) is not installed"
    with tempfile.TemporaryDirectory(prefix="tmpfs-probe-") as folder:
        try:
            done = subprocess.run(tmpfs_command(Path(folder), 1 << 20, ["true"]),
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unshare failed: {exc}"
    if done.returncode != 0:
        return f"no private mount namespace here: {done.stderr.strip()[:300]}"
    return None


def require_tmpfs() -> None:
    """Skip the calling test, naming the reason, where no private tmpfs can be mounted."""
    problem = tmpfs_problem()
    if problem is not None:
        pytest.skip(f"needs a private tmpfs (unshare --mount): {problem}")
