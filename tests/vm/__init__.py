"""Real SocketCAN for the tests marked ``vcan``, on any Linux host.

Where the host kernel has ``AF_CAN`` and this process may create and raise ``vcan0`` (a Pi, a
laptop with the ``vcan`` module, as root), the tests run directly. Elsewhere (a kernel built
without CAN, like the CI machine's) :mod:`tests.vm.plugin` boots one small QEMU VM per test session:
a Debian kernel that has ``vcan`` as a module, a busybox initramfs that loads it, and the host's
own root shared over 9p and entered with ``chroot`` — so the guest runs the host's Python, virtual
environment, mosquitto and ``ip``. The tests run there with pytest, and their reports come back as
ordinary test results on the host.

- :mod:`tests.vm.image` fetches the kernel (``apt-get download``) and builds the initramfs, cached
  under ``${XDG_CACHE_HOME:-~/.cache}/bms-gateway/vm`` keyed by kernel release;
- :mod:`tests.vm.machine` boots it and runs one shell script inside;
- :mod:`tests.vm.plugin` decides direct or VM, and maps the guest's reports onto the host's items.
"""
