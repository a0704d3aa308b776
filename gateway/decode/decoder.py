"""Frame → raw signal values, through plans compiled from a profile when it loads.

Per frame the decoder does a dict lookup on the (node-masked) frame id, a length check and one or
two precompiled unpacks, and returns the raw values with the :class:`Route` that says where each
goes. It never scales, never builds a dict of names for the caller, and never raises: every frame
ends as decoded, ignored or rejected, and is counted as such.

A plan is one of three kinds:

- *single*: a message without a selector: one unpack of the signals the profile uses;
- *indexed*: an index signal (a plain "block" signal, as in the reference protocol) selects among
  the same few signals: one unpack of all of them, index first, then a route lookup by index;
- *multiplexed*: a DBC multiplexer selects different signals per value (foxBMS 2): unpack the
  multiplexer, look up its route, then unpack exactly that route's signals.

The unpackers are cantools' own codecs (``create_encode_decode_formats``, the bitstruct formats
``Message.decode`` uses), built for the used signals only and read out positionally.

Counters: ``frames_decoded_total``, ``frames_ignored_total{not_used}`` (the DBC knows the frame,
the profile does not use it), ``frames_rejected_total{reason}`` with reasons ``unknown_id`` (not
in the DBC), ``malformed`` (too short, a multiplexer or index value outside what the DBC defines,
an unpack failure), ``error_frame`` and ``remote_frame``. The two frequent ones are counted
locally and added to the shared metrics every ``METRICS_BATCH`` frames and on
:meth:`Decoder.sync_metrics`, because a shared counter costs a lock per frame.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

import structlog
from cantools.database.utils import create_encode_decode_formats, sort_signals_by_start_bit

from gateway.decode.profile import SCALAR_TARGETS, TEXT_TARGETS, Binding, Profile, Target
from gateway.metrics import Metrics
from gateway.model import Frame

log = structlog.get_logger(__name__)

#: Set in a plan key for extended (29-bit) frame ids, as in the DBC format.
EXTENDED_FLAG = 1 << 31
#: Frequent outcomes reach the shared metrics at least this often (in frames).
METRICS_BATCH = 1024

Unpack = Callable[[bytes], tuple[int, ...]]

# Route.parts: which kinds of values a route carries, so the assembler touches only those.
PART_SCALARS = 1
PART_TEXTS = 2
PART_FAULTS = 4
PART_VOLTAGES = 8
PART_TEMPS = 16
PART_COUNTS = 32
PART_SERIAL = 64

_SINGLE, _INDEXED, _MULTIPLEXED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class SerialParts:
    """Positions of the serial signals in a route's values (-1: not sent, one chunk)."""

    index: int
    count: int
    text: int
    chars: int
    #: how characters sit in the text signal's raw integer: first character lowest-addressed
    byteorder: Literal["little", "big"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where each value of one (message, selector value) goes. Positions index the values.

    Numbers are raw; the assembler applies ``raw * factor + offset``.
    """

    message: str
    selector_value: int | None
    unpack: Unpack
    parts: int
    #: (position, scalar slot = Target value, factor, offset)
    scalars: tuple[tuple[int, int, float, float], ...] = ()
    #: (position, text slot 0 state / 1 chemistry, raw → name)
    texts: tuple[tuple[int, int, Mapping[int, str]], ...] = ()
    #: position of the whole fault word, or -1
    fault_word: int = -1
    #: (position, bit) of single fault flags
    fault_bits: tuple[tuple[int, int], ...] = ()
    #: the cell-voltage group this frame carries (cycle tracking), or -1
    voltage_group: int = -1
    #: (position, cell, factor, offset)
    voltages: tuple[tuple[int, int, float, float], ...] = ()
    #: (position, cell): a nonzero value flags the cell invalid
    voltage_flags: tuple[tuple[int, int], ...] = ()
    #: (position, ((bit, cell), ...)): a set bit flags the cell invalid
    voltage_masks: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()
    temps: tuple[tuple[int, int, float, float], ...] = ()
    temp_flags: tuple[tuple[int, int], ...] = ()
    temp_masks: tuple[tuple[int, tuple[tuple[int, int], ...]], ...] = ()
    #: (position, 0 voltages / 1 temperatures, factor, offset)
    counts: tuple[tuple[int, int, float, float], ...] = ()
    serial: SerialParts | None = None
    #: this message emits a sample of a pack without per-cell voltages
    trigger: bool = False


#: A decoded frame: the node bits of its id, its route, and the raw values the route indexes.
#: A plain tuple: it is made once per frame, and a named tuple costs several times more.
Decoded = tuple[int, Route, tuple[int, ...]]


def _unpacker(signals: Sequence[Any], length: int) -> Unpack:
    """A function returning the raw values of ``signals``, in order, from ``length`` bytes."""
    if not signals:
        return lambda data: ()
    # the codec builder lays little-endian signals out assuming ascending start bits
    formats = create_encode_decode_formats(sort_signals_by_start_bit(list(signals)), length)
    names = [s.name for s in signals]
    pick: Callable[[Mapping[str, int]], tuple[int, ...]]
    if len(names) == 1:
        only = names[0]

        def pick(unpacked: Mapping[str, int]) -> tuple[int, ...]:
            return (unpacked[only],)
    else:
        pick = itemgetter(*names)
    big = formats.big_endian.unpack
    little = formats.little_endian.unpack
    has_big = any(s.byte_order == "big_endian" for s in signals)
    has_little = any(s.byte_order != "big_endian" for s in signals)
    if has_big and has_little:
        return lambda data: pick({**big(data), **little(data[::-1])})
    if has_big:
        return lambda data: pick(big(data))
    return lambda data: pick(little(data[::-1]))


class _Layout:
    """The signals one unpack returns, in order; routes refer to them by position."""

    def __init__(self, message: Any) -> None:
        self.message = message
        self.signals: list[Any] = []
        self.positions: dict[str, int] = {}
        self._unpack: Unpack | None = None

    def position(self, name: str) -> int:
        if name not in self.positions:
            if self._unpack is not None:
                raise RuntimeError(f"signal {name} added to a compiled layout")
            self.positions[name] = len(self.signals)
            self.signals.append(self.message.get_signal_by_name(name))
        return self.positions[name]

    def unpacker(self) -> Unpack:
        if self._unpack is None:
            self._unpack = _unpacker(self.signals, self.message.length)
        return self._unpack


class _Plan:
    """How to decode one frame id (see the module docstring for the three kinds)."""

    __slots__ = ("kind", "length", "name", "route", "routes", "selector", "unpack",
                 "valid_values")

    def __init__(self, name: str, length: int) -> None:
        self.name = name
        self.length = length
        self.kind = _SINGLE
        #: single: the route; indexed, multiplexed: the route of selector values without one
        self.route: Route | None = None
        self.routes: dict[int, Route] = {}
        #: indexed: unpacks every signal of the plan, the index first
        self.unpack: Unpack = _unpacker((), 0)
        #: multiplexed: the multiplexer's raw value
        self.selector: Callable[[bytes], int] = lambda data: 0
        #: selector values the DBC defines (None: any value); others make the frame malformed
        self.valid_values: frozenset[int] | range | None = None


class _Compiler:
    """Builds the plans of a profile; numbers the voltage groups as it meets them."""

    def __init__(self, profile: Profile) -> None:
        self.trigger = profile.trigger
        self.groups: dict[tuple[str, int | None], int] = {}
        self.group_cells: list[set[int]] = []

    def plan(self, message: Any, bindings: list[Binding]) -> _Plan:
        plan = _Plan(message.name, message.length)
        always = [b for b in bindings if b.selector is None]
        selected = [b for b in bindings if b.selector is not None]
        if not selected:
            plan.route = self.route(message, None, always, _Layout(message))
            return plan
        selector = message.get_signal_by_name(selected[0].selector)
        by_value: dict[int, list[Binding]] = defaultdict(list)
        for binding in selected:
            by_value[binding.selector_value].append(binding)
        shared: _Layout | None = None
        if selector.is_multiplexer:
            plan.kind = _MULTIPLEXED
            plan.selector = self._selector(selector, message.length)
            defined = set(selector.choices or {})
            for signal in message.signals:
                if signal.multiplexer_signal == selector.name:
                    defined.update(signal.multiplexer_ids or ())
            plan.valid_values = frozenset(defined)
        else:
            plan.kind = _INDEXED
            shared = _Layout(message)
            shared.position(selector.name)
            for binding in bindings:
                shared.position(binding.signal)
            plan.unpack = shared.unpacker()
            if selector.minimum is not None and selector.maximum is not None \
                    and selector.maximum > selector.minimum and selector.scale == 1 \
                    and selector.offset == 0:
                plan.valid_values = range(int(selector.minimum), int(selector.maximum) + 1)
        values = set(by_value)
        if always and plan.valid_values is not None:
            values |= set(plan.valid_values)
        for value in sorted(values):
            plan.routes[value] = self.route(message, value, always + by_value.get(value, []),
                                            shared or _Layout(message))
        if always and plan.valid_values is None:
            # any selector value is legal and the always-present signals apply to all of them
            plan.route = self.route(message, None, always, shared or _Layout(message))
        return plan

    @staticmethod
    def _selector(signal: Any, length: int) -> Callable[[bytes], int]:
        unpack = _unpacker([signal], length)
        return lambda data: unpack(data)[0]

    def route(self, message: Any, value: int | None, bindings: list[Binding],
              layout: _Layout) -> Route:
        scalars, texts, fault_bits, counts = [], [], [], []
        voltages, voltage_flags, voltage_masks = [], [], []
        temps, temp_flags, temp_masks = [], [], []
        fault_word = -1
        voltage_group = -1
        serial: dict[Target, int] = {}
        text_signal = None
        for b in bindings:
            t = b.target
            at = layout.position(b.signal)
            if t in SCALAR_TARGETS:
                scalars.append((at, int(t), b.factor, b.offset))
            elif t in TEXT_TARGETS:
                texts.append((at, TEXT_TARGETS.index(t), dict(b.choices)))
            elif t is Target.FAULT_FLAGS:
                fault_word = at
            elif t is Target.FAULT_BIT:
                fault_bits.append((at, b.index))
            elif t is Target.CELL_VOLTAGE:
                voltages.append((at, b.index, b.factor, b.offset))
                voltage_group = self.groups.setdefault((message.name, value), len(self.groups))
                if voltage_group == len(self.group_cells):
                    self.group_cells.append(set())
                self.group_cells[voltage_group].add(b.index)
            elif t is Target.CELL_VOLTAGE_INVALID:
                voltage_flags.append((at, b.index))
            elif t is Target.CELL_VOLTAGE_INVALID_MASK:
                voltage_masks.append((at, b.bits))
            elif t is Target.CELL_TEMP:
                temps.append((at, b.index, b.factor, b.offset))
            elif t is Target.CELL_TEMP_INVALID:
                temp_flags.append((at, b.index))
            elif t is Target.CELL_TEMP_INVALID_MASK:
                temp_masks.append((at, b.bits))
            elif t in (Target.CELL_VOLTAGE_COUNT, Target.CELL_TEMP_COUNT):
                counts.append((at, int(t is Target.CELL_TEMP_COUNT), b.factor, b.offset))
            else:  # the three serial targets
                serial[t] = at
                if t is Target.SERIAL_TEXT:
                    text_signal = message.get_signal_by_name(b.signal)
        serial_parts = None
        if text_signal is not None:
            serial_parts = SerialParts(
                index=serial.get(Target.SERIAL_CHUNK_INDEX, -1),
                count=serial.get(Target.SERIAL_CHUNK_COUNT, -1),
                text=serial[Target.SERIAL_TEXT], chars=text_signal.length // 8,
                byteorder="big" if text_signal.byte_order == "big_endian" else "little")
        parts = ((PART_SCALARS if scalars else 0) | (PART_TEXTS if texts else 0)
                 | (PART_FAULTS if fault_word >= 0 or fault_bits else 0)
                 | (PART_VOLTAGES if voltages or voltage_flags or voltage_masks else 0)
                 | (PART_TEMPS if temps or temp_flags or temp_masks else 0)
                 | (PART_COUNTS if counts else 0) | (PART_SERIAL if serial_parts else 0))
        return Route(
            message=message.name, selector_value=value, unpack=layout.unpacker(), parts=parts,
            scalars=tuple(scalars), texts=tuple(texts), fault_word=fault_word,
            fault_bits=tuple(fault_bits), voltage_group=voltage_group,
            voltages=tuple(voltages), voltage_flags=tuple(voltage_flags),
            voltage_masks=tuple(voltage_masks), temps=tuple(temps),
            temp_flags=tuple(temp_flags), temp_masks=tuple(temp_masks), counts=tuple(counts),
            serial=serial_parts, trigger=self.trigger == message.name)


class Decoder:
    """Decodes the frames a profile uses. Build once per profile; call :meth:`decode` per frame."""

    def __init__(self, profile: Profile, metrics: Metrics) -> None:
        self._metrics = metrics
        self._node_mask = profile.node_id_mask
        self._keep = ~profile.node_id_mask & 0x1FFFFFFF
        db = profile.database
        self._known = frozenset(m.frame_id | (EXTENDED_FLAG if m.is_extended_frame else 0)
                                for m in db.messages)
        by_message: dict[str, list[Binding]] = defaultdict(list)
        for binding in profile.bindings:
            by_message[binding.message].append(binding)
        compiler = _Compiler(profile)
        self._plans: dict[int, _Plan] = {}
        for name, bindings in by_message.items():
            message = db.get_message_by_name(name)
            key = message.frame_id | (EXTENDED_FLAG if message.is_extended_frame else 0)
            self._plans[key] = compiler.plan(message, bindings)
        #: cell indices each voltage group carries, by group id (``Route.voltage_group``)
        self.voltage_groups: tuple[frozenset[int], ...] = tuple(
            frozenset(cells) for cells in compiler.group_cells)
        self._decoded = 0
        self._ignored = 0
        self._synced_decoded = 0
        self._synced_ignored = 0
        self._logged: set[tuple[str, str]] = set()

    # -- per frame ----------------------------------------------------------------------------

    def decode(self, frame: Frame) -> Decoded | None:
        """The frame's node, route and raw values; None when it is ignored or rejected (counted)."""
        if frame.is_error:
            self._reject("error_frame", frame, "")
            return None
        if frame.is_remote:
            self._reject("remote_frame", frame, "")
            return None
        can_id = frame.can_id
        key = (can_id & self._keep) | (EXTENDED_FLAG if frame.is_extended else 0)
        plan = self._plans.get(key)
        if plan is None:
            full_key = can_id | (EXTENDED_FLAG if frame.is_extended else 0)
            if key in self._known or full_key in self._known:
                self._ignore()
            else:
                self._reject("unknown_id", frame, "")
            return None
        data = frame.data
        if len(data) != plan.length:
            if len(data) < plan.length:
                self._reject("malformed", frame,
                             f"{plan.name}: {len(data)} bytes, the DBC says {plan.length}")
                return None
            data = data[:plan.length]
        try:
            kind = plan.kind
            if kind == _SINGLE:
                route = plan.route
                assert route is not None
                values = route.unpack(data)
            else:
                if kind == _INDEXED:
                    values = plan.unpack(data)
                    value = values[0]
                else:
                    value = plan.selector(data)
                found = plan.routes.get(value)
                if found is None:
                    if plan.valid_values is not None and value not in plan.valid_values:
                        self._reject("malformed", frame,
                                     f"{plan.name}: selector value {value} is not in the DBC")
                        return None
                    found = plan.route
                    if found is None:
                        self._ignore()
                        return None
                route = found
                if kind == _MULTIPLEXED:
                    values = route.unpack(data)
        except Exception as exc:  # a codec failure is one bad frame, never the pipeline's end
            self._reject("malformed", frame, f"{plan.name}: {exc!r}")
            return None
        self._decoded += 1
        if self._decoded - self._synced_decoded >= METRICS_BATCH:
            self.sync_metrics()
        return (can_id & self._node_mask, route, values)

    def _ignore(self) -> None:
        self._ignored += 1
        if self._ignored - self._synced_ignored >= METRICS_BATCH:
            self.sync_metrics()

    def _reject(self, reason: str, frame: Frame, detail: str) -> None:
        self._metrics.inc("frames_rejected_total", 1, reason)
        first = (reason, detail.split(":", 1)[0])
        if first not in self._logged:
            self._logged.add(first)
            log.warning("frame_rejected", reason=reason, can_id=f"0x{frame.can_id:X}",
                        detail=detail or None,
                        note="first of its kind; more are only counted (frames_rejected_total)")

    def sync_metrics(self) -> None:
        """Add the locally counted decoded and ignored frames to the shared metrics."""
        if self._decoded != self._synced_decoded:
            self._metrics.inc("frames_decoded_total", self._decoded - self._synced_decoded)
            self._synced_decoded = self._decoded
        if self._ignored != self._synced_ignored:
            self._metrics.inc("frames_ignored_total", self._ignored - self._synced_ignored,
                              "not_used")
            self._synced_ignored = self._ignored

    # -- kernel filtering -------------------------------------------------------------------------

    def receive_filters(self) -> list[dict[str, int | bool]]:
        """python-can ``can_filters`` passing exactly the frame ids the profile uses, any node."""
        filters: list[dict[str, int | bool]] = []
        for key in sorted(self._plans):
            extended = bool(key & EXTENDED_FLAG)
            full = 0x1FFFFFFF if extended else 0x7FF
            filters.append({"can_id": key & full, "can_mask": full & ~self._node_mask,
                            "extended": extended})
        return filters
