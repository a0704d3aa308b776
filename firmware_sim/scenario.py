"""Scenarios: a TOML file describes the pack, its physics, its sensors, its firmware, a schedule of
loads and the faults to inject.

Each section is a frozen dataclass with its defaults beside the field. The loader walks the
dataclasses, so an unknown key, a wrong type or a value out of range is a :class:`ScenarioError`
naming the file and the dotted key (``schedule.segment[2].c_rate``). Figures left out that depend
on the chemistry (resistances, voltage limits) are ``None`` here and taken from
:mod:`firmware_sim.chemistry` when the pack is built; that is documented per field, never a silent
fallback.

A scenario may start from another with ``[scenario] base = "NAME"`` (a shipped name or a path):
tables are merged key by key, arrays (segments, faults) are replaced whole.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from firmware_sim.chemistry import CHEMISTRIES


class ScenarioError(ValueError):
    """A scenario file or override is wrong; the message names the file and the dotted key."""


Check = Callable[[Any], str | None]


def _opt(default: Any, check: Check | None = None) -> Any:
    return field(default=default, metadata={"check": check})


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        if lo is not None and (value <= lo if lo_open else value < lo):
            return f"must be {'>' if lo_open else '≥'} {lo}, got {value}"
        if hi is not None and value > hi:
            return f"must be ≤ {hi}, got {value}"
        return None
    return check


def _choice(*allowed: str) -> Check:
    def check(value: Any) -> str | None:
        if value not in allowed:
            return f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        return None
    return check


def _serial(value: Any) -> str | None:
    if not 1 <= len(value) <= 28 or not all(32 < ord(c) < 127 for c in value):
        return f"must be 1–28 printable ASCII characters without spaces, got {value!r}"
    return None


_POSITIVE = _range(0.0, lo_open=True)
_NON_NEGATIVE = _range(0.0)
_FRACTION = _range(0.0, 1.0)

# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, slots=True)
class PackSection:
    chemistry: str = _opt("NMC", _choice(*CHEMISTRIES))
    rated_capacity_ah: float = _opt(50.0, _range(0.1, 6553.5))
    cells: int = _opt(16, _range(1, 256))
    sensors: int = _opt(4, _range(1, 64))
    serial: str = _opt("SIM-0001", _serial)
    node_id: int = _opt(0, _range(0, 15))
    initial_soc: float = _opt(0.8, _FRACTION)
    #: initial SOC of each cell is initial_soc ± this (uniform)
    initial_soc_spread: float = _opt(0.01, _range(0.0, 0.2))


@dataclass(frozen=True, slots=True)
class LeakyCell:
    cell: int = _opt(0, _NON_NEGATIVE)
    current_a: float = _opt(0.0, _NON_NEGATIVE)


@dataclass(frozen=True, slots=True)
class CellSection:
    #: each cell's capacity is rated × (1 ± capacity_spread), uniform
    capacity_spread: float = _opt(0.02, _range(0.0, 0.5))
    #: each cell's R0 (and R1, R2) is nominal × (1 ± r0_spread), uniform
    r0_spread: float = _opt(0.05, _range(0.0, 0.9))
    #: specific resistances (Ω·Ah, at 25 °C, 50 % SOC, new) and time constants; None: chemistry
    r0_ohm_ah: float | None = _opt(None, _POSITIVE)
    r1_ohm_ah: float | None = _opt(None, _POSITIVE)
    tau1_s: float | None = _opt(None, _POSITIVE)
    r2_ohm_ah: float | None = _opt(None, _POSITIVE)
    tau2_s: float | None = _opt(None, _POSITIVE)
    #: Arrhenius activation energy of R0, R1, R2 (J/mol); 0 disables the temperature dependence
    activation_energy_j_mol: float = _opt(25_000.0, _range(0.0, 100_000.0))
    #: R0 rises towards empty by up to this fraction (and towards full by r0_high_soc_gain)
    r0_low_soc_gain: float = _opt(0.5, _range(0.0, 10.0))
    r0_high_soc_gain: float = _opt(0.1, _range(0.0, 10.0))
    #: self-discharge current of every cell (A), ± leakage_spread_a (uniform, never below 0)
    leakage_a: float = _opt(0.0, _range(0.0, 10.0))
    leakage_spread_a: float = _opt(0.0, _range(0.0, 10.0))
    #: extra self-discharge of single cells (an internal soft short)
    leaky_cells: tuple[LeakyCell, ...] = ()


@dataclass(frozen=True, slots=True)
class ThermalSection:
    ambient_c: float = _opt(25.0, _range(-40.0, 80.0))
    #: peak-to-mean amplitude of a daily sine, coldest at 04:00, warmest at 16:00
    ambient_daily_swing_c: float = _opt(0.0, _range(0.0, 30.0))
    #: hour of day at simulated time 0 (only the ambient swing uses it)
    hour_of_day_at_start: float = _opt(8.0, _range(0.0, 24.0))
    #: initial cell temperature; None: the ambient at time 0
    initial_temp_c: float | None = _opt(None, _range(-40.0, 80.0))
    heat_capacity_j_per_k_ah: float = _opt(18.0, _POSITIVE)
    cooling_w_per_k_ah: float = _opt(0.01, _NON_NEGATIVE)
    coupling_w_per_k_ah: float = _opt(0.006, _NON_NEGATIVE)
    #: the first and last cell of the string lose heat faster (more free surface)
    end_cell_cooling_gain: float = _opt(1.3, _range(0.0, 10.0))


@dataclass(frozen=True, slots=True)
class AgingSection:
    #: multiplies both aging clocks (full equivalent cycles and days) for accelerated tests
    acceleration: float = _opt(1.0, _range(0.0, 1e6))
    capacity_fade_per_efc: float = _opt(1.5e-4, _range(0.0, 0.1))
    capacity_fade_per_sqrt_day: float = _opt(2.0e-3, _range(0.0, 0.1))
    resistance_growth_per_efc: float = _opt(3.0e-4, _range(0.0, 1.0))
    resistance_growth_per_sqrt_day: float = _opt(4.0e-3, _range(0.0, 1.0))
    #: the pack's age at time 0 (aging-clock units)
    initial_efc: float = _opt(0.0, _NON_NEGATIVE)
    initial_age_days: float = _opt(0.0, _NON_NEGATIVE)


@dataclass(frozen=True, slots=True)
class BalancingSection:
    enabled: bool = True
    #: bleed a cell whose voltage exceeds the lowest cell's by more than this
    threshold_v: float = _opt(0.010, _range(0.0, 1.0))
    current_a: float = _opt(0.1, _range(0.0, 10.0))
    #: balance only above this cell voltage; None: the chemistry's
    min_cell_v: float | None = _opt(None, _range(0.0, 6.0))


@dataclass(frozen=True, slots=True)
class ProtectionSection:
    cell_v_max: float | None = _opt(None, _range(0.0, 6.5))
    cell_v_min: float | None = _opt(None, _range(0.0, 6.5))
    temp_max_c: float = _opt(60.0, _range(-40.0, 87.5))
    temp_min_c: float = _opt(-25.0, _range(-40.0, 87.5))
    #: overcurrent limit as a multiple of the rated capacity (C-rate)
    current_max_c: float = _opt(5.0, _POSITIVE)
    #: a fault holds the contactors open at least this long
    hold_s: float = _opt(10.0, _NON_NEGATIVE)


@dataclass(frozen=True, slots=True)
class SensorSection:
    voltage_noise_v: float = _opt(0.001, _range(0.0, 1.0))
    voltage_lsb_v: float = _opt(0.001, _range(0.0, 1.0))
    pack_voltage_noise_v: float = _opt(0.02, _range(0.0, 100.0))
    current_full_scale_a: float = _opt(250.0, _POSITIVE)
    current_noise_a: float = _opt(0.05, _range(0.0, 1000.0))
    #: offset as a fraction of full scale (0.001 = 0.1 %)
    current_offset_fs: float = _opt(0.001, _range(-0.1, 0.1))
    #: measured = true × (1 + gain error) + offset + noise
    current_gain_error: float = _opt(0.001, _range(-0.5, 0.5))
    current_lsb_a: float = _opt(0.01, _range(0.0, 100.0))
    temp_noise_c: float = _opt(0.2, _range(0.0, 20.0))
    temp_lsb_c: float = _opt(0.1, _range(0.0, 10.0))
    #: each sensor has a fixed offset of ± this (uniform)
    temp_offset_spread_c: float = _opt(0.0, _range(0.0, 20.0))
    #: the current sample is this much older than the cell voltages of the same cycle
    #: (rounded to whole physics steps)
    current_skew_s: float = _opt(0.0, _range(0.0, 10.0))


@dataclass(frozen=True, slots=True)
class ProtocolSection:
    #: physics time step; every period below must be a whole multiple of it
    physics_step_s: float = _opt(0.1, _range(0.001, 10.0))
    pack_status_period_s: float = _opt(0.1, _POSITIVE)
    cell_stats_period_s: float = _opt(0.1, _POSITIVE)
    cell_voltages_period_s: float = _opt(0.1, _POSITIVE)
    cell_temps_period_s: float = _opt(1.0, _POSITIVE)
    balancing_period_s: float = _opt(1.0, _POSITIVE)
    identity_period_s: float = _opt(1.0, _POSITIVE)
    info_period_s: float = _opt(1.0, _POSITIVE)
    #: spacing of the frames of one burst on the bus (an 8-byte frame at 500 kbit/s ≈ 0.23 ms)
    frame_gap_s: float = _opt(0.00025, _range(0.0, 0.1))
    #: offset of the bursts after the physics sample instant
    phase_s: float = _opt(0.0, _range(0.0, 10.0))
    protocol_version: int = _opt(1, _range(0, 15))
    #: where the trace says the frames were seen (candump channel)
    channel: str = _opt("can0", lambda v: None if v and " " not in v else "must be a word")


@dataclass(frozen=True, slots=True)
class TruthSection:
    interval_s: float = _opt(10.0, _POSITIVE)


# --- schedule segments ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestSegment:
    kind: str = "rest"
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    #: end when the time since the start of this pass of the schedule reaches this
    until_schedule_s: float | None = _opt(None, _NON_NEGATIVE)


@dataclass(frozen=True, slots=True)
class ConstantSegment:
    """Constant current, positive = discharge; exactly one of ``current_a`` and ``c_rate``."""

    kind: str = "constant"
    current_a: float | None = None
    c_rate: float | None = None
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    until_schedule_s: float | None = _opt(None, _NON_NEGATIVE)
    until_min_cell_v: float | None = _opt(None, _range(0.0, 6.5))
    until_max_cell_v: float | None = _opt(None, _range(0.0, 6.5))
    until_soc_below: float | None = _opt(None, _FRACTION)
    until_soc_above: float | None = _opt(None, _FRACTION)
    #: end when the lowest cell reaches the chemistry's discharge cut-off voltage (under load)
    until_cutoff: bool = False


@dataclass(frozen=True, slots=True)
class PulsesSegment:
    """A train of current steps (C-rates, positive = discharge), each followed by a rest."""

    kind: str = "pulses"
    c_rates: tuple[float, ...] = (1.0, -0.5, 0.5)
    pulse_s: float = _opt(10.0, _POSITIVE)
    rest_s: float = _opt(60.0, _NON_NEGATIVE)
    repeat: int = _opt(1, _range(1, 100_000))


@dataclass(frozen=True, slots=True)
class DriveSegment:
    """A synthetic drive cycle: trips of acceleration, cruise, braking (regeneration) and stops."""

    kind: str = "drive"
    duration_s: float = _opt(1800.0, _POSITIVE)
    mean_c: float = _opt(0.3, _range(0.0, 10.0, lo_open=True))
    peak_c: float = _opt(2.0, _POSITIVE)
    regen_c: float = _opt(0.5, _NON_NEGATIVE)
    until_soc_below: float | None = _opt(None, _FRACTION)
    until_min_cell_v: float | None = _opt(None, _range(0.0, 6.5))


@dataclass(frozen=True, slots=True)
class ChargeSegment:
    """CC-CV charge: ``c_rate`` until the highest cell reaches ``cv_cell_v``, then constant
    voltage until the current falls below ``taper_c``."""

    kind: str = "charge"
    c_rate: float = _opt(0.5, _POSITIVE)
    #: None: the chemistry's charge voltage
    cv_cell_v: float | None = _opt(None, _range(0.0, 6.5))
    taper_c: float = _opt(0.05, _POSITIVE)
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    until_schedule_s: float | None = _opt(None, _NON_NEGATIVE)


Segment = RestSegment | ConstantSegment | PulsesSegment | DriveSegment | ChargeSegment
SEGMENT_KINDS: dict[str, type[Any]] = {
    "rest": RestSegment, "constant": ConstantSegment, "pulses": PulsesSegment,
    "drive": DriveSegment, "charge": ChargeSegment,
}


@dataclass(frozen=True, slots=True)
class Schedule:
    #: start again from the first segment when the last ends (else rest for ever)
    repeat: bool = True
    segment: tuple[Segment, ...] = ()


# --- faults -----------------------------------------------------------------------------------

#: frame names the frame-level faults may be restricted to
FRAME_NAMES = ("BMS_PackStatus", "BMS_CellStats", "BMS_CellVoltages", "BMS_CellTemperatures",
               "BMS_Balancing", "BMS_Identity", "BMS_Info")


def _frame_names(value: Any) -> str | None:
    bad = [v for v in value if v not in FRAME_NAMES]
    return f"unknown frame names {bad}; valid: {', '.join(FRAME_NAMES)}" if bad else None


@dataclass(frozen=True, slots=True)
class StuckCellFault:
    """Cell ``cell``'s reported voltage freezes at its value when the fault starts."""

    kind: str = "stuck_cell"
    start_s: float = _opt(0.0, _NON_NEGATIVE)
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    cell: int = _opt(0, _NON_NEGATIVE)
    #: whether the firmware notices: invalid bit and fault flag bit 6 (sensor fault)
    flagged: bool = False


