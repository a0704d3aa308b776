"""The in-process simulator source (``source.kind = "simulator"``), used by the demo.

The firmware simulator plays its pack on a private python-can ``virtual`` bus in a thread of its
own, and the gateway reads that bus exactly as it reads a real one.
"""

from __future__ import annotations

import threading
import time
import uuid

import structlog

from gateway.config import SimulatorSection
from gateway.metrics import Metrics
from gateway.sources.base import FrameQueue
from gateway.sources.bus import BusSource

log = structlog.get_logger(__name__)


class SimulatorSource(BusSource):
    def __init__(self, queue: FrameQueue, metrics: Metrics, *, settings: SimulatorSection,
                 filters: list[dict[str, object]] | None = None) -> None:
        channel = f"bms-sim-{uuid.uuid4().hex[:12]}"
        super().__init__(queue, metrics, interface="virtual", channel=channel, filters=filters)
        self.settings = settings
        self._sim_thread: threading.Thread | None = None
        self._sim_stop = threading.Event()

    def describe(self) -> str:
        s = self.settings
        return f"simulator {s.scenario} ({s.cells} cells, serial {s.serial})"

    def _open(self) -> None:
        super()._open()  # the receiving end first, so no frame is sent before anyone listens
        from firmware_sim import Simulator
        from firmware_sim.live import run_on_bus

        s = self.settings
        sim = Simulator.from_scenario(s.scenario, cells=s.cells, sensors=s.sensors,
                                      serial=s.serial, seed=s.seed, node_id=0,
                                      start_time=time.time())
        sim_bus = self.open_bus()

        def play() -> None:
            try:
                run_on_bus(sim, sim_bus, stop=self._sim_stop, seconds=None, speed=s.speed)
            except Exception:
                log.exception("simulator_crashed")
                raise
            finally:
                sim_bus.shutdown()

        self._sim_thread = threading.Thread(target=play, name="simulator", daemon=True)
        self._sim_thread.start()
        log.info("simulator_started", scenario=s.scenario, cells=s.cells, serial=s.serial)

    def _close(self) -> None:
        self._sim_stop.set()
        if self._sim_thread is not None:
            self._sim_thread.join(timeout=5)
        super()._close()
