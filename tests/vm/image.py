"""The test VM's kernel and initramfs, built once and cached per kernel release.

The kernel is Debian's ``linux-image-amd64`` (through the versioned package it depends on),
fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``: never installed, so the host
is untouched. Only ``vmlinuz`` and the modules the guest needs are kept. The initramfs is written
here in the ``newc`` cpio format (no ``cpio`` program needed, and it can hold ``/dev/console``
without root): the static busybox, those modules and :data:`INIT_SCRIPT` as ``/init``.

Cache layout, under ``${XDG_CACHE_HOME:-~/.cache}/bms-gateway/vm``::

    <release>/vmlinuz                 e.g. 6.1.0-56-amd64/vmlinuz
    <release>/modules/<name>.ko       the needed modules, in load order in <release>/modules/order
    <release>/initramfs-<digest>.cpio digest of init script, busybox and modules: edits rebuild it
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Debian's meta package; it depends on the current versioned kernel package
KERNEL_META_PACKAGE = "linux-image-amd64"

#: what the guest needs: 9p over virtio-pci for the host's root, raw CAN sockets and vcan. Their
#: dependencies (virtio, netfs, fscache, can, can-dev, ...) come from each module's ``depends=``.
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "can_raw", "vcan", "slcan")

#: 9p mount tag of the host's root, shared between the QEMU command line and :data:`INIT_SCRIPT`
MOUNT_TAG = "hostroot"

#: the kernel command line parameter that names the host script the guest runs
RUN_PARAMETER = "bmsvm.run"

#: lines the guest prints on its console: ready (with its uptime in seconds) and the script's exit
READY_MARKER = "bmsvm-ready"
EXIT_MARKER = "bmsvm-exit"

#: status the guest reports when it could not get as far as running the script
GUEST_SETUP_FAILED = 125

# PID 1 of the guest. /tmp, /run and /dev/shm are the guest's own tmpfs (SQLite's WAL needs a
# shared mmap that 9p does not give, and nothing a test writes there should land on the host);
# everything else is the host's file system, read-write.
INIT_SCRIPT = f"""#!/bin/busybox sh
# PID 1 of the bms-gateway vcan test VM (written by tests/vm/image.py)
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
finish() {{ echo "{EXIT_MARKER} $1"; sync; poweroff -f; }}
fail() {{ echo "bmsvm: $*"; finish {GUEST_SETUP_FAILED}; }}
for module in $(cat /lib/modules/order); do
  insmod "/lib/modules/$module.ko" || fail "insmod $module failed"
done
run=
for arg in $(cat /proc/cmdline); do
  case "$arg" in {RUN_PARAMETER}=*) run="${{arg#{RUN_PARAMETER}=}}" ;; esac
done
[ -n "$run" ] || fail "no {RUN_PARAMETER}= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose {MOUNT_TAG} /host \\
  || fail "cannot mount the host's root over 9p"
mount -t proc proc /host/proc && mount -t sysfs sys /host/sys && mount -t devtmpfs dev /host/dev \\
  && mkdir -p /host/dev/pts /host/dev/shm && mount -t devpts devpts /host/dev/pts \\
  && mount -t tmpfs shm /host/dev/shm && mount -t tmpfs tmp /host/tmp \\
  && mount -t tmpfs run /host/run || fail "cannot mount the guest's own file systems"
chroot /host /bin/sh -ec 'PATH=/usr/sbin:/usr/bin:/sbin:/bin
  ip link set dev lo up
  ip link add dev vcan0 type vcan
  ip link set dev vcan0 up' || fail "cannot bring up lo and vcan0 with the host's ip"
echo "{READY_MARKER} $(cut -d' ' -f1 /proc/uptime)"
chroot /host /bin/sh "$run"
finish $?
"""


class VmError(RuntimeError):
    """The VM cannot be built or booted here; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class VmImage:
    release: str
    kernel: Path
    initramfs: Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bms-gateway" / "vm"


def ensure_image(root: Path | None = None) -> VmImage:
    """The cached kernel and initramfs, fetching and building what is missing (under a lock, so
    concurrent test sessions build once)."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        release = _current_release(root)
        folder = root / release
        if not (folder / "modules" / "order").is_file():
            _fetch_kernel(f"linux-image-{release}", release, folder)
        busybox = _static_busybox()
        order = (folder / "modules" / "order").read_text(encoding="utf-8").split()
        modules = [(name, (folder / "modules" / f"{name}.ko").read_bytes()) for name in order]
        digest = hashlib.sha256(INIT_SCRIPT.encode() + busybox)
        for name, data in modules:
            digest.update(name.encode() + data)
        initramfs = folder / f"initramfs-{digest.hexdigest()[:16]}.cpio"
        if not initramfs.is_file():
            for stale in folder.glob("initramfs-*.cpio"):
                stale.unlink()
            staging = initramfs.with_suffix(".partial")
            staging.write_bytes(_initramfs(busybox, modules))
            staging.rename(initramfs)
    return VmImage(release=release, kernel=folder / "vmlinuz", initramfs=initramfs)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _current_release(root: Path) -> str:
    """The release apt would install now (``6.1.0-56-amd64``); without apt's package lists, the
    newest release already cached."""
    apt_cache = shutil.which("apt-cache")
    if apt_cache is not None:
        result = subprocess.run([apt_cache, "depends", KERNEL_META_PACKAGE], capture_output=True,
                                text=True, timeout=60, check=False)
        found = re.search(r"Depends:\s*linux-image-(\S+)", result.stdout)
        if found:
            return found.group(1)
    cached = sorted((p for p in root.glob("*/modules/order")), key=lambda p: p.stat().st_mtime)
    if cached:
        return cached[-1].parent.parent.name
    raise VmError(f"apt-cache knows no {KERNEL_META_PACKAGE} (run 'apt-get update' first; "
                  "Debian or a derivative with apt is needed to fetch the VM's kernel)")


def _fetch_kernel(package: str, release: str, folder: Path) -> None:
    """``apt-get download`` the kernel package, unpack it, keep vmlinuz and the needed modules."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise VmError(f"{tool} is needed to fetch the VM's kernel and is not installed")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", package], cwd=work)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            raise VmError(f"apt-get download {package} left no .deb in {work}")
        unpacked = work / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], cwd=work)
        tree = unpacked / "lib" / "modules" / release
        if not tree.is_dir():  # newer Debian kernels ship under /usr (merged /usr)
            tree = unpacked / "usr" / "lib" / "modules" / release
        staging = work / "image"
        (staging / "modules").mkdir(parents=True)
        shutil.copyfile(unpacked / "boot" / f"vmlinuz-{release}", staging / "vmlinuz")
        order = module_load_order(tree, WANTED_MODULES)
        for name, path in order:
            (staging / "modules" / f"{name}.ko").write_bytes(_module_bytes(path))
        (staging / "modules" / "order").write_text(
            "".join(f"{name}\n" for name, _ in order), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)