@dataclass(frozen=True, slots=True)
class DroppedFramesFault:
    kind: str = "dropped_frames"
    start_s: float = _opt(0.0, _NON_NEGATIVE)
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    probability: float = _opt(0.01, _FRACTION)
    #: only these frames (names from the DBC); empty: all
    messages: tuple[str, ...] = _opt((), _frame_names)


@dataclass(frozen=True, slots=True)
class CorruptedPayloadFault:
    kind: str = "corrupted_payload"
    start_s: float = _opt(0.0, _NON_NEGATIVE)
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    probability: float = _opt(0.01, _FRACTION)
    #: bitflip: one random bit flipped; random: random bytes; truncate: DLC cut to 0..7
    mode: str = _opt("bitflip", _choice("bitflip", "random", "truncate"))
    messages: tuple[str, ...] = _opt((), _frame_names)


@dataclass(frozen=True, slots=True)
class ErrorFramesFault:
    kind: str = "error_frames"
    start_s: float = _opt(0.0, _NON_NEGATIVE)
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    #: mean rate of a Poisson process
    rate_hz: float = _opt(1.0, _range(0.0, 1000.0, lo_open=True))


@dataclass(frozen=True, slots=True)
class BusOffFault:
    """The BMS goes bus-off for the window: one bus-off error frame, then silence."""

    kind: str = "bus_off"
    start_s: float = _opt(0.0, _NON_NEGATIVE)
    duration_s: float | None = _opt(5.0, _NON_NEGATIVE)


