"""Pack profiles: which DBC signals are a pack's cells, current, voltage, state and serial.

A profile is a small TOML file (see docs/profiles.md) naming a DBC and mapping its signals onto the
canonical pack model of :class:`gateway.model.Sample`. :func:`load_profile` reads the TOML and the
DBC once, validates every key against the DBC, and resolves the profile into a flat tuple of
:class:`Binding` — "signal S of message M (when selector X has value v) feeds target T, cell i,
scaled by factor and offset into V, A or °C". Everything the per-frame path needs is computed here
or in the decoder at load time; nothing is looked up by name per frame.

Three ways of addressing cells are all expanded into bindings:

- ``template``: one signal per cell, named by a template (``CellVoltage_{i:03d}``, foxBMS 2) or
  listed explicitly (``signals = [...]``, Chevrolet Volt);
- ``multiplexed``: an index signal (a DBC multiplexer or a plain "block" signal) plus several value
  signals per frame, the cell index given by an expression such as ``block * 3 + j`` (the
  reference protocol);
- ``indexed``: one cell per frame, an index signal and a value signal.

Errors name the profile file and the dotted key (``cell_voltages.index``), or the DBC file and line.
"""

from __future__ import annotations

import ast
import enum
import re
import string
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cantools
import structlog
import textparser

from gateway.config import _bad_byte_line, _toml_error_line
from gateway.errors import ConfigError

log = structlog.get_logger(__name__)

#: No pack model here addresses more cells or sensors than this; a layout that would is a mistake.
MAX_CELLS = 4096
#: The widest index signal whose every value is expanded at load time (one binding set per value).
MAX_INDEX_BITS = 16
#: The most node-id bits a profile may declare: 2**8 packs on one bus.
MAX_NODE_BITS = 8


class Target(enum.IntEnum):
    """What a bound signal feeds.

    The first eight are the numeric pack values, in the order of the assembler's scalar slots.
    """

    CURRENT = 0
    PACK_VOLTAGE = 1
    SOC = 2
    MIN_CELL_VOLTAGE = 3
    MAX_CELL_VOLTAGE = 4
    MIN_CELL_TEMP = 5
    MAX_CELL_TEMP = 6
    RATED_CAPACITY = 7
    STATE = 8
    CHEMISTRY = 9
    FAULT_FLAGS = 10
    FAULT_BIT = 11
    CELL_VOLTAGE = 12
    CELL_VOLTAGE_INVALID = 13
    CELL_VOLTAGE_INVALID_MASK = 14
    CELL_VOLTAGE_COUNT = 15
    CELL_TEMP = 16
    CELL_TEMP_INVALID = 17
    CELL_TEMP_INVALID_MASK = 18
    CELL_TEMP_COUNT = 19
    SERIAL_TEXT = 20
    SERIAL_CHUNK_INDEX = 21
    SERIAL_CHUNK_COUNT = 22


#: Numeric pack values (scalar slots 0..7 of the assembler, one per target).
SCALAR_TARGETS = tuple(Target(t) for t in range(Target.RATED_CAPACITY + 1))
#: Text pack values: the DBC's value table names the raw value (``VAL_``), else its decimal text.
TEXT_TARGETS = (Target.STATE, Target.CHEMISTRY)


@dataclass(frozen=True, slots=True)
class Binding:
    """One DBC signal feeding one target of the pack model.

    ``selector`` names the signal that decides whether this signal is present in a frame: the DBC
    multiplexer of a multiplexed message, or the index signal of a ``multiplexed``/``indexed``
    layout. The binding applies only to frames where the selector's raw value is
    ``selector_value``; with no selector it applies to every frame of the message.

    The physical value, in V, A, °C, %, Ah, is ``raw * factor + offset`` (DBC scale and offset,
    unit conversion, the profile's ``scale`` and ``current_sign`` all folded in).
    """

    target: Target
    message: str
    signal: str
    selector: str | None = None
    selector_value: int = 0
    #: cell or sensor index for per-cell targets; bit position for FAULT_BIT
    index: int = 0
    factor: float = 1.0
    offset: float = 0.0
    #: invalid bitmask targets: (bit j of the mask, cell index it flags)
    bits: tuple[tuple[int, int], ...] = ()
    #: text targets: the DBC value table, raw value → name
    choices: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CellArray:
    """The shape of one per-cell vector (voltages or temperatures)."""

    layout: str
    #: the number of cells, when fixed by the profile or the DBC; None when it comes from the bus
    count: int | None
    #: the most cells the layout can address (buffer size); ``count`` never exceeds it
    capacity: int


@dataclass(frozen=True, slots=True)
class Profile:
    """A validated profile, resolved against its DBC. Built by :func:`load_profile`."""

    path: str
    name: str
    description: str
    dbc_path: str
    #: the cantools database the bindings refer to (by message and signal name)
    database: Any = field(repr=False)
    #: bits of the frame id that carry the node (pack) number; frames are decoded with them cleared
    node_id_mask: int
    bindings: tuple[Binding, ...] = field(repr=False)
    cell_voltages: CellArray | None
    cell_temperatures: CellArray | None
    #: True when the pack serial comes from the bus; otherwise the configured serial is used
    serial_from_bus: bool
    #: message whose arrival emits a sample, for profiles without per-cell voltages
    trigger: str | None
    #: the shortest time between two triggered samples of one pack (0: every trigger frame)
    min_interval_s: float
    #: ``flush`` emits a partial cell cycle when no cell frame came for this long
    cycle_timeout_s: float
    #: a value not refreshed for this long is reported absent (nan / invalid)
    stale_after_s: float


