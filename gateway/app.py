"""Composition root: the only module that names concrete classes.

``Gateway`` wires a validated :class:`~gateway.config.Config` into stages — source, pipeline,
publisher (or a JSON-lines sink for offline replay) — and hands them to the supervisor.
Everything that can be wrong with the configuration is found here, before any thread starts.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import structlog

from gateway.config import Config
from gateway.decode.assembler import PackAssembler
from gateway.decode.profile import Profile, load_profile
from gateway.edge.core import EdgeCore
from gateway.edge.state import CheckpointError
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.publish.mqtt import Publisher
from gateway.publish.sink import JsonlSink
from gateway.sources.base import FrameQueue, Source
from gateway.sources.bus import BusSource
from gateway.sources.replay import ReplaySource, check_trace
from gateway.sources.simulated import SimulatorSource
from gateway.store.base import Store
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SqliteStore
from gateway.supervisor import Stage, Supervisor

log = structlog.get_logger(__name__)

#: meta key under which the running daemon keeps its status document
STATUS_META_KEY = "status"

SourceFactory = Callable[[Config, FrameQueue, Metrics, Profile, list[dict[str, Any]] | None],
                         Source]


def _bus(config: Config, queue: FrameQueue, metrics: Metrics, _profile: Profile,
         filters: list[dict[str, Any]] | None) -> Source:
    s = config.source
    return BusSource(queue, metrics, interface=s.interface, channel=s.channel, bitrate=s.bitrate,
                     options=s.options, filters=filters, reopen_backoff_s=s.reopen_backoff_s)


def _replay(config: Config, queue: FrameQueue, metrics: Metrics, _profile: Profile,
            _filters: list[dict[str, Any]] | None) -> Source:
    return ReplaySource(queue, metrics, files=config.source.files,
                        speed=config.source.replay_speed)


def _simulator(config: Config, queue: FrameQueue, metrics: Metrics, _profile: Profile,
               filters: list[dict[str, Any]] | None) -> Source:
    return SimulatorSource(queue, metrics, settings=config.source.simulator, filters=filters)


#: ``source.kind`` → factory
SOURCES: dict[str, SourceFactory] = {"bus": _bus, "replay": _replay, "simulator": _simulator}


class Gateway:
    """One daemon run. Build (validates, opens the store, warms the kernels), then ``run()``."""

    def __init__(self, config: Config, *, out_jsonl: Path | None = None,
                 drain_timeout_s: float = 30.0) -> None:
        self.config = config
        self.metrics = Metrics()
        self.out_jsonl = out_jsonl
        self.drain_timeout_s = drain_timeout_s
        self.started_wall = time.time()
        replay = config.source.kind == "replay"
        if replay:
            for f in config.source.files:
                check_trace(Path(f))
        self.profile = load_profile(config.profile.path,
                                    dbc_override=config.profile.dbc or None)
        self.store: Store
        if out_jsonl is not None:
            # offline analysis: nothing is persisted, records go to the file as they come
            self.store = MemoryStore(metrics=self.metrics)
        else:
            self.store = SqliteStore.from_config(config.store, self.metrics)
            previous = self.store.get_meta(STATUS_META_KEY)
            if previous:
                self.metrics.add_snapshot(json.loads(previous).get("metrics", {}))
        self.assembler = PackAssembler(self.profile, self.metrics,
                                       configured_serial=config.profile.serial,
                                       limits=config.edge)
        self.edge = EdgeCore(config.edge, self.metrics)
        self.edge.warm_up()
        try:
            self.edge.restore(self.store.checkpoints())
        except CheckpointError as exc:
            # Starting the pack from zero would send its lifetime counters backwards: stop, and
            # do not let systemd restart-loop; an operator has to look (docs/operations.md).
            self.store.close()
            raise ConfigError(f"edge checkpoint in the store cannot be restored: {exc}",
                              path=config.store.path) from exc
        self.queue = FrameQueue(config.source.queue_frames, self.metrics)
        filters = (self.assembler.receive_filters()
                   if config.source.receive_filters == "dbc" else None)
        self.source = SOURCES[config.source.kind](config, self.queue, self.metrics, self.profile,
                                                  filters)
        self.wake = threading.Event()
        self.pipeline = Pipeline(self.queue, self.assembler, self.edge, self.store, self.metrics,
                                 on_commit=self.wake.set)
        self.sink: JsonlSink | None = None
        self.publisher: Publisher | None = None
        if out_jsonl is not None:
            sink = self.sink = JsonlSink(out_jsonl, config.gateway.id, self.store, self.metrics,
                                         settings=config.mqtt, wake=self.wake)
            deliver = Stage("sink", sink.run, lambda: sink.last_progress, order=2)
        else:
            publisher = self.publisher = Publisher(config.mqtt, config.gateway.id, self.store,
                                                   self.metrics, wake=self.wake)
            deliver = Stage("publisher", publisher.run, lambda: publisher.last_progress,
                            order=2)
        self.stages = [
            Stage("can-rx", self.source.run, lambda: self.source.last_progress, order=0),
            Stage("pipeline", self.pipeline.run, lambda: self.pipeline.last_progress, order=1),
            deliver,
        ]
        self._drain_deadline: float | None = None
        self.supervisor = Supervisor(self.stages, stall_s=config.gateway.watchdog_stall_s,
                                     on_tick=self.write_status,
                                     tick_s=config.gateway.status_interval_s,
                                     on_reload=self.reload,
                                     done=self._input_done if replay else None)

    def run(self) -> int:
        log.info("gateway_starting", gateway_id=self.config.gateway.id,
                 source=self.source.describe(), profile=self.profile.name,
                 store=self.config.store.path if self.out_jsonl is None else "memory",
                 broker=f"{self.config.mqtt.host}:{self.config.mqtt.port}"
                 if self.out_jsonl is None else None)
        try:
            return self.supervisor.run(ready_status=f"reading {self.source.describe()}")
        finally:
            self.store.close()

    def _input_done(self) -> bool:
        """Replay: done when every frame is committed and delivered (or the drain timed out)."""
        if not self.pipeline.finished.is_set():
            return False
        if self.store.stats().records == 0:
            return True
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.drain_timeout_s
        if time.monotonic() > self._drain_deadline:
            log.warning("replay_drain_timeout", still_stored=self.store.stats().records)
            return True
        return False

    def reload(self) -> None:
        """SIGHUP: apply the ``RELOADABLE`` keys of the file as it is now; name the others.

        Nothing stops: the stages keep running and the store keeps every record, so a reload
        cannot lose data. A file that no longer validates changes nothing (``reload_failed``).
        """
        from gateway.config import load_config
        from gateway.logging import set_level

        try:
            fresh = load_config(self.config.file)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return
        applied = _with_reloadable(self.config, fresh)
        changed = _changed_keys(self.config, applied)
        pending = _changed_keys(applied, fresh)
        # said at the level in force until now, so a reload to "warning" is still confirmed
        log.info("reloaded", changed=changed, log_level=applied.gateway.log_level)
        if pending:
            log.warning("reload_needs_restart", keys=pending)
        set_level(applied.gateway.log_level)
        self.supervisor.stall_s = applied.gateway.watchdog_stall_s
        self.supervisor.tick_s = applied.gateway.status_interval_s
        if self.publisher is not None:
            # read by the publisher on its next turn; connection settings are not among them
            self.publisher.settings = applied.mqtt
        if self.sink is not None:
            self.sink.settings = applied.mqtt
        self.config = applied

    def status_document(self) -> dict[str, Any]:
        stats = self.store.stats()
        return {
            "pid": os.getpid(),
            "gateway_id": self.config.gateway.id,
            "started_at": self.started_wall,
            "updated_at": time.time(),
            "metrics": self.metrics.snapshot(),
            "store": asdict(stats),
            "packs": {serial: asdict(seen) for serial, seen in self.pipeline.packs.items()},
        }

    def write_status(self) -> None:
        if self.out_jsonl is not None:
            return
        stats = self.store.stats()
        self.metrics.set("store_records", stats.records)
        self.metrics.set("store_bytes", stats.bytes)
        self.metrics.set("oldest_unsent_age_s",
                         None if stats.oldest_unsent_ts is None
                         else round(max(0.0, time.time() - stats.oldest_unsent_ts), 3))
        self.store.put_meta(STATUS_META_KEY, json.dumps(self.status_document(), default=str))


#: what SIGHUP applies to a running daemon, by section; everything else needs a restart
#: (docs/operations.md, "Reload")
RELOADABLE: dict[str, tuple[str, ...]] = {
    "gateway": ("log_level", "status_interval_s", "watchdog_stall_s"),
    "mqtt": ("publish_interval_s", "batch_max_records", "batch_max_bytes", "inflight",
             "retry_backoff_s", "reconnect_min_s", "reconnect_max_s", "keepalive_s"),
}


def _with_reloadable(running: Config, fresh: Config) -> Config:
    """``running`` with the reloadable keys taken from ``fresh``."""
    sections = {name: replace(getattr(running, name),
                              **{k: getattr(getattr(fresh, name), k) for k in keys})
                for name, keys in RELOADABLE.items()}
    return replace(running, **sections)


def _changed_keys(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configurations."""
    flat_a, flat_b = _flat(asdict(a)), _flat(asdict(b))
    return sorted(k for k in flat_a.keys() | flat_b.keys()
                  if k != "file" and flat_a.get(k) != flat_b.get(k))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
