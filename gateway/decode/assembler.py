"""Decoded frames → one :class:`~gateway.model.Sample` per pack per cycle.

The assembler keeps, per pack (node id on the bus), the latest pack values, the cell values of the
cycle in progress, the latest value of every temperature sensor (they come slower than voltages),
and the pack's serial. It emits a sample

- when a cycle of cell voltages is complete: every voltage group (block / multiplexer value /
  message) that holds one of the pack's ``count`` cells has arrived — the sample's ``ts`` is the
  measurement time of the frame that completed it;
- when a group arrives a second time before the cycle completed (a lost frame, or a cell count not
  known yet): the previous cycle is emitted as it stands, missing cells invalid, at the time of its
  last frame;
- for profiles without per-cell voltages, when the profile's trigger message arrives (at most one
  per ``min_interval_s``);
- from :meth:`PackAssembler.flush`, for a cycle left incomplete for ``cycle_timeout_s`` (a bus that
  went quiet, or the end of a trace: ``flush(math.inf)``).

The per-frame path writes raw values into preallocated per-pack Python lists (single-element list
stores are several times cheaper than NumPy item stores); NumPy arrays are built once per emitted
sample, where the plausibility limits are applied vectorised. Values outside the limits, cells the
BMS flagged, cells not received this cycle and sensors not refreshed for ``stale_after_s`` are
reported as ``nan`` with ``valid`` False — never fed on — and counted in
``values_masked_total{reason}`` (``cell_voltage_range``, ``cell_temp_range``, ``flagged_invalid``,
``not_received``, ``stale``, ``cell_count_range``, ``serial_invalid``). Samples of a pack whose
serial is not known yet are dropped and counted in ``samples_dropped_total{no_serial}``; those of
a pack whose cell count is not known yet in ``samples_dropped_total{no_cell_count}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from gateway.config import EdgeSection
from gateway.decode.decoder import (
    PART_COUNTS,
    PART_FAULTS,
    PART_SCALARS,
    PART_SERIAL,
    PART_TEMPS,
    PART_TEXTS,
    PART_VOLTAGES,
    Decoder,
    Route,
    SerialParts,
)
from gateway.decode.profile import SCALAR_TARGETS, Profile, Target
from gateway.metrics import Metrics
from gateway.model import BoolArray, FloatArray, Frame, Sample

log = structlog.get_logger(__name__)

_NAN = math.nan
_MAX_SERIAL = 64


def _serial_problem(serial: str) -> str | None:
    """Why ``serial`` cannot name a pack (it becomes an MQTT topic level), or None."""
    if not serial:
        return "empty"
    if len(serial) > _MAX_SERIAL:
        return f"longer than {_MAX_SERIAL} characters"
    bad = [c for c in serial if not "!" <= c <= "~" or c in "+#/"]
    if bad:
        return f"contains {bad[0]!r} (allowed: printable ASCII without space, +, #, /)"
    return None


@dataclass(frozen=True, slots=True)
class _TempCache:
    """A temperature vector built for a sample, reusable until ``valid_until``."""

    version: int
    computed_ts: float
    #: when the first sensor that was fresh at ``computed_ts`` goes stale
    valid_until: float
    temps: FloatArray
    valid: BoolArray
    masked: tuple[tuple[str, int], ...]


class _Pack:
    """Everything known about one pack on the bus. Owned by the pipeline thread."""

    __slots__ = ("chunk_count", "chunks", "fault", "label", "last_cell_ts", "last_emit_ts",
                 "needed", "node", "scalar_ts", "scalars", "seen", "serial", "serial_problem",
                 "temp_cache", "temp_count", "temp_flags", "temp_ts", "temp_version", "temps",
                 "text_ts", "texts", "unbound_scalars", "voltage_count", "voltage_flags",
                 "voltages")

    def __init__(self, node: int, label: str, serial: str, voltage_capacity: int,
                 temp_capacity: int, unbound_scalars: frozenset[int]) -> None:
        self.node = node
        self.label = label
        self.serial = serial
        self.unbound_scalars = unbound_scalars
        self.voltages = [_NAN] * voltage_capacity
        self.temps = [_NAN] * temp_capacity
        self.temp_version = 0
        self.chunks: dict[int, bytes] = {}
        self.chunk_count = 0
        #: the last bad serial logged, so a BMS repeating it once a second is logged once
        self.serial_problem = ""
        self.reset()

    def reset(self) -> None:
        """Forget every measurement (a new pack, or another pack answering at this node)."""
        self.scalars = [_NAN] * len(SCALAR_TARGETS)
        # a value the profile does not bind is absent (nan) but never "stale"
        self.scalar_ts = [math.inf if slot in self.unbound_scalars else -math.inf
                          for slot in range(len(SCALAR_TARGETS))]
        self.texts = ["", ""]
        self.text_ts = [-math.inf, -math.inf]
        self.fault = 0
        self.voltages = [_NAN] * len(self.voltages)
        self.voltage_flags = [False] * len(self.voltages)
        self.voltage_count: int | None = None
        #: bit g set: voltage group g arrived this cycle; ``needed``: the groups a cycle needs
        self.seen = 0
        self.needed = 0
        self.last_cell_ts = 0.0
        self.last_emit_ts = -math.inf
        self.temps = [_NAN] * len(self.temps)
        self.temp_flags = [False] * len(self.temps)
        self.temp_ts = [-math.inf] * len(self.temps)
        self.temp_count: int | None = None
        #: +1 whenever a temperature, its flag or the sensor count changes
        self.temp_version += 1
        self.temp_cache: _TempCache | None = None


class PackAssembler:
    """Turns frames into samples through a profile. Call :meth:`feed` for every frame."""

    def __init__(self, profile: Profile, metrics: Metrics, *, configured_serial: str = "",
                 limits: EdgeSection | None = None) -> None:
        limits = limits if limits is not None else EdgeSection()
        self.profile = profile
        self.decoder = Decoder(profile, metrics)
        self._decode = self.decoder.decode
        self._metrics = metrics
        self._voltage_spec = profile.cell_voltages
        self._temp_spec = profile.cell_temperatures
        self._capacities = (profile.cell_voltages.capacity if profile.cell_voltages else 0,
                            profile.cell_temperatures.capacity if profile.cell_temperatures
                            else 0)
        self._voltage_limits = (limits.cell_voltage_min_v, limits.cell_voltage_max_v)
        self._temp_limits = (limits.cell_temp_min_c, limits.cell_temp_max_c)
        self._stale_s = profile.stale_after_s
        self._min_interval_s = profile.min_interval_s
        self._cycle_timeout_s = profile.cycle_timeout_s
        self._node_shift = (profile.node_id_mask & -profile.node_id_mask).bit_length() - 1 \
            if profile.node_id_mask else 0
        self._packs: dict[int, _Pack] = {}
        self._needed_cache: dict[int, int] = {}
        self._unbound_scalars = frozenset(range(len(SCALAR_TARGETS))) - {
            int(b.target) for b in profile.bindings if b.target in SCALAR_TARGETS}
        self._clear = ([_NAN] * self._capacities[0], [False] * self._capacities[0])
        self._configured_serial = configured_serial
        if profile.serial_from_bus and configured_serial:
            log.warning("configured_serial_ignored", profile=profile.name,
                        serial=configured_serial,
                        detail="the profile reads each pack's serial from the bus")
        elif not profile.serial_from_bus:
            problem = _serial_problem(configured_serial)
            if problem:
                log.warning("no_serial_configured", profile=profile.name, problem=problem,
                            detail="the profile reads no serial from the bus; samples are "
                                   "dropped (samples_dropped_total{no_serial}) until one is "
                                   "configured")
                self._configured_serial = ""

    def receive_filters(self) -> list[dict[str, int | bool]]:
        """python-can filters for the frame ids the profile uses (see :class:`Decoder`)."""
        return self.decoder.receive_filters()

    # -- per frame ----------------------------------------------------------------------------

    def feed(self, frame: Frame) -> list[Sample]:
        """Take one frame; return the samples it completed (usually none, at most two)."""
        decoded = self._decode(frame)
        if decoded is None:
            return []
        node, route, values = decoded
        pack = self._packs.get(node)
        if pack is None:
            pack = self._new_pack(node)
        ts = frame.ts
        parts = route.parts
        if parts & PART_SCALARS:
            scalars = pack.scalars
            stamps = pack.scalar_ts
            for position, slot, factor, offset in route.scalars:
                scalars[slot] = values[position] * factor + offset
                stamps[slot] = ts
        if parts & PART_TEXTS:
            for position, slot, choices in route.texts:
                raw = values[position]
                pack.texts[slot] = choices.get(raw) or str(raw)
                pack.text_ts[slot] = ts
        if parts & PART_FAULTS:
            self._faults(pack, route, values)
        if parts & PART_COUNTS:
            self._counts(pack, route, values)
        if parts & PART_SERIAL and route.serial is not None:
            self._serial(pack, route.serial, values)
        if parts & PART_TEMPS:
            pack.temp_version += 1
            temps = pack.temps
            stamps = pack.temp_ts
            for position, cell, factor, offset in route.temps:
                temps[cell] = values[position] * factor + offset
                stamps[cell] = ts
            flags = pack.temp_flags
            for position, cell in route.temp_flags:
                flags[cell] = values[position] != 0
            for position, bits in route.temp_masks:
                mask = values[position]
                for bit, cell in bits:
                    flags[cell] = (mask >> bit) & 1 == 1
        if parts & PART_VOLTAGES:
            return self._voltage_frame(pack, route, values, ts)
        # time going backwards is a new trace or a clock step, not a reason to fall silent
        if route.trigger and (ts - pack.last_emit_ts >= self._min_interval_s
                              or ts < pack.last_emit_ts):
            pack.last_emit_ts = ts
            sample = self._sample(pack, ts)
            return [sample] if sample is not None else []
        return []

    def _voltage_frame(self, pack: _Pack, route: Route, values: tuple[int, ...],
                       ts: float) -> list[Sample]:
        out: list[Sample] = []
        group = route.voltage_group
        if group >= 0:
            bit = 1 << group
            if pack.seen & bit:
                # this group already came this cycle: the previous cycle ended with its last frame
                self._end_cycle(pack, pack.last_cell_ts, out)
            pack.seen |= bit
        voltages = pack.voltages
        for position, cell, factor, offset in route.voltages:
            voltages[cell] = values[position] * factor + offset
        flags = pack.voltage_flags
        for position, cell in route.voltage_flags:
            flags[cell] = values[position] != 0
        for position, bits in route.voltage_masks:
            mask = values[position]
            for bit_j, cell in bits:
                flags[cell] = (mask >> bit_j) & 1 == 1
        pack.last_cell_ts = ts
        needed = pack.needed
        if needed and pack.seen & needed == needed:
            self._end_cycle(pack, ts, out)
        return out

    def _faults(self, pack: _Pack, route: Route, values: tuple[int, ...]) -> None:
        if route.fault_word >= 0:
            pack.fault = values[route.fault_word]
        fault = pack.fault
        for position, bit in route.fault_bits:
            if values[position]:
                fault |= 1 << bit
            else:
                fault &= ~(1 << bit)
        pack.fault = fault

    def _counts(self, pack: _Pack, route: Route, values: tuple[int, ...]) -> None:
        for position, which, factor, offset in route.counts:
            count = round(values[position] * factor + offset)
            if not 1 <= count <= self._capacities[which]:
                self._metrics.inc("values_masked_total", 1, "cell_count_range")
                continue
            if which:
                if count != pack.temp_count:
                    pack.temp_count = count
                    pack.temp_version += 1
            elif count != pack.voltage_count:
                # another shape of pack: start the cycle afresh, all cells cleared
                pack.voltage_count = count
                pack.needed = self._needed(count)
                pack.voltages = [_NAN] * len(pack.voltages)
                pack.voltage_flags = [False] * len(pack.voltages)
                pack.seen = 0

    def _needed(self, count: int) -> int:
        """The voltage groups holding at least one of cells 0..count-1, as a bit mask."""
        needed = self._needed_cache.get(count)
        if needed is None:
            needed = 0
            for group, cells in enumerate(self.decoder.voltage_groups):
                if any(cell < count for cell in cells):
                    needed |= 1 << group
            self._needed_cache[count] = needed
        return needed

    # -- serials ------------------------------------------------------------------------------

    def _serial(self, pack: _Pack, parts: SerialParts, values: tuple[int, ...]) -> None:
        index = values[parts.index] if parts.index >= 0 else 0
        count = values[parts.count] if parts.count >= 0 else 1
        if not 0 <= index < count:
            self._serial_invalid(pack, f"chunk {index} of {count}")
            return
        if count != pack.chunk_count:
            pack.chunks = {}
            pack.chunk_count = count
        pack.chunks[index] = values[parts.text].to_bytes(parts.chars, parts.byteorder)
        if len(pack.chunks) < count:
            return
        text = b"".join(pack.chunks[i] for i in range(count)).rstrip(b"\0")
        pack.chunks = {}
        serial = text.decode("ascii", errors="replace")
        problem = _serial_problem(serial)
        if problem:
            self._serial_invalid(pack, f"{serial!r} is {problem}")
            return
        if serial == pack.serial:
            return
        if pack.serial:
            log.warning("pack_serial_changed", node=pack.label, old=pack.serial, new=serial,
                        detail="a different pack answers at this node; its values start afresh")
            pack.reset()
            self._fixed_counts(pack)
        else:
            log.info("pack_serial_learned", node=pack.label, serial=serial)
        pack.serial = serial

    def _serial_invalid(self, pack: _Pack, detail: str) -> None:
        self._metrics.inc("values_masked_total", 1, "serial_invalid")
        if detail != pack.serial_problem:
            pack.serial_problem = detail
            log.warning("pack_serial_invalid", node=pack.label, detail=detail,
                        note="logged once; repeats are counted in "
                             "values_masked_total{serial_invalid}")

    def _new_pack(self, node: int) -> _Pack:
        number = node >> self._node_shift
        label = str(number)
        serial = ""
        if not self.profile.serial_from_bus and self._configured_serial:
            serial = self._configured_serial if number == 0 \
                else f"{self._configured_serial}-{number}"
        voltage_capacity = self._voltage_spec.capacity if self._voltage_spec else 0
        temp_capacity = self._temp_spec.capacity if self._temp_spec else 0
        pack = _Pack(node, label, serial, voltage_capacity, temp_capacity,
                     self._unbound_scalars)
        self._fixed_counts(pack)
        self._packs[node] = pack
        log.info("pack_node_seen", node=label, serial=serial or None)
        return pack

    def _fixed_counts(self, pack: _Pack) -> None:
        """Set the counts the profile fixes; counts from the bus arrive with their frames."""
        if self._voltage_spec is not None and self._voltage_spec.count is not None:
            pack.voltage_count = self._voltage_spec.count
            pack.needed = self._needed(self._voltage_spec.count)
        if self._temp_spec is not None and self._temp_spec.count is not None:
            pack.temp_count = self._temp_spec.count

    # -- emission -----------------------------------------------------------------------------

    def flush(self, now_ts: float) -> list[Sample]:
        """Emit cycles left incomplete for ``cycle_timeout_s`` before ``now_ts``.

        ``now_ts`` is on the frames' clock (the newest frame's time on a replay, wall time on a
        live bus); ``math.inf`` emits every pending cycle (end of input). Also brings the
        decoder's frame counters up to date in the shared metrics.
        """
        self.decoder.sync_metrics()
        out: list[Sample] = []
        for pack in self._packs.values():
            if pack.seen and now_ts - pack.last_cell_ts >= self._cycle_timeout_s:
                self._end_cycle(pack, pack.last_cell_ts, out)
        return out

    def _end_cycle(self, pack: _Pack, ts: float, out: list[Sample]) -> None:
        sample = self._sample(pack, ts)
        if sample is not None:
            out.append(sample)
        # cells past the count are never emitted: clearing the counted ones is enough
        count = len(pack.voltages) if pack.voltage_count is None else pack.voltage_count
        nans, falses = self._clear
        pack.voltages[:count] = nans[:count]
        pack.voltage_flags[:count] = falses[:count]
        pack.seen = 0
        pack.last_emit_ts = ts

    def _sample(self, pack: _Pack, ts: float) -> Sample | None:
        if not pack.serial:
            self._metrics.inc("samples_dropped_total", 1, "no_serial")
            return None
        voltages = voltage_valid = temps = temp_valid = None
        if self._voltage_spec is not None:
            if pack.voltage_count is None:
                self._metrics.inc("samples_dropped_total", 1, "no_cell_count")
                return None
            count = pack.voltage_count
            voltages, voltage_valid, masked = self._masked(
                pack.voltages[:count], pack.voltage_flags[:count], None, ts,
                self._voltage_limits, "cell_voltage_range")
            self._account(masked)
        if self._temp_spec is not None and pack.temp_count is not None:
            temps, temp_valid = self._temperatures(pack, ts)
        stale_before = ts - self._stale_s
        scalars = pack.scalars
        if min(pack.scalar_ts) < stale_before:
            scalars = [value if stamp >= stale_before else _NAN
                       for value, stamp in zip(scalars, pack.scalar_ts, strict=True)]
        state = pack.texts[0] if pack.text_ts[0] >= stale_before else ""
        self._metrics.inc("samples_emitted_total")
        return Sample(
            serial=pack.serial, ts=ts,
            current_a=scalars[Target.CURRENT], pack_voltage_v=scalars[Target.PACK_VOLTAGE],
            bms_soc_pct=scalars[Target.SOC], state=state, fault_flags=pack.fault,
            cell_voltages_v=voltages, cell_voltage_valid=voltage_valid,
            cell_temps_c=temps, cell_temp_valid=temp_valid,
            min_cell_voltage_v=scalars[Target.MIN_CELL_VOLTAGE],
            max_cell_voltage_v=scalars[Target.MAX_CELL_VOLTAGE],
            min_cell_temp_c=scalars[Target.MIN_CELL_TEMP],
            max_cell_temp_c=scalars[Target.MAX_CELL_TEMP],
            # a description of the pack, not a measurement: it does not go stale
            rated_capacity_ah=pack.scalars[Target.RATED_CAPACITY], chemistry=pack.texts[1])

    def _temperatures(self, pack: _Pack, ts: float) -> tuple[FloatArray, BoolArray]:
        """The temperature vector, reused (read-only) while no sensor changed or went stale.

        Temperatures come about ten times slower than voltage cycles, so most samples share the
        previous sample's arrays; the masked-value counts are repeated for each sample.
        """
        cache = pack.temp_cache
        if cache is not None and cache.version == pack.temp_version \
                and cache.computed_ts <= ts < cache.valid_until:
            self._account(cache.masked)
            return cache.temps, cache.valid
        count = pack.temp_count
        assert count is not None
        stamps = pack.temp_ts[:count]
        temps, valid, masked = self._masked(pack.temps[:count], pack.temp_flags[:count], stamps,
                                            ts, self._temp_limits, "cell_temp_range")
        self._account(masked)
        fresh_before = ts - self._stale_s
        fresh = [stamp for stamp in stamps if stamp >= fresh_before]
        valid_until = min(fresh) + self._stale_s if fresh else math.inf
        pack.temp_cache = _TempCache(pack.temp_version, ts, valid_until, temps, valid, masked)
        return temps, valid

    def _masked(self, values: Sequence[float], flags: Sequence[bool],
                stamps: Sequence[float] | None, ts: float, limits: tuple[float, float],
                range_reason: str) -> tuple[FloatArray, BoolArray, tuple[tuple[str, int], ...]]:
        """Read-only values and validity: nan and False where missing, flagged, stale or
        implausible; and how many values each reason masked."""
        lo, hi = limits
        array = np.array(values, dtype=np.float64)
        if stamps is None and not any(flags):
            # the usual cycle: everything received, nothing flagged; nan compares False
            valid = array >= lo
            valid &= array <= hi
            if valid.all():
                array.setflags(write=False)
                valid.setflags(write=False)
                return array, valid, ()
        flagged = np.array(flags, dtype=np.bool_)
        received = ~np.isnan(array)
        valid = received & ~flagged
        stale = np.zeros_like(valid)
        if stamps is not None:
            fresh = np.array(stamps, dtype=np.float64) >= ts - self._stale_s
            stale = valid & ~fresh
            valid &= fresh
        plausible = (array >= lo) & (array <= hi)
        counts = ((range_reason, valid & ~plausible), ("flagged_invalid", received & flagged),
                  ("not_received", ~received), ("stale", stale))
        masked = tuple((reason, n) for reason, which in counts
                       if (n := int(np.count_nonzero(which))))
        valid &= plausible
        array[~valid] = np.nan
        array.setflags(write=False)
        valid.setflags(write=False)
        return array, valid, masked

    def _account(self, masked: tuple[tuple[str, int], ...]) -> None:
        for reason, n in masked:
            self._metrics.inc("values_masked_total", n, reason)

    # -- introspection for status and tests ---------------------------------------------------

    def serials(self) -> dict[int, str]:
        """The serial known for each node number seen on the bus ("" while unknown)."""
        return {node >> self._node_shift: pack.serial for node, pack in self._packs.items()}
