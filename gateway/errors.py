"""One exception root for the gateway, with a few subclasses that mix in the matching builtin.

Per-frame bad input is never raised out of a loop: it is counted (see ``gateway.metrics``).
Exceptions are for start-up problems (configuration, DBC, profile, store file) and for
programming errors.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError, ValueError):
    """A configuration, DBC or profile file is wrong. The message names the file and key or line.

    The daemon exits with code 78 (EX_CONFIG) on it, so systemd does not restart-loop.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
        where = ", ".join(
            part for part in (
                path,
                f"line {line}" if line is not None else None,
                f"key '{key}'" if key else None,
            ) if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.key = key
        self.line = line


class SourceError(GatewayError, OSError):
    """A CAN source could not be opened or failed for good (not one bad frame)."""


class StoreError(GatewayError, OSError):
    """The durable store cannot be opened or written."""


class StoreCorruptError(StoreError):
    """The store file failed its integrity check. It is moved aside and kept, never deleted."""