@dataclass(frozen=True, slots=True)
class DuplicateSerialFault:
    """A second pack (its own physics and noise) sends the same serial under another node id."""

    kind: str = "duplicate_serial"
    start_s: float = _opt(0.0, _NON_NEGATIVE)
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    #: None: the primary node id + 1 (mod 16)
    node_id: int | None = _opt(None, _range(0, 15))
    #: the second BMS's bursts lag the first's by this much (unsynchronised clocks)
    phase_s: float = _opt(0.037, _range(0.0, 10.0))


@dataclass(frozen=True, slots=True)
class OutOfRangeFault:
    """A reported value replaced by ``value`` (clipped only to what the DBC field can carry)."""

    kind: str = "out_of_range"
    start_s: float = _opt(0.0, _NON_NEGATIVE)
    duration_s: float | None = _opt(None, _NON_NEGATIVE)
    signal: str = _opt("cell_voltage", _choice("cell_voltage", "cell_temp", "current",
                                               "pack_voltage"))
    #: cell index (cell_voltage) or sensor index (cell_temp)
    index: int = _opt(0, _NON_NEGATIVE)
    value: float = 6.5535


Fault = (StuckCellFault | DroppedFramesFault | CorruptedPayloadFault | ErrorFramesFault
         | BusOffFault | DuplicateSerialFault | OutOfRangeFault)
