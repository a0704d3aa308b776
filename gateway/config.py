"""Typed configuration, validated once at start-up.

The file is TOML. Each section is a frozen dataclass whose defaults sit beside the field; the loader
walks the dataclasses, so an unknown key, a wrong type or a value out of range is a
:class:`~gateway.errors.ConfigError` naming the dotted key (``mqtt.tls.ca_file``). Relative
paths are resolved against the configuration file's folder; a path may start with
``${CREDENTIALS_DIRECTORY}``, systemd's folder of the unit's credentials (secrets).
``config/gateway.example.toml`` documents every key with its default and must stay in step with
this module (a test checks that).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Field helpers: validation rules live in field metadata, next to the default.


def _opt(default: Any, *, check: Callable[[Any], str | None] | None = None,
         path: bool = False, doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "path": path, "doc": doc})


def _section(cls: type[Any]) -> Any:
    return field(default_factory=cls)


def _list(*, path: bool = False) -> Any:
    return field(default_factory=list, metadata={"check": None, "path": path, "doc": ""})


def _table() -> Any:
    return field(default_factory=dict, metadata={"check": None, "path": False, "doc": ""})


def _range(lo: float | None = None, hi: float | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if lo is not None and value < lo:
            return f"must be ≥ {lo}, got {value}"
        if hi is not None and value > hi:
            return f"must be ≤ {hi}, got {value}"
        return None
    return check


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in allowed:
            return f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        return None
    return check


def _nonempty(value: Any) -> str | None:
    return "must not be empty" if not value else None


def _topic_part(value: Any) -> str | None:
    if not value or any(c in value for c in "+#\0") or value.startswith("/") or value.endswith("/"):
        return f"must be a non-empty MQTT topic without wildcards or edge slashes, got {value!r}"
    return None


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, slots=True)
class GatewaySection:
    id: str = _opt("", check=_topic_part, doc="this gateway's id, part of topics and seq keys")
    log_level: str = _opt("info", check=_choice("debug", "info", "warning", "error"))
    log_format: str = _opt("auto", check=_choice("auto", "json", "console"))
    status_interval_s: float = _opt(2.0, check=_range(0.1, 3600))
    watchdog_stall_s: float = _opt(30.0, check=_range(1, 3600))


@dataclass(frozen=True, slots=True)
class SimulatorSection:
    scenario: str = _opt("nominal", check=_nonempty)
    cells: int = _opt(16, check=_range(1, 256))
    sensors: int = _opt(4, check=_range(1, 64))
    serial: str = _opt("SIM-0001", check=_topic_part)
    seed: int = _opt(1)
    speed: float = _opt(1.0, check=_range(0.0, 10000.0))


@dataclass(frozen=True, slots=True)
class SourceSection:
    kind: str = _opt("bus", check=_choice("bus", "replay", "simulator"))
    interface: str = _opt("socketcan", check=_nonempty)
    channel: str = _opt("can0")
    bitrate: int = _opt(0, check=_range(0, 8_000_000))
    receive_filters: str = _opt("dbc", check=_choice("dbc", "none"))
    options: dict[str, Any] = _table()
    files: list[str] = _list(path=True)
    replay_speed: float = _opt(1.0, check=_range(0.0, 10000.0))
    queue_frames: int = _opt(100_000, check=_range(100, 10_000_000))
    reopen_backoff_s: float = _opt(1.0, check=_range(0.01, 600))
    simulator: SimulatorSection = _section(SimulatorSection)


@dataclass(frozen=True, slots=True)
class ProfileSection:
    path: str = _opt("", check=_nonempty, path=True)
    dbc: str = _opt("", path=True, doc="use this DBC instead of the one the profile names")
    serial: str = _opt("", doc="serial to use when the bus sends none")


@dataclass(frozen=True, slots=True)
class EdgeSection:
    telemetry_interval_s: float = _opt(1.0, check=_range(0.0, 3600))
    health_interval_s: float = _opt(60.0, check=_range(0.1, 86400))
    rated_capacity_ah: float = _opt(0.0, check=_range(0.0, 100000))
    min_step_c_rate: float = _opt(0.2, check=_range(0.01, 10))
    cell_voltage_min_v: float = _opt(0.5, check=_range(0.0, 10))
    cell_voltage_max_v: float = _opt(5.0, check=_range(0.0, 10))
    cell_temp_min_c: float = _opt(-40.0, check=_range(-100, 200))
    cell_temp_max_c: float = _opt(100.0, check=_range(-100, 200))
    # Estimators (docs/records.md explains each figure they produce).
    chemistry: str = _opt("", doc="cell chemistry (NMC, LFP); empty: as the BMS reports it")
    ocv_soc: list[float] = _list()
    ocv_voltage_v: list[float] = _list()
    current_lag_s: float = _opt(0.0, check=_range(0.0, 10.0))
    rest_current_c_rate: float = _opt(0.01, check=_range(0.0, 1.0))
    rest_settle_s: float = _opt(30.0, check=_range(0.0, 3600))
    ocv_rest_s: float = _opt(1800.0, check=_range(1.0, 86400))
    ocv_sigma_v: float = _opt(0.002, check=_range(1e-6, 1.0))
    current_gain_sigma: float = _opt(0.005, check=_range(1e-6, 1.0))
    capacity_forgetting: float = _opt(0.98, check=_range(0.5, 1.0))
    capacity_min_delta_soc: float = _opt(0.1, check=_range(0.01, 1.0))
    rc_time_constant_s: float = _opt(20.0, check=_range(0.1, 10000))
    rls_memory_s: float = _opt(600.0, check=_range(1.0, 1e7))
    activation_energy_j_mol: float = _opt(30000.0, check=_range(0.0, 200000))
    baseline_efc: float = _opt(1.0, check=_range(0.0, 1000))
    extreme_high_temp_c: float = _opt(45.0, check=_range(-100, 200))
    extreme_low_temp_c: float = _opt(0.0, check=_range(-100, 200))
    deep_discharge_v: float = _opt(0.0, check=_range(0.0, 10))
    overcharge_v: float = _opt(0.0, check=_range(0.0, 10))
    flag_z_score: float = _opt(3.5, check=_range(1.0, 100))
    flag_r0_increase: float = _opt(0.15, check=_range(0.0, 10))
    flag_capacity_decrease: float = _opt(0.05, check=_range(0.0, 1.0))
    flag_leakage_c_rate: float = _opt(0.0002, check=_range(0.0, 1.0))


@dataclass(frozen=True, slots=True)
class StoreSection:
    path: str = _opt("/var/lib/bms-gateway/store.sqlite", check=_nonempty, path=True)
    max_bytes: int = _opt(256 * 1024 * 1024, check=_range(64 * 1024, None))
    max_records: int = _opt(2_000_000, check=_range(100, None))
    min_free_bytes: int = _opt(64 * 1024 * 1024, check=_range(0, None))
    when_full: str = _opt("drop_oldest", check=_choice("drop_oldest"))


@dataclass(frozen=True, slots=True)
class TlsSection:
    enabled: bool = _opt(False)
    ca_file: str = _opt("", path=True)
    cert_file: str = _opt("", path=True)
    key_file: str = _opt("", path=True)
    insecure_skip_verify: bool = _opt(False)


@dataclass(frozen=True, slots=True)
class MqttSection:
    host: str = _opt("localhost", check=_nonempty)
    port: int = _opt(1883, check=_range(1, 65535))
    topic_prefix: str = _opt("bms", check=_topic_part)
    client_id: str = _opt("")
    username: str = _opt("")
    password_file: str = _opt("", path=True)
    keepalive_s: int = _opt(30, check=_range(5, 3600))
    inflight: int = _opt(32, check=_range(1, 65535))
    batch_max_records: int = _opt(200, check=_range(1, 100_000))
    batch_max_bytes: int = _opt(256 * 1024, check=_range(1024, 256 * 1024 * 1024))
    publish_interval_s: float = _opt(1.0, check=_range(0.0, 3600))
    reconnect_min_s: float = _opt(0.5, check=_range(0.05, 600))
    reconnect_max_s: float = _opt(30.0, check=_range(0.1, 3600))
    retry_backoff_s: float = _opt(2.0, check=_range(0.0, 3600))
    tls: TlsSection = _section(TlsSection)


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewaySection = _section(GatewaySection)
    source: SourceSection = _section(SourceSection)
    profile: ProfileSection = _section(ProfileSection)
    edge: EdgeSection = _section(EdgeSection)
    store: StoreSection = _section(StoreSection)
    mqtt: MqttSection = _section(MqttSection)
    #: the file this was loaded from, for messages; not a key
    file: str = field(default="", metadata={"internal": True})


# ---------------------------------------------------------------------------------------------
# Loader


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a configuration file. Raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("configuration file not found", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason}", path=str(path),
                          line=_bad_byte_line(exc)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc}", path=str(path)) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(exc, text)
        raise ConfigError(f"not valid TOML: {exc}", path=str(path), line=line) from exc
    config = parse_config(raw, base_dir=path.resolve().parent, file=str(path))
    # required keys: their defaults are empty, and a default is not checked like a value
    for key, value in (("gateway.id", config.gateway.id), ("profile.path", config.profile.path)):
        if not value:
            raise ConfigError("is required", path=str(path), key=key)
    return config


def parse_config(raw: Mapping[str, Any], *, base_dir: Path, file: str = "<config>") -> Config:
    """Validate an already-parsed TOML document (a dict) into a :class:`Config`."""
    built: Config = _build(Config, raw, prefix="", base_dir=base_dir, file=file)
    return dataclasses.replace(built, file=file)


def _toml_error_line(exc: tomllib.TOMLDecodeError, document: str = "") -> int | None:
    """The line a TOML error is at; "at end of document" is the document's last line."""
    lineno = getattr(exc, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    text = str(exc)
    marker = "(at line "
    if marker in text:
        try:
            return int(text.split(marker, 1)[1].split(",", 1)[0])
        except ValueError:
            return None
    if "(at end of document)" in text and document:
        return document.count("\n") + (0 if document.endswith("\n") else 1)
    return None


def _bad_byte_line(exc: UnicodeDecodeError) -> int:
    """The line of the first byte that is not UTF-8."""
    return bytes(exc.object[:exc.start]).count(b"\n") + 1


def _build(cls: type[Any], raw: Any, *, prefix: str, base_dir: Path, file: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"must be a table, got {type(raw).__name__}", path=file,
                          key=prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"unknown key (valid keys here: {', '.join(sorted(fields))})",
                          path=file, key=key)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw.get(name, {}), prefix=key + ".", base_dir=base_dir,
                                  file=file)
            continue
        if name not in raw:
            if f.default_factory is not dataclasses.MISSING:
                values[name] = f.default_factory()
            else:
                values[name] = f.default
                if f.metadata.get("path") and values[name]:
                    values[name] = _resolve(values[name], base_dir)
            continue
        value = _coerce(raw[name], hint, key=key, file=file)
        check = f.metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(problem, path=file, key=key)
        if f.metadata.get("path") and value:
            value = ([_resolve(v, base_dir) for v in value] if isinstance(value, list)
                     else _resolve(value, base_dir))
        values[name] = value
    return cls(**values)



#: Path values may start with this: the folder where systemd puts the unit's credentials
#: (``LoadCredential=`` in systemd/bms-gateway.service), known only when the service starts.
CREDENTIALS_PREFIX = "${CREDENTIALS_DIRECTORY}"


def _resolve(value: str, base_dir: Path) -> str:
    if value.startswith(CREDENTIALS_PREFIX):
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            # outside the service (an operator's `status`): kept as written, never read here
            return value
        value = folder + value[len(CREDENTIALS_PREFIX):]
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else (base_dir / p))


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _coerce(value: Any, hint: Any, *, key: str, file: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"must be a list, got {type(value).__name__}", path=file, key=key)
        return [_coerce(v, item, key=f"{key}[{i}]", file=file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"must be a table, got {type(value).__name__}", path=file, key=key)
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", path=file, key=key)
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"must be {_TYPE_NAMES.get(hint, hint)}, got {value!r}", path=file, key=key)