# ---------------------------------------------------------------------------------------------
# DBC loading


_SECTION_LINE = {"BS_": re.compile(r"^[ \t]*BS_[ \t]*:", re.MULTILINE),
                 "BU_": re.compile(r"^[ \t]*BU_[ \t]*:", re.MULTILINE)}
_FIRST_DEFINITION = re.compile(r"^[ \t]*(?:VAL_TABLE_|BO_)[ \t]", re.MULTILINE)


def load_dbc(path: str | Path) -> Any:
    """Parse a DBC file with cantools. Raises :class:`ConfigError` naming the file and line.

    The text is read as UTF-8 when it is valid UTF-8 (opendbc files are) and as Windows-1252
    otherwise (the Vector tools' encoding). Some real DBC files lack the ``BS_:`` and ``BU_:``
    sections that the DBC grammar requires (opendbc-derived ones such as the Kona's); when parsing
    fails and either is missing, the empty sections are inserted before the first message and the
    parse retried, with a warning. If that fails too, the original error is reported, so the line
    number is the file's own.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError("DBC file not found", path=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read DBC: {exc}", path=str(path)) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    try:
        database = _parse_dbc(text)
    except Exception as exc:  # cantools raises many types on bad input; all mean "bad DBC"
        missing = [name for name, pattern in _SECTION_LINE.items() if not pattern.search(text)]
        first = _FIRST_DEFINITION.search(text)
        if not missing or first is None:
            raise _dbc_error(path, exc) from exc
        inserted = "".join(f"{name}:\n\n" for name in missing)
        patched = text[:first.start()] + inserted + text[first.start():]
        try:
            database = _parse_dbc(patched)
        except Exception as retry_exc:  # a further error: report it at the file's own line
            raise _dbc_error(path, retry_exc, inserted_at=text.count("\n", 0, first.start()) + 1,
                             inserted_lines=inserted.count("\n")) from retry_exc
        log.warning("dbc_sections_inserted", path=str(path), sections=missing,
                    detail="the DBC lacks sections the grammar requires; parsed with them "
                           "inserted empty")
    _check_complete(text, database, path)
    return database


def _parse_dbc(text: str) -> Any:
    return cantools.database.load_string(text, database_format="dbc")


def _dbc_error(path: Path, exc: Exception, *, inserted_at: int = 0,
               inserted_lines: int = 0) -> ConfigError:
    cause: BaseException = getattr(exc, "e_dbc", None) or exc
    if isinstance(cause, textparser.ParseError):
        line = cause.line
        if inserted_lines and line >= inserted_at + inserted_lines:
            line -= inserted_lines
        return ConfigError(f"DBC syntax error at column {cause.column}: {cause.text!r}",
                           path=str(path), line=line)
    return ConfigError(f"not a valid DBC: {cause}", path=str(path))


_MESSAGE_LINE = re.compile(r"^[ \t]*BO_[ \t]+\d+[ \t]+(\w+)")
_SIGNAL_LINE = re.compile(r"^[ \t]*SG_[ \t]+(\w+)")
#: Vector tools keep signals that belong to no message in this pseudo-message
_VECTOR_ORPHANS = "VECTOR__INDEPENDENT_SIG_MSG"


def _check_complete(text: str, database: Any, path: Path) -> None:
    """Every message and signal the text defines must have been read.

    cantools' parser stops quietly at an incomplete definition at the end of the file, so a
    truncated DBC would otherwise load with its last messages or signals missing.
    """
    messages = {m.name: {s.name for s in m.signals} for m in database.messages}
    current: set[str] | None = set()
    in_string = False
    for number, line in enumerate(text.splitlines(), 1):
        if not in_string:
            if match := _MESSAGE_LINE.match(line):
                if match.group(1) == _VECTOR_ORPHANS:
                    current = None  # a container of unused signals, which cantools drops
                elif match.group(1) not in messages:
                    raise ConfigError(f"message {match.group(1)!r} is defined here but could "
                                      f"not be read (is the file truncated?)", path=str(path),
                                      line=number)
                else:
                    current = messages[match.group(1)]
            elif (match := _SIGNAL_LINE.match(line)) and current is not None \
                    and match.group(1) not in current:
                raise ConfigError(f"signal {match.group(1)!r} is defined here but could not be "
                                  f"read (is the file truncated?)", path=str(path), line=number)
        # comments may span lines; a definition keyword inside one is text, not a definition
        in_string ^= (line.count('"') - line.count('\\"')) % 2 == 1


# ---------------------------------------------------------------------------------------------
# Index expressions: a tiny arithmetic grammar, parsed once, never eval'd


_EXPRESSION_NAMES = frozenset({"mux", "block", "i", "j"})
_OPERATORS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}

IndexExpression = Callable[[int, int], int]


def compile_index_expression(text: str) -> IndexExpression:
    """Compile ``block * 3 + j`` into ``f(selector_value, j) -> cell index``.

    The grammar is integers, ``+ - * //``, unary minus, parentheses and the names ``mux``,
    ``block``, ``i`` (all three: the index signal's raw value) and ``j`` (the value signal's
    position in the profile's list). Anything else raises ``ValueError`` naming it. The text is
    parsed with :mod:`ast` and turned into nested closures; nothing is ever evaluated as code.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an expression: {exc.msg}") from exc
    return _compile_node(tree.body)


def _compile_node(node: ast.expr) -> IndexExpression:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        constant = node.value
        return lambda v, j: constant
    if isinstance(node, ast.Name):
        if node.id not in _EXPRESSION_NAMES:
            raise ValueError(f"unknown name {node.id!r} (allowed: mux, block, i, j)")
        if node.id == "j":
            return lambda v, j: j
        return lambda v, j: v
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        operand = _compile_node(node.operand)
        return lambda v, j: -operand(v, j)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        op = _OPERATORS[type(node.op)]
        left, right = _compile_node(node.left), _compile_node(node.right)
        return lambda v, j: op(left(v, j), right(v, j))
    raise ValueError(f"{ast.unparse(node)!r} is not allowed (only integers, names, + - * //)")


def check_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` is a format string whose only field is ``i``."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from exc
    if fields != ["i"]:
        raise ValueError(f"a template needs exactly one field, {{i}} (with an optional format "
                         f"such as {{i:03d}}); got fields {fields}")
    try:
        template.format(i=0)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a valid template: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Units: DBC unit strings → factor and offset into the base unit

_Affine = tuple[float, float]

_VOLT: Mapping[str, _Affine] = {"": (1, 0), "V": (1, 0), "mV": (1e-3, 0), "kV": (1e3, 0),
                                "uV": (1e-6, 0), "µV": (1e-6, 0)}
_AMPERE: Mapping[str, _Affine] = {"": (1, 0), "A": (1, 0), "mA": (1e-3, 0), "kA": (1e3, 0)}
_CELSIUS: Mapping[str, _Affine] = {
    "": (1, 0), "degC": (1, 0), "°C": (1, 0), "C": (1, 0), "deg C": (1, 0), "Cel": (1, 0),
    "℃": (1, 0), "K": (1, -273.15), "degF": (5 / 9, -160 / 9), "°F": (5 / 9, -160 / 9),
}
_PERCENT: Mapping[str, _Affine] = {"": (1, 0), "%": (1, 0)}
_AMPERE_HOUR: Mapping[str, _Affine] = {"": (1, 0), "Ah": (1, 0), "mAh": (1e-3, 0),
                                       "kAh": (1e3, 0), "As": (1 / 3600, 0)}

_QUANTITY: Mapping[Target, tuple[str, Mapping[str, _Affine]]] = {
    Target.CURRENT: ("current", _AMPERE),
    Target.PACK_VOLTAGE: ("voltage", _VOLT),
    Target.SOC: ("percentage", _PERCENT),
    Target.MIN_CELL_VOLTAGE: ("voltage", _VOLT),
    Target.MAX_CELL_VOLTAGE: ("voltage", _VOLT),
    Target.MIN_CELL_TEMP: ("temperature", _CELSIUS),
    Target.MAX_CELL_TEMP: ("temperature", _CELSIUS),
    Target.RATED_CAPACITY: ("charge", _AMPERE_HOUR),
    Target.CELL_VOLTAGE: ("voltage", _VOLT),
    Target.CELL_TEMP: ("temperature", _CELSIUS),
}


def unit_conversion(target: Target, unit: str) -> _Affine:
    """Factor and offset from ``unit`` to the target's base unit (V, A, °C, %, Ah).

    An empty unit is taken as the base unit. Raises ``ValueError`` for a unit of another quantity
    or one this table does not know.
    """
    quantity, table = _QUANTITY[target]
    try:
        return table[unit.strip()]
    except KeyError:
        known = ", ".join(repr(u) for u in table if u)
        raise ValueError(f"unit {unit!r} is not a {quantity} unit known here ({known}); "
                         f"set 'unit' in the profile to say what the signal carries") from None


# ---------------------------------------------------------------------------------------------
# TOML validation helpers


class _Table:
    """A TOML table under validation: knows its dotted prefix and rejects unknown keys."""

    def __init__(self, raw: Any, key: str, file: str, allowed: Iterable[str]) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"must be a table, got {type(raw).__name__}", path=file,
                              key=key or None)
        allowed = sorted(allowed)
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown key (valid keys here: {', '.join(allowed)})",
                              path=file, key=self._join(key, unknown[0]))
        self.raw = raw
        self.key = key
        self.file = file

    @staticmethod
    def _join(prefix: str, name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    def dotted(self, name: str) -> str:
        return self._join(self.key, name)

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.file, key=self.dotted(name))

    def has(self, name: str) -> bool:
        return name in self.raw

    def string(self, name: str, default: str | None = None) -> str:
        value = self.raw.get(name, default)
        if value is None:
            raise self.error(name, "is required")
        if not isinstance(value, str) or not value.strip():
            raise self.error(name, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def optional_string(self, name: str) -> str | None:
        return self.string(name) if name in self.raw else None

    def integer(self, name: str, default: int | None = None, *, lo: int = 0,
                hi: int | None = None) -> int:
        value = self.raw.get(name, default)
        if value is None:
            raise self.error(name, "is required")
        if type(value) is not int:
            raise self.error(name, f"must be an integer, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            raise self.error(name, f"must be in {lo}..{hi if hi is not None else '∞'}, "
                                   f"got {value}")
        return value

    def number(self, name: str, default: float, *, lo: float, hi: float) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"must be a number, got {value!r}")
        if not lo <= value <= hi:
            raise self.error(name, f"must be in {lo}..{hi}, got {value}")
        return float(value)

    def scale(self) -> float:
        """The optional ``scale`` key: a nonzero factor applied after unit conversion."""
        value = self.number("scale", 1.0, lo=-1e9, hi=1e9)
        if value == 0:
            raise self.error("scale", "must not be 0")
        return value

    def string_list(self, name: str) -> list[str]:
        value = self.raw.get(name)
        if not isinstance(value, list) or not value:
            raise self.error(name, f"must be a non-empty list of signal names, got {value!r}")
        for n, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(f"must be a signal name, got {item!r}", path=self.file,
                                  key=f"{self.dotted(name)}[{n}]")
        return [item.strip() for item in value]


# ---------------------------------------------------------------------------------------------
# The loader


_TOP_KEYS = ("name", "description", "dbc", "node_id_mask", "pack", "cell_voltages",
             "cell_temperatures", "serial", "sample")
_SCALAR_KEYS: Mapping[str, Target] = {
    "current": Target.CURRENT, "voltage": Target.PACK_VOLTAGE, "soc": Target.SOC,
    "min_cell_voltage": Target.MIN_CELL_VOLTAGE, "max_cell_voltage": Target.MAX_CELL_VOLTAGE,
    "min_cell_temp": Target.MIN_CELL_TEMP, "max_cell_temp": Target.MAX_CELL_TEMP,
    "rated_capacity": Target.RATED_CAPACITY,
}
_TEXT_KEYS: Mapping[str, Target] = {"state": Target.STATE, "chemistry": Target.CHEMISTRY}
_LAYOUTS = ("template", "multiplexed", "indexed")
_CELL_KEYS: Mapping[str, tuple[str, ...]] = {
    "template": ("layout", "template", "signals", "message", "invalid", "count", "count_signal",
                 "unit", "scale"),
    "multiplexed": ("layout", "message", "index_signal", "signals", "index", "invalid",
                    "invalid_mask", "count", "count_signal", "unit", "scale"),
    "indexed": ("layout", "message", "index_signal", "value", "index", "invalid", "count",
                "count_signal", "unit", "scale"),
}


@dataclass(frozen=True, slots=True)
class _CellTargets:
    value: Target
    invalid: Target
    invalid_mask: Target
    count: Target


_VOLTAGE_TARGETS = _CellTargets(Target.CELL_VOLTAGE, Target.CELL_VOLTAGE_INVALID,
                                Target.CELL_VOLTAGE_INVALID_MASK, Target.CELL_VOLTAGE_COUNT)
_TEMP_TARGETS = _CellTargets(Target.CELL_TEMP, Target.CELL_TEMP_INVALID,
                             Target.CELL_TEMP_INVALID_MASK, Target.CELL_TEMP_COUNT)


def load_profile(path: str | Path, *, dbc_override: str | Path | None = None) -> Profile:
    """Read, parse and validate a profile and its DBC. Raises :class:`ConfigError`.

    ``dbc_override`` replaces the profile's ``dbc`` key: a DBC that may not be copied into the
    repository (foxBMS 2's) is named by the gateway configuration instead. The profile's own
    ``dbc`` path is relative to the profile file.
    """
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("profile file not found (named by profile.path in the gateway "
                          "configuration)", path=file) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason}", path=file,
                          line=_bad_byte_line(exc)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read profile: {exc}", path=file) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=file,
                          line=_toml_error_line(exc, text)) from exc
    return _Loader(raw, path, dbc_override).load()


class _Loader:
    def __init__(self, raw: Mapping[str, Any], path: Path, dbc_override: str | Path | None):
        self.top = _Table(raw, "", str(path), _TOP_KEYS)
        self.path = path
        self.file = str(path)
        self.dbc_override = dbc_override
        self.bindings: list[Binding] = []
        # the selector each message's bindings agree on, and the key that set it (for errors)
        self.selectors: dict[str, tuple[str | None, str]] = {}

    # -- entry ------------------------------------------------------------------------------

    def load(self) -> Profile:
        top = self.top
        name = top.string("name", self.path.stem)
        description = top.raw.get("description", "")
        if not isinstance(description, str):
            raise top.error("description", f"must be a string, got {description!r}")
        node_id_mask = top.integer("node_id_mask", 0, hi=0x1FFFFFFF)
        if node_id_mask.bit_count() > MAX_NODE_BITS:
            # every node value is a pack with its own buffers: garbage must not make millions
            raise top.error("node_id_mask", f"at most {MAX_NODE_BITS} bits "
                                            f"({1 << MAX_NODE_BITS} packs), got "
                                            f"0x{node_id_mask:X}")
        if self.dbc_override is not None:
            dbc_path = Path(self.dbc_override)
        elif top.has("dbc"):
            dbc_path = self.path.resolve().parent / top.string("dbc")
        else:
            raise top.error("dbc", "is required (or give the DBC in the gateway configuration, "
                                   "which overrides it)")
        try:
            self.db = load_dbc(dbc_path)
        except ConfigError as exc:
            if dbc_path.is_file():
                raise  # the DBC itself is bad: the error names it, and the line
            # not there: say which key named it
            named_by = ("profile.dbc in the gateway configuration"
                        if self.dbc_override is not None else f"key 'dbc' of {self.file}")
            problem = str(exc).removeprefix(f"{exc.path}: ")
            raise ConfigError(f"{problem} (named by {named_by})", path=exc.path) from exc
        self.messages_of_signal: dict[str, list[Any]] = {}
        for message in self.db.messages:
            for signal in message.signals:
                self.messages_of_signal.setdefault(signal.name, []).append(message)

        self._pack(_Table(top.raw.get("pack", {}), "pack", self.file,
                          (*_SCALAR_KEYS, *_TEXT_KEYS, "fault_flags", "current_sign")))
        voltages = temps = None
        if top.has("cell_voltages"):
            voltages = self._cells(top.raw["cell_voltages"], "cell_voltages", _VOLTAGE_TARGETS)
        if top.has("cell_temperatures"):
            temps = self._cells(top.raw["cell_temperatures"], "cell_temperatures", _TEMP_TARGETS)
        serial_from_bus = False
        if top.has("serial"):
            self._serial(_Table(top.raw["serial"], "serial", self.file,
                                ("message", "text", "chunk_index", "chunk_count")))
            serial_from_bus = True
        sample = _Table(top.raw.get("sample", {}), "sample", self.file,
                        ("trigger", "min_interval_s", "cycle_timeout_s", "stale_after_s"))
        trigger = self._trigger(sample, voltages)
        self._check_node_mask(node_id_mask)
        return Profile(
            path=self.file, name=name, description=description, dbc_path=str(dbc_path),
            database=self.db, node_id_mask=node_id_mask, bindings=tuple(self.bindings),
            cell_voltages=voltages, cell_temperatures=temps, serial_from_bus=serial_from_bus,
            trigger=trigger,
            min_interval_s=sample.number("min_interval_s", 0.0, lo=0.0, hi=3600.0),
            cycle_timeout_s=sample.number("cycle_timeout_s", 5.0, lo=0.001, hi=3600.0),
            stale_after_s=sample.number("stale_after_s", 10.0, lo=0.001, hi=86400.0),
        )

    # -- signal lookup ------------------------------------------------------------------------

    def message(self, table: _Table, name: str) -> Any:
        message_name = table.string(name)
        try:
            return self.db.get_message_by_name(message_name)
        except KeyError:
            raise table.error(name, f"no message {message_name!r} in the DBC") from None

    def signal(self, key: str, ref: str, message: Any | None = None) -> tuple[Any, Any]:
        """Resolve ``Signal`` or ``Message.Signal`` (in ``message`` when given)."""
        if "." in ref:
            message_name, signal_name = ref.split(".", 1)
            try:
                named = self.db.get_message_by_name(message_name)
            except KeyError:
                raise ConfigError(f"no message {message_name!r} in the DBC", path=self.file,
                                  key=key) from None
            if message is not None and named is not message:
                raise ConfigError(f"must be a signal of message {message.name!r}",
                                  path=self.file, key=key)
            message = named
        else:
            signal_name = ref
        if message is not None:
            try:
                return message, message.get_signal_by_name(signal_name)
            except KeyError:
                raise ConfigError(f"no signal {signal_name!r} in message {message.name!r}",
                                  path=self.file, key=key) from None
        candidates = self.messages_of_signal.get(signal_name, [])
        if not candidates:
            raise ConfigError(f"no signal {signal_name!r} in the DBC", path=self.file, key=key)
        if len(candidates) > 1:
            names = ", ".join(m.name for m in candidates)
            raise ConfigError(f"signal {signal_name!r} is in several messages ({names}); write "
                              f"'Message.{signal_name}'", path=self.file, key=key)
        message = candidates[0]
        return message, message.get_signal_by_name(signal_name)

    def bind(self, key: str, target: Target, message: Any, signal: Any, *,
             selector: str | None = None, selector_values: Sequence[int] | None = None,
             **fields: Any) -> None:
        """Add bindings for one signal: one per multiplexer value it is present under."""
        if signal.is_float:
            raise ConfigError(f"signal {signal.name!r} is an IEEE float; only integer signals "
                              f"are supported", path=self.file, key=key)
        mux = signal.multiplexer_signal
        if mux is not None:
            if message.get_signal_by_name(mux).multiplexer_signal is not None:
                raise ConfigError(f"signal {signal.name!r} is under nested multiplexing, which "
                                  f"is not supported", path=self.file, key=key)
            if selector is not None and selector != mux:
                raise ConfigError(f"signal {signal.name!r} is multiplexed by {mux!r}, not by "
                                  f"{selector!r}", path=self.file, key=key)
            present = sorted(signal.multiplexer_ids or ())
            values = present if selector_values is None else \
                [v for v in selector_values if v in present]
            selector = mux
        elif selector is not None:
            values = list(selector_values or ())
        else:
            values = [0]
        self._agree_selector(key, message.name, selector)
        for value in values:
            self.bindings.append(Binding(target=target, message=message.name,
                                         signal=signal.name, selector=selector,
                                         selector_value=value, **fields))

    def _agree_selector(self, key: str, message: str, selector: str | None) -> None:
        if selector is None:
            return
        known = self.selectors.setdefault(message, (selector, key))
        if known[0] != selector:
            raise ConfigError(f"message {message!r} is already selected by {known[0]!r} "
                              f"(at {known[1]}); one message has one selector",
                              path=self.file, key=key)

    def scaling(self, key: str, target: Target, signal: Any, unit: str | None,
                scale: float) -> tuple[float, float]:
        """Factor and offset from the raw value to the base unit: DBC, unit and profile scale."""
        try:
            unit_factor, unit_offset = unit_conversion(
                target, (signal.unit or "") if unit is None else unit)
        except ValueError as exc:
            raise ConfigError(f"signal {signal.name!r}: {exc}", path=self.file, key=key) from None
        factor = signal.scale * unit_factor * scale
        offset = (signal.offset * unit_factor + unit_offset) * scale
        return float(factor), float(offset)

    # -- sections -----------------------------------------------------------------------------

    def _pack(self, pack: _Table) -> None:
        sign = pack.integer("current_sign", 1, lo=-1, hi=1)
        if sign == 0:
            raise pack.error("current_sign", "must be 1 or -1, got 0")
        for name, target in _SCALAR_KEYS.items():
            if not pack.has(name):
                continue
            value = self._value_table(pack, name)
            message, signal = self.signal(value.key, value.string("signal"))
            scale = value.scale()
            if target is Target.CURRENT:
                scale *= sign
            factor, offset = self.scaling(value.key, target, signal,
                                          value.optional_string("unit"), scale)
            self.bind(value.key, target, message, signal, factor=factor, offset=offset)
        for name, target in _TEXT_KEYS.items():
            if pack.has(name):
                key = pack.dotted(name)
                message, signal = self.signal(key, pack.string(name))
                choices = tuple((int(v), str(n)) for v, n in (signal.choices or {}).items())
                self.bind(key, target, message, signal, choices=choices)
        if pack.has("fault_flags"):
            self._fault_flags(pack)

    def _value_table(self, pack: _Table, name: str) -> _Table:
        """A pack value is ``"Signal"`` or ``{signal = "Signal", unit = "mV", scale = 1.0}``."""
        raw = pack.raw[name]
        if isinstance(raw, str):
            raw = {"signal": raw}
        return _Table(raw, pack.dotted(name), self.file, ("signal", "unit", "scale"))

    def _fault_flags(self, pack: _Table) -> None:
        raw = pack.raw["fault_flags"]
        key = pack.dotted("fault_flags")
        if isinstance(raw, str):
            message, signal = self.signal(key, raw)
            self.bind(key, Target.FAULT_FLAGS, message, signal)
            return
        names = pack.string_list("fault_flags")
        if len(names) > 63:
            raise pack.error("fault_flags", f"at most 63 flags fit the fault word, got "
                                            f"{len(names)}")
        for bit, ref in enumerate(names):
            item_key = f"{key}[{bit}]"
            message, signal = self.signal(item_key, ref)
            self.bind(item_key, Target.FAULT_BIT, message, signal, index=bit)

    def _serial(self, table: _Table) -> None:
        message = self.message(table, "message")
        _, text = self.signal(table.dotted("text"), table.string("text"), message)
        if text.length % 8 or text.is_signed:
            raise table.error("text", f"signal {text.name!r} must be unsigned and a whole number "
                                      f"of bytes long to carry characters")
        self.bind(table.dotted("text"), Target.SERIAL_TEXT, message, text)
        if table.has("chunk_index") != table.has("chunk_count"):
            missing = "chunk_count" if table.has("chunk_index") else "chunk_index"
            raise table.error(missing, "is required with a chunked serial (give chunk_index and "
                                       "chunk_count, or neither)")
        if table.has("chunk_index"):
            for name, target in (("chunk_index", Target.SERIAL_CHUNK_INDEX),
                                 ("chunk_count", Target.SERIAL_CHUNK_COUNT)):
                _, signal = self.signal(table.dotted(name), table.string(name), message)
                self.bind(table.dotted(name), target, message, signal)

    def _trigger(self, sample: _Table, voltages: CellArray | None) -> str | None:
        if sample.has("trigger"):
            if voltages is not None:
                raise sample.error("trigger", "is only for profiles without cell_voltages; with "
                                              "them a sample is emitted per cycle of cells")
            return str(self.message(sample, "trigger").name)
        if voltages is not None:
            return None
        current = [b for b in self.bindings if b.target is Target.CURRENT]
        if not current:
            raise sample.error("trigger", "is required: the profile has no cell voltages to "
                                          "complete a cycle and no pack.current whose message "
                                          "could trigger a sample")
        return current[0].message

    def _check_node_mask(self, mask: int) -> None:
        if not mask:
            return
        for name in sorted({b.message for b in self.bindings}):
            frame_id = self.db.get_message_by_name(name).frame_id
            if frame_id & mask:
                raise self.top.error("node_id_mask", f"message {name!r} (id 0x{frame_id:X}) has "
                                                     f"bits inside the node mask 0x{mask:X}")

    # -- cells --------------------------------------------------------------------------------

    def _cells(self, raw: Any, key: str, targets: _CellTargets) -> CellArray:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"must be a table, got {type(raw).__name__}", path=self.file,
                              key=key)
        layout = raw.get("layout")
        if layout not in _LAYOUTS:
            raise ConfigError(f"must be one of {', '.join(map(repr, _LAYOUTS))}, got {layout!r}",
                              path=self.file, key=f"{key}.layout")
        table = _Table(raw, key, self.file, _CELL_KEYS[layout])
        unit = table.optional_string("unit")
        scale = table.scale()
        count = table.integer("count", lo=1, hi=MAX_CELLS) if table.has("count") else None
        if layout == "template":
            capacity = self._template_cells(table, targets, unit, scale, count)
            count = capacity if count is None and not table.has("count_signal") else count
        else:
            if count is None and not table.has("count_signal"):
                raise table.error("count", f"is required with the {layout} layout (or give "
                                           f"count_signal, the bus signal that carries it)")
            capacity = count if count is not None else self._count_capacity(table)
            self._indexed_cells(table, layout, targets, unit, scale, capacity)
        if table.has("count_signal"):
            if count is not None:
                raise table.error("count_signal", "give count or count_signal, not both")
            ref_key = table.dotted("count_signal")
            message, signal = self.signal(ref_key, table.string("count_signal"))
            self.bind(ref_key, targets.count, message, signal, factor=float(signal.scale),
                      offset=float(signal.offset))
        return CellArray(layout=layout, count=count, capacity=capacity)

    def _count_capacity(self, table: _Table) -> int:
        """Without a fixed count, buffers are sized by the count signal's DBC maximum."""
        _, signal = self.signal(table.dotted("count_signal"), table.string("count_signal"))
        maximum = signal.maximum
        if maximum is None or not 1 <= maximum <= MAX_CELLS:
            raise table.error("count_signal", f"signal {signal.name!r} needs a DBC maximum in "
                                              f"1..{MAX_CELLS} to size the cell buffers, has "
                                              f"{maximum}; give count instead")
        return int(maximum)

    def _template_cells(self, table: _Table, targets: _CellTargets, unit: str | None,
                        scale: float, count: int | None) -> int:
        message = self.message(table, "message") if table.has("message") else None
        if table.has("template") == table.has("signals"):
            raise table.error("template", "give either template or signals")
        if table.has("template"):
            names = self._expand_template(table, "template", count)
            list_key = table.dotted("template")
            keys = [f"{list_key} (i={i})" for i in range(len(names))]
        else:
            names = table.string_list("signals")
            if count is not None and count != len(names):
                raise table.error("count", f"is {count} but signals lists {len(names)}")
            keys = [f"{table.dotted('signals')}[{i}]" for i in range(len(names))]
        if len(names) > MAX_CELLS:
            raise table.error("count", f"at most {MAX_CELLS} cells, got {len(names)}")
        flags: list[str] | None = None
        if table.has("invalid"):
            raw_invalid = table.raw["invalid"]
            if isinstance(raw_invalid, str):
                try:
                    check_template(raw_invalid)
                except ValueError as exc:
                    raise table.error("invalid", str(exc)) from None
                flags = [raw_invalid.format(i=i) for i in range(len(names))]
            else:
                flags = table.string_list("invalid")
                if len(flags) != len(names):
                    raise table.error("invalid", f"lists {len(flags)} flags for {len(names)} "
                                                 f"cells")
        for i, (name, key) in enumerate(zip(names, keys, strict=True)):
            msg, signal = self.signal(key, name, message)
            factor, offset = self.scaling(key, targets.value, signal, unit, scale)
            self.bind(key, targets.value, msg, signal, index=i, factor=factor, offset=offset)
            if flags is not None:
                flag_key = f"{table.dotted('invalid')} (i={i})"
                flag_msg, flag = self.signal(flag_key, flags[i], message)
                self.bind(flag_key, targets.invalid, flag_msg, flag, index=i)
        return len(names)

    def _expand_template(self, table: _Table, name: str, count: int | None) -> list[str]:
        template = table.string(name)
        try:
            check_template(template)
        except ValueError as exc:
            raise table.error(name, str(exc)) from None
        if count is not None:
            return [template.format(i=i) for i in range(count)]
        names: list[str] = []
        scope = table.raw.get("message")
        while len(names) <= MAX_CELLS:
            candidate = template.format(i=len(names))
            holders = self.messages_of_signal.get(candidate, [])
            if not any(scope is None or m.name == scope for m in holders):
                break
            names.append(candidate)
        if not names:
            raise table.error(name, f"matches no signal of the DBC (tried "
                                    f"{template.format(i=0)!r})")
        return names

    def _indexed_cells(self, table: _Table, layout: str, targets: _CellTargets,
                       unit: str | None, scale: float, capacity: int) -> None:
        message = self.message(table, "message")
        index_key = table.dotted("index_signal")
        _, selector = self.signal(index_key, table.string("index_signal"), message)
        if selector.multiplexer_signal is not None:
            raise table.error("index_signal", f"signal {selector.name!r} is itself multiplexed")
        expression_text = table.string("index", "i" if layout == "indexed" else None)
        try:
            expression = compile_index_expression(expression_text)
        except ValueError as exc:
            raise table.error("index", str(exc)) from None
        if layout == "indexed":
            value_names = [table.string("value")]
            value_keys = [table.dotted("value")]
        else:
            value_names = table.string_list("signals")
            value_keys = [f"{table.dotted('signals')}[{j}]" for j in range(len(value_names))]
        values = [self.signal(k, n, message)[1]
                  for k, n in zip(value_keys, value_names, strict=True)]
        flags: list[Any] | None = None
        if table.has("invalid"):
            if layout == "indexed":
                flags = [self.signal(table.dotted("invalid"), table.string("invalid"),
                                     message)[1]]
            else:
                flag_names = table.string_list("invalid")
                if len(flag_names) != len(values):
                    raise table.error("invalid", f"lists {len(flag_names)} flags for "
                                                 f"{len(values)} signals")
                flags = [self.signal(f"{table.dotted('invalid')}[{j}]", n, message)[1]
                         for j, n in enumerate(flag_names)]
        mask = None
        if table.has("invalid_mask"):
            if flags is not None:
                raise table.error("invalid_mask", "give invalid or invalid_mask, not both")
            mask = self.signal(table.dotted("invalid_mask"), table.string("invalid_mask"),
                               message)[1]
            if mask.length < len(values):
                raise table.error("invalid_mask", f"signal {mask.name!r} has {mask.length} "
                                                  f"bits for {len(values)} signals")
        selector_values = self._selector_values(table, message, selector)
        owner: dict[int, tuple[int, int]] = {}
        scalings = [self.scaling(k, targets.value, s, unit, scale)
                    for k, s in zip(value_keys, values, strict=True)]
        for v in selector_values:
            bits: list[tuple[int, int]] = []
            for j, signal in enumerate(values):
                if signal.multiplexer_signal is not None and v not in signal.multiplexer_ids:
                    continue
                try:
                    cell = expression(v, j)
                except ZeroDivisionError:
                    raise table.error("index", f"divides by zero at {selector.name}={v}, "
                                               f"j={j}") from None
                if not 0 <= cell < capacity:
                    continue
                if cell in owner:
                    first = owner[cell]
                    raise table.error("index", f"maps both ({selector.name}={first[0]}, "
                                               f"j={first[1]}) and ({selector.name}={v}, j={j}) "
                                               f"to cell {cell}")
                owner[cell] = (v, j)
                factor, offset = scalings[j]
                self.bind(value_keys[j], targets.value, message, signal,
                          selector=selector.name, selector_values=[v], index=cell,
                          factor=factor, offset=offset)
                if flags is not None:
                    self.bind(table.dotted("invalid"), targets.invalid, message, flags[j],
                              selector=selector.name, selector_values=[v], index=cell)
                bits.append((j, cell))
            if mask is not None and bits:
                self.bind(table.dotted("invalid_mask"), targets.invalid_mask, message, mask,
                          selector=selector.name, selector_values=[v], bits=tuple(bits))
        if not owner:
            raise table.error("index", f"addresses no cell in 0..{capacity - 1} for any value "
                                       f"of {selector.name}")

    def _selector_values(self, table: _Table, message: Any, selector: Any) -> list[int]:
        """Every raw value the index signal can take, to expand the layout over."""
        if selector.is_multiplexer:
            ids: set[int] = set(selector.choices or {})
            for signal in message.signals:
                if signal.multiplexer_signal == selector.name:
                    ids.update(signal.multiplexer_ids or ())
            return sorted(ids)
        if selector.scale == 1 and selector.offset == 0 and selector.minimum is not None \
                and selector.maximum is not None and selector.maximum > selector.minimum:
            return list(range(max(int(selector.minimum), 0), int(selector.maximum) + 1))
        if selector.length > MAX_INDEX_BITS:
            raise table.error("index_signal", f"signal {selector.name!r} is {selector.length} "
                                              f"bits wide and has no DBC range; at most "
                                              f"{MAX_INDEX_BITS} bits are expanded")
        return list(range(1 << selector.length))