FAULT_KINDS: dict[str, type[Any]] = {
    "stuck_cell": StuckCellFault, "dropped_frames": DroppedFramesFault,
    "corrupted_payload": CorruptedPayloadFault, "error_frames": ErrorFramesFault,
    "bus_off": BusOffFault, "duplicate_serial": DuplicateSerialFault,
    "out_of_range": OutOfRangeFault,
}


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str = "unnamed"
    description: str = ""
    pack: PackSection = field(default_factory=PackSection)
    cell: CellSection = field(default_factory=CellSection)
    thermal: ThermalSection = field(default_factory=ThermalSection)
    aging: AgingSection = field(default_factory=AgingSection)
    balancing: BalancingSection = field(default_factory=BalancingSection)
    protection: ProtectionSection = field(default_factory=ProtectionSection)
    sensors: SensorSection = field(default_factory=SensorSection)
    protocol: ProtocolSection = field(default_factory=ProtocolSection)
    truth: TruthSection = field(default_factory=TruthSection)
    schedule: Schedule = field(default_factory=Schedule)
    fault: tuple[Fault, ...] = ()


# ---------------------------------------------------------------------------------------------
# Loading

_MAX_BASE_DEPTH = 8


def shipped_scenarios() -> list[str]:
    """Names of the scenarios shipped in ``firmware_sim/scenarios``."""
    folder = resources.files("firmware_sim") / "scenarios"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _read_raw(source: str | Path, depth: int = 0) -> tuple[str, dict[str, Any], str]:
    """(name, merged raw table, where) of a shipped name or a path, with its bases merged in."""
    if depth > _MAX_BASE_DEPTH:
        raise ScenarioError(f"{source}: scenario bases nest deeper than {_MAX_BASE_DEPTH}")
    text: str
    if isinstance(source, str) and source in shipped_scenarios():
        where = f"scenario '{source}'"
        name = source
        text = (resources.files("firmware_sim") / "scenarios" / f"{source}.toml").read_text()
    else:
        path = Path(source)
        if not path.is_file():
            raise ScenarioError(
                f"no scenario named {str(source)!r}: not a shipped scenario "
                f"({', '.join(shipped_scenarios())}) nor a file")
        where = str(path)
        name = path.stem
        text = path.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{where}: {exc}") from exc
    head = raw.get("scenario", {})
    base = head.get("base") if isinstance(head, dict) else None
    if base is not None:
        if not isinstance(base, str):
            raise ScenarioError(f"{where}: key 'scenario.base' must be a string")
        _, base_raw, _ = _read_raw(base, depth + 1)
        base_raw.get("scenario", {}).pop("name", None)
        raw = deep_merge(base_raw, raw)
    return name, raw, where


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merged key by key; anything else (arrays included) from ``over`` replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_scenario(source: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Load a shipped scenario by name, or a TOML file, with optional overrides (same shape as
    the TOML: ``{"pack": {"cells": 96}}``) merged on top."""
    name, raw, where = _read_raw(source)
    if overrides:
        raw = deep_merge(raw, overrides)
    head = raw.pop("scenario", {})
    if not isinstance(head, dict):
        raise ScenarioError(f"{where}: 'scenario' must be a table")
    unknown = set(head) - {"name", "description", "base"}
    if unknown:
        raise ScenarioError(f"{where}: unknown key 'scenario.{sorted(unknown)[0]}'")
    raw["name"] = head.get("name", name)
    raw["description"] = head.get("description", "")
    scenario = _build(Scenario, raw, "", where)
    validate(scenario, where)
    return typing.cast(Scenario, scenario)


def _build(cls: type[Any], raw: Any, key: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: key '{key}' must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for unknown in raw:
        if unknown not in names:
            dotted = f"{key}.{unknown}" if key else unknown
            raise ScenarioError(f"{where}: unknown key '{dotted}'")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        dotted = f"{key}.{f.name}" if key else f.name
        value = _convert(hints[f.name], raw[f.name], dotted, where)
        check = f.metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ScenarioError(f"{where}: key '{dotted}' {problem}")
        values[f.name] = value
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if type(None) in args and len(args) == 2:
            inner = next(a for a in args if a is not type(None))
            return _convert(inner, value, key, where)
        # a union of dataclasses told apart by their 'kind'
        registry = {a.__dataclass_fields__["kind"].default: a for a in args}
        if not isinstance(value, dict) or value.get("kind") not in registry:
            raise ScenarioError(
                f"{where}: key '{key}.kind' must be one of {', '.join(map(repr, registry))}, "
                f"got {value.get('kind') if isinstance(value, dict) else value!r}")
        return _build(registry[value["kind"]], value, key, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ScenarioError(f"{where}: key '{key}' must be an array")
        return tuple(_convert(args[0], item, f"{key}[{i}]", where) for i, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type[Any], hint), value, key, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is int or hint is bool or hint is str:
        if type(value) is not hint:
            raise ScenarioError(f"{where}: key '{key}' must be {hint.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported scenario field type {hint!r} at {key}")


def _window_ok(start: float, duration: float | None) -> bool:
    return start >= 0 and (duration is None or duration >= 0)


def validate(s: Scenario, where: str) -> None:
    """Checks that span several keys."""
    def fail(key: str, message: str) -> None:
        raise ScenarioError(f"{where}: key '{key}' {message}")

    p = s.protocol
    dt_us = round(p.physics_step_s * 1e6)
    if abs(dt_us - p.physics_step_s * 1e6) > 1e-6:
        fail("protocol.physics_step_s", "must be a whole number of microseconds")
    for name in ("pack_status_period_s", "cell_stats_period_s", "cell_voltages_period_s",
                 "cell_temps_period_s", "balancing_period_s", "identity_period_s",
                 "info_period_s"):
        period = getattr(p, name)
        ratio = period / p.physics_step_s
        if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
            fail(f"protocol.{name}", f"must be a whole multiple of physics_step_s "
                                     f"({p.physics_step_s}), got {period}")
    for i, leaky in enumerate(s.cell.leaky_cells):
        if leaky.cell >= s.pack.cells:
            fail(f"cell.leaky_cells[{i}].cell", f"must be < pack.cells ({s.pack.cells})")
    if s.sensors.voltage_lsb_v and s.sensors.voltage_lsb_v < 1e-4:
        fail("sensors.voltage_lsb_v", "must be 0 or ≥ 0.0001 (the DBC's resolution)")
    for i, seg in enumerate(s.schedule.segment):
        key = f"schedule.segment[{i}]"
        if isinstance(seg, RestSegment) and seg.duration_s is None \
                and seg.until_schedule_s is None:
            fail(key, "(rest) needs duration_s or until_schedule_s")
        if isinstance(seg, ConstantSegment):
            if (seg.current_a is None) == (seg.c_rate is None):
                fail(key, "(constant) needs exactly one of current_a and c_rate")
            if not seg.until_cutoff and all(v is None for v in (
                    seg.duration_s, seg.until_schedule_s, seg.until_min_cell_v,
                    seg.until_max_cell_v, seg.until_soc_below, seg.until_soc_above)):
                fail(key, "(constant) needs a duration_s or an until_* condition")
        if isinstance(seg, PulsesSegment) and not seg.c_rates:
            fail(f"{key}.c_rates", "must not be empty")
    for i, fault in enumerate(s.fault):
        key = f"fault[{i}]"
        if not _window_ok(fault.start_s, fault.duration_s):
            fail(key, "has a negative window")
        if isinstance(fault, StuckCellFault) and fault.cell >= s.pack.cells:
            fail(f"{key}.cell", f"must be < pack.cells ({s.pack.cells})")
        if isinstance(fault, OutOfRangeFault):
            limit = {"cell_voltage": s.pack.cells, "cell_temp": s.pack.sensors}.get(fault.signal)
            if limit is not None and fault.index >= limit:
                fail(f"{key}.index", f"must be < {limit} for {fault.signal}")
        if isinstance(fault, DuplicateSerialFault):
            other = fault.node_id if fault.node_id is not None else (s.pack.node_id + 1) % 16
            if other == s.pack.node_id:
                fail(f"{key}.node_id", "must differ from pack.node_id")
    if sum(isinstance(f, DuplicateSerialFault) for f in s.fault) > 1:
        fail("fault", "may hold at most one duplicate_serial")