def _run(argv: list[str], *, cwd: Path) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600,
                            check=False)
    if result.returncode != 0:
        raise VmError(f"{' '.join(argv)} failed ({result.returncode}): "
                      f"{(result.stderr or result.stdout).strip()[-2000:]}")


def _normal(name: str) -> str:
    """Module names treat '-' and '_' alike (``can-raw.ko`` is module ``can_raw``)."""
    return name.replace("-", "_")


def module_load_order(tree: Path, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """The modules ``wanted`` needs under a kernel's ``lib/modules/<release>`` folder, each after
    its dependencies (there is no depmod here: each module's ``depends=`` is read from its
    ``.modinfo`` strings). Built-in ones are left out; one that is neither is an error."""
    files: dict[str, Path] = {}
    for path in (tree / "kernel").rglob("*.ko*"):
        files[_normal(path.name.split(".ko")[0])] = path
    builtin_list = tree / "modules.builtin"
    builtin = {_normal(Path(line).name.split(".ko")[0])
               for line in builtin_list.read_text(encoding="utf-8").split()} \
        if builtin_list.is_file() else set()
    order: list[tuple[str, Path]] = []
    placed: set[str] = set()

    def place(name: str, chain: tuple[str, ...]) -> None:
        if name in placed or name in builtin:
            return
        if name in chain:
            raise VmError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = files.get(name)
        if path is None:
            raise VmError(f"kernel module {name} (needed by {chain[-1] if chain else 'the VM'}) "
                          f"is neither in {tree} nor built in")
        for dependency in _depends(_module_bytes(path)):
            place(dependency, (*chain, name))
        placed.add(name)
        order.append((name, path))

    for name in wanted:
        place(_normal(name), ())
    return order


def _module_bytes(path: Path) -> bytes:
    """A module file's ELF bytes; Debian 13 and later compress modules with xz."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise VmError(f"{path}: unsupported module compression (expected .ko or .ko.xz)")


def _depends(module: bytes) -> list[str]:
    for field in module.split(b"\0"):
        if field.startswith(b"depends="):
            return [_normal(n) for n in field[len(b"depends="):].decode().split(",") if n]
    return []


def _static_busybox() -> bytes:
    """The host's busybox, which must be static: the initramfs has no C library."""
    found = shutil.which("busybox") or shutil.which("busybox", path="/usr/bin:/bin")
    if found is None:
        raise VmError("busybox is not installed (Debian package 'busybox-static')")
    data = Path(found).read_bytes()
    if not _is_static_elf(data):
        raise VmError(f"{found} is dynamically linked; the VM needs Debian's 'busybox-static'")
    return data


def _is_static_elf(data: bytes) -> bool:
    """A 64-bit little-endian ELF executable without a program interpreter (PT_INTERP)."""
    if data[:6] != b"\x7fELF\x02\x01":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    pt_interp = 3
    return all(int.from_bytes(data[phoff + i * phentsize:][:4], "little") != pt_interp
               for i in range(phnum))


def _initramfs(busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    order = "".join(f"{name}\n" for name, _ in modules).encode()
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (folder, 0o040755, b"", (0, 0))
        for folder in ("bin", "dev", "proc", "sys", "host", "lib", "lib/modules")
    ]
    entries += [
        # the kernel opens /dev/console for init before anything can mount devtmpfs
        ("dev/console", 0o020600, b"", (5, 1)),
        ("bin/busybox", 0o100755, busybox, (0, 0)),
        ("init", 0o100755, INIT_SCRIPT.encode(), (0, 0)),
        ("lib/modules/order", 0o100644, order, (0, 0)),
    ]
    entries += [(f"lib/modules/{name}.ko", 0o100644, data, (0, 0)) for name, data in modules]
    out = bytearray()
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        out += _newc(name, ino, mode, data, rdev)
    out += _newc("TRAILER!!!", 0, 0, b"", (0, 0))
    return bytes(out)


def _newc(name: str, ino: int, mode: int, data: bytes, rdev: tuple[int, int]) -> bytes:
    """One cpio ``newc`` record: a 110-byte hex header, the name and the data, each padded to 4."""
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08x" % value for value in fields)
    return (header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4)
            + data + b"\0" * (-len(data) % 4))
