"""Named counters and gauges, shared by the stages and read by ``bms-gateway status``.

Counter names are a contract (see docs/operations.md): ``frames_rx_total``,
``frames_rejected_total{reason}``, ``frames_dropped_total{reason}``, ``records_committed_total``,
``records_acked_total``, ``records_dropped_total{reason}``, ``puback_errors_total{code}``, ...
A labelled counter is a dict from label to count; its plain name is the sum.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any


class Metrics:
    """Thread-safe counters (monotonic) and gauges (last value)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[str, int]] = {}
        self._gauges: dict[str, Any] = {}

    def inc(self, name: str, n: int = 1, label: str = "") -> None:
        with self._lock:
            by_label = self._counters.setdefault(name, {})
            by_label[label] = by_label.get(label, 0) + n

    def set(self, name: str, value: Any) -> None:
        with self._lock:
            self._gauges[name] = value

    def get(self, name: str, label: str | None = None) -> int:
        """A counter's value: one label's, or the sum over all labels when ``label`` is None."""
        with self._lock:
            by_label = self._counters.get(name, {})
            if label is None:
                return sum(by_label.values())
            return by_label.get(label, 0)

    def gauge(self, name: str, default: Any = None) -> Any:
        with self._lock:
            return self._gauges.get(name, default)

    def snapshot(self) -> dict[str, Any]:
        """``{"counters": {name: {label: n}}, "gauges": {name: value}}``, a deep copy."""
        with self._lock:
            return {
                "counters": {k: dict(v) for k, v in self._counters.items()},
                "gauges": dict(self._gauges),
            }

    def add_snapshot(self, snapshot: Mapping[str, Any]) -> None:
        """Add a previous run's counters, so totals are summed across restarts."""
        counters = snapshot.get("counters", {})
        with self._lock:
            for name, by_label in counters.items():
                mine = self._counters.setdefault(name, {})
                for label, n in by_label.items():
                    mine[label] = mine.get(label, 0) + int(n)


def flatten(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """Flat view for ``status --json``: ``name`` is the sum, ``name{label}`` each label."""
    out: dict[str, Any] = {}
    for name, by_label in sorted(snapshot.get("counters", {}).items()):
        out[name] = sum(by_label.values())
        for label, n in sorted(by_label.items()):
            if label:
                out[f"{name}{{{label}}}"] = n
    out.update(snapshot.get("gauges", {}))
    return out
