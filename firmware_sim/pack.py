"""One simulated pack: its cells (physics), its load schedule, its BMS (sensors and protocol).

:meth:`PackSim.advance` runs the physics over a chunk of steps and keeps every step's true state
(:class:`Chunk`); :meth:`PackSim.frames` turns a chunk into the frames the BMS sends, and
:meth:`PackSim.truth` into the ground truth at any of its steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware_sim import physics as ph
from firmware_sim.chemistry import CHEMISTRIES, energy_grid, ocv_grid, ocv_lookup
from firmware_sim.faults import ValueFaults
from firmware_sim.frames import FrameBatch
from firmware_sim.load import Sequencer
from firmware_sim.protocol import Protocol, payload_bytes
from firmware_sim.scenario import FRAME_NAMES, Scenario, ScenarioError
from firmware_sim.sensors import Sensors

FloatArray = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

STATE_NAMES = ("standby", "drive", "charge", "fault")

# Frame kinds, in the order they follow each other within a burst.
K_STATUS, K_STATS, K_VOLTAGES, K_TEMPS, K_BALANCING, K_IDENTITY, K_INFO = range(7)
_PERIOD_KEYS = ("pack_status_period_s", "cell_stats_period_s", "cell_voltages_period_s",
                "cell_temps_period_s", "balancing_period_s", "identity_period_s",
                "info_period_s")


@dataclass(frozen=True, slots=True)
class Chunk:
    """True state at the start of each of the steps ``k0 .. k0 + n − 1``."""

    k0: int
    n: int
    v: FloatArray  # (n, cells) terminal voltage
    soc: FloatArray  # (n, cells)
    temp: FloatArray  # (n, cells)
    bal: npt.NDArray[np.uint8]  # (n, cells) balancing switch
    i: FloatArray  # (n,) pack current, + discharge
    state: npt.NDArray[np.int8]
    flags: npt.NDArray[np.uint8]
    acc: FloatArray  # (n, N_ACC) running totals
    full_at: tuple[int, ...]  # local steps at which a CC-CV charge ended full


def _ticks(k0: int, n: int, period: int) -> I64:
    """Local indices of the steps in ``k0 .. k0 + n`` that are multiples of ``period``."""
    first = (-k0) % period
    return np.arange(first, n, period, dtype=np.int64)


class PackSim:
    """One pack. ``ordinal`` picks its random streams (0: the primary pack)."""

    def __init__(self, scenario: Scenario, *, seed: int, ordinal: int, node_id: int,
                 phase_s: float, start_us: int, protocol: Protocol,
                 value_faults: ValueFaults | None) -> None:
        self.scenario = scenario
        s = scenario
        self.node_id = node_id
        self.serial = s.pack.serial
        self.chem = CHEMISTRIES[s.pack.chemistry]
        chem = self.chem
        self.cells = n = s.pack.cells
        self.sensor_count = s.pack.sensors
        self.dt = s.protocol.physics_step_s
        self.dt_us = round(self.dt * 1e6)
        self.start_us = start_us
        self._value_faults = value_faults
        build_seq, sensor_seq, drive_seq = np.random.SeedSequence(
            seed, spawn_key=(ordinal,)).spawn(3)
        rng = np.random.default_rng(build_seq)
        rated = s.pack.rated_capacity_ah
        c = s.cell
        self.q_new = rated * (1.0 + rng.uniform(-1.0, 1.0, n) * c.capacity_spread)
        spread = 1.0 + rng.uniform(-1.0, 1.0, n) * c.r0_spread
        self.r0_new = (c.r0_ohm_ah or chem.r0_ohm_ah) / rated * spread
        self.r1_new = (c.r1_ohm_ah or chem.r1_ohm_ah) / rated * spread
        self.r2_new = (c.r2_ohm_ah or chem.r2_ohm_ah) / rated * spread
        self.leak = np.maximum(c.leakage_a + rng.uniform(-1.0, 1.0, n) * c.leakage_spread_a, 0.0)
        for leaky in c.leaky_cells:
            self.leak[leaky.cell] += leaky.current_a
        self.grid = ocv_grid(chem)
        self.energy = energy_grid(self.grid)
        self.sensor_cells = ((np.arange(s.pack.sensors) + 0.5) * n / s.pack.sensors
                             ).astype(np.int64)

        th = s.thermal
        self.cth = np.full(n, th.heat_capacity_j_per_k_ah * rated)
        self.hcool = np.full(n, th.cooling_w_per_k_ah * rated)
        self.hcool[[0, -1]] *= th.end_cell_cooling_gain
        coupling = th.coupling_w_per_k_ah * rated
        if self.dt * float(np.max(self.hcool + 2 * coupling)) / float(self.cth[0]) > 0.5:
            raise ScenarioError(f"scenario '{s.name}': thermal model unstable at physics_step_s "
                                f"{self.dt}: reduce the step or the cooling/coupling")

        par = np.zeros(ph.N_PAR)
        par[ph.P_DT] = self.dt
        par[ph.P_EA_OVER_R] = c.activation_energy_j_mol / ph.GAS_CONSTANT
        par[ph.P_SOC_LOW_GAIN] = c.r0_low_soc_gain
        par[ph.P_SOC_HIGH_GAIN] = c.r0_high_soc_gain
        par[ph.P_TAU1] = c.tau1_s or chem.tau1_s
        par[ph.P_TAU2] = c.tau2_s or chem.tau2_s
        a = s.aging
        par[ph.P_ACCEL] = a.acceleration
        par[ph.P_FADE_EFC] = a.capacity_fade_per_efc
        par[ph.P_FADE_CAL] = a.capacity_fade_per_sqrt_day
        par[ph.P_GROW_EFC] = a.resistance_growth_per_efc
        par[ph.P_GROW_CAL] = a.resistance_growth_per_sqrt_day
        par[ph.P_INIT_EFC] = a.initial_efc
        par[ph.P_INIT_DAYS] = a.initial_age_days
        par[ph.P_RATED_AH] = rated
        par[ph.P_COUPLING] = coupling
        par[ph.P_AMBIENT] = th.ambient_c
        par[ph.P_SWING] = th.ambient_daily_swing_c
        par[ph.P_HOUR0] = th.hour_of_day_at_start
        b = s.balancing
        par[ph.P_BAL_ENABLED] = 1.0 if b.enabled else 0.0
        par[ph.P_BAL_THRESHOLD] = b.threshold_v
        par[ph.P_BAL_CURRENT] = b.current_a
        par[ph.P_BAL_MIN_V] = b.min_cell_v if b.min_cell_v is not None else chem.balancing_min_v
        par[ph.P_BAL_STEPS] = round(s.protocol.balancing_period_s / self.dt)
        pr = s.protection
        par[ph.P_V_MAX] = pr.cell_v_max if pr.cell_v_max is not None else chem.protection_v_max
        par[ph.P_V_MIN] = pr.cell_v_min if pr.cell_v_min is not None else chem.protection_v_min
        par[ph.P_T_MAX] = pr.temp_max_c
        par[ph.P_T_MIN] = pr.temp_min_c
        par[ph.P_I_MAX] = pr.current_max_c * rated
        par[ph.P_HOLD_STEPS] = round(pr.hold_s / self.dt)
        self.par = par

        # State.
        self.soc = np.clip(s.pack.initial_soc + rng.uniform(-1.0, 1.0, n)
                           * s.pack.initial_soc_spread, 0.0, 1.0)
        self.v1 = np.zeros(n)
        self.v2 = np.zeros(n)
        t0 = th.initial_temp_c if th.initial_temp_c is not None else (
            th.ambient_c - th.ambient_daily_swing_c
            * math.cos(2 * math.pi * (th.hour_of_day_at_start - 4.0) / 24.0))
        self.temp = np.full(n, t0)
        self.bal = np.zeros(n, dtype=np.uint8)
        self.acc = np.zeros(ph.N_ACC)
        self.ist = np.zeros(ph.N_IST, dtype=np.int64)
        self.sequencer = Sequencer(scenario, chem, drive_seq)
        self.sensors = Sensors(s.sensors, s.pack.sensors, sensor_seq)

        # BMS firmware.
        p = s.protocol
        self.periods = [round(getattr(p, key) / self.dt) for key in _PERIOD_KEYS]
        self.blocks = [1, 1, -(-n // 3), -(-s.pack.sensors // 6), -(-n // 56),
                       -(-len(self.serial) // 7), 1]
        self.gap_us = round(p.frame_gap_s * 1e6)
        self.phase_us = round(phase_s * 1e6)
        burst_us = sum(self.blocks) * self.gap_us
        if burst_us >= min(self.periods) * self.dt_us:
            raise ScenarioError(f"scenario '{s.name}': a burst of {sum(self.blocks)} frames "
                                f"{p.frame_gap_s} s apart does not fit the shortest period")
        self.protocol = protocol
        self.ids = [protocol.messages[name].frame_id + node_id for name in FRAME_NAMES]
        self._identity = np.array([int.from_bytes(protocol.encode("BMS_Identity", {
            "SerialChunkIndex": i, "SerialChunkCount": self.blocks[K_IDENTITY],
            "SerialText": int.from_bytes(self.serial[i * 7:i * 7 + 7].encode("ascii"), "little"),
        }), "little") for i in range(self.blocks[K_IDENTITY])], dtype=np.uint64)
        self._info = np.array([int.from_bytes(protocol.encode("BMS_Info", {
            "CellCount": n, "SensorCount": s.pack.sensors, "RatedCapacity": rated,
            "Chemistry": chem.code, "ProtocolVersion": p.protocol_version,
        }), "little")], dtype=np.uint64)
        self._status_counter = 0
        self._skew = round(s.sensors.current_skew_s / self.dt)
        self._i_history = np.zeros(self._skew)
        self._bms_soc = float(round(float(np.mean(self.soc)) * 100.0))
        self._reset_pending = False
        self._status_dt = self.periods[K_STATUS] * self.dt

    # ------------------------------------------------------------------------------- physics

    def advance(self, k0: int, n: int) -> Chunk:
        cells = self.cells
        out_v = np.empty((n, cells))
        out_soc = np.empty((n, cells))
        out_temp = np.empty((n, cells))
        out_bal = np.empty((n, cells), dtype=np.uint8)
        out_i = np.empty(n)
        out_state = np.empty(n, dtype=np.int8)
        out_flags = np.empty(n, dtype=np.uint8)
        out_acc = np.empty((n, ph.N_ACC))
        full_at: list[int] = []
        s = 0
        for _ in range(4 * n + 64):  # each run executes steps or ends a segment
            if s >= n:
                break
            run = self.sequencer.next_run(k0 + s, n - s)
            done, reason = ph.advance(
                k0 + s, run.steps, s, run.demand, run.seg, self.par, self.grid,
                self.q_new, self.r0_new, self.r1_new, self.r2_new, self.leak, self.cth,
                self.hcool, self.soc, self.v1, self.v2, self.temp, self.bal, self.acc, self.ist,
                out_v, out_soc, out_temp, out_bal, out_i, out_state, out_flags, out_acc)
            s += done
            self.sequencer.advanced(k0 + s, done, reason)
            if self.sequencer.charge_completed:
                full_at.append(s)
        else:
            raise RuntimeError(f"physics made no progress at step {k0 + s}")
        return Chunk(k0, n, out_v, out_soc, out_temp, out_bal, out_i, out_state, out_flags,
                     out_acc, tuple(full_at))

    # ------------------------------------------------------------------------------- truth

    def truth(self, chunk: Chunk, row: int) -> dict[str, Any]:
        """Ground truth at step ``chunk.k0 + row`` (conventions: docs/simulator.md)."""
        k = chunk.k0 + row
        t = k * self.dt
        acc = chunk.acc[row]
        fade, growth = ph.aging_factors(self.par, float(acc[ph.A_DIS_AH]), t)
        capacity = self.q_new * (1.0 - fade)
        soc = chunk.soc[row]
        rated = float(self.par[ph.P_RATED_AH])
        a = self.scenario.aging
        hour = self.par[ph.P_HOUR0] + t / 3600.0
        volts = chunk.v[row]
        return {
            "t": round(t, 6),
            "ts": round(self.start_us / 1e6 + t, 6),
            "serial": self.serial,
            "node_id": self.node_id,
            "soc": np.round(soc, 7).tolist(),
            "capacity_ah": np.round(capacity, 6).tolist(),
            "r0_25c_ohm": np.round(self.r0_new * growth, 9).tolist(),
            "temp_c": np.round(chunk.temp[row], 4).tolist(),
            "ocv_v": np.round(ocv_lookup(self.grid, soc), 6).tolist(),
            "voltage_v": np.round(volts, 6).tolist(),
            "balancing": chunk.bal[row].astype(int).tolist(),
            "current_a": round(float(chunk.i[row]), 6),
            "pack_voltage_v": round(float(np.sum(volts)), 5),
            "state": STATE_NAMES[int(chunk.state[row])],
            "fault_flags": int(chunk.flags[row]),
            "ambient_c": round(float(self.par[ph.P_AMBIENT] - self.par[ph.P_SWING]
                                     * math.cos(2 * math.pi * (hour - 4.0) / 24.0)), 4),
            "ah_throughput": round(float(acc[ph.A_DIS_AH] + acc[ph.A_CHG_AH]), 6),
            "wh_throughput": round(float(acc[ph.A_DIS_WH] + acc[ph.A_CHG_WH]), 5),
            "efc": round(float(acc[ph.A_DIS_AH]) / rated, 7),
            "discharged_ah": round(float(acc[ph.A_DIS_AH]), 6),
            "charged_ah": round(float(acc[ph.A_CHG_AH]), 6),
            "discharged_wh": round(float(acc[ph.A_DIS_WH]), 5),
            "charged_wh": round(float(acc[ph.A_CHG_WH]), 5),
            "heat_wh": round(float(acc[ph.A_HEAT_WH]), 6),
            "balancing_wh": round(float(acc[ph.A_BAL_WH]), 6),
            "stored_wh": round(float(np.sum(capacity * ocv_lookup(self.energy, soc))), 5),
            "aging_efc": round(a.initial_efc + a.acceleration * float(acc[ph.A_DIS_AH]) / rated,
                               7),
            "aging_days": round(a.initial_age_days + a.acceleration * t / 86400.0, 7),
        }

    # ------------------------------------------------------------------------------- the BMS

    def frames(self, chunk: Chunk) -> FrameBatch:
        """The frames this pack's BMS sends for the chunk, in time order."""
        k0, n = chunk.k0, chunk.n
        ticks = [_ticks(k0, n, p) for p in self.periods]
        payloads: list[npt.NDArray[np.uint64]] = []
        local: list[I64] = []
        blocks: list[I64] = []
        kinds: list[int] = []

        def add(kind: int, at: I64, payload: npt.NDArray[np.uint64]) -> None:
            per = self.blocks[kind]
            payloads.append(payload)
            local.append(np.repeat(at, per))
            blocks.append(np.tile(np.arange(per, dtype=np.int64), len(at)))
            kinds.append(kind)

        codecs = self.protocol.messages
        vf = self._value_faults

        # Cell voltages, measured wherever cell voltages or their extremes are sent.
        v_at = np.union1d(ticks[K_VOLTAGES], ticks[K_STATS])
        v_meas = self.sensors.cell_voltages(chunk.v[v_at])
        v_invalid = (vf.cells(k0 + v_at, v_meas) if vf is not None
                     else np.zeros(v_meas.shape, dtype=np.bool_))
        t_at = np.union1d(ticks[K_TEMPS], ticks[K_STATS])
        t_meas = self.sensors.temperatures(chunk.temp[t_at][:, self.sensor_cells])
        if vf is not None:
            vf.temps(k0 + t_at, t_meas)

        # Pack status.
        at = ticks[K_STATUS]
        if len(at):
            i_all = np.concatenate([self._i_history, chunk.i])
            i_true = i_all[at] if self._skew else chunk.i[at]
            if self._skew:
                self._i_history = i_all[-self._skew:]
            current = self.sensors.current(i_true)
            pack_v = self.sensors.pack_voltage(chunk.v[at].sum(axis=1))
            flags = chunk.flags[at].astype(np.int64)
            if vf is not None:
                vf.scalar("current", k0 + at, current)
                vf.scalar("pack_voltage", k0 + at, pack_v)
                flags |= np.where(vf.sensor_fault(k0 + at), ph.FLAG_SENSOR, 0)
            counter = (self._status_counter + np.arange(len(at))) % 8
            self._status_counter = int(counter[-1] + 1) % 8
            add(K_STATUS, at, codecs["BMS_PackStatus"].pack(
                len(at), PackVoltage=pack_v, PackCurrent=current,
                StateOfCharge=self._bms_soc_at(at, current, chunk.full_at),
                PackState=chunk.state[at].astype(np.int64), StatusCounter=counter,
                FaultFlags=flags))
        elif self._skew:
            self._i_history = np.concatenate([self._i_history, chunk.i])[-self._skew:]

        # Cell extremes, over the cells and sensors the BMS holds valid.
        at = ticks[K_STATS]
        if len(at):
            rows = np.searchsorted(v_at, at)
            vm, inv = v_meas[rows], v_invalid[rows]
            low = np.where(inv, np.inf, vm)
            high = np.where(inv, -np.inf, vm)
            i_low, i_high = np.argmin(low, axis=1), np.argmax(high, axis=1)
            tm = t_meas[np.searchsorted(t_at, at)]
            add(K_STATS, at, codecs["BMS_CellStats"].pack(
                len(at), MinCellVoltage=np.take_along_axis(vm, i_low[:, None], 1)[:, 0],
                MaxCellVoltage=np.take_along_axis(vm, i_high[:, None], 1)[:, 0],
                MinCellTemp=tm.min(axis=1), MaxCellTemp=tm.max(axis=1),
                MinCellVoltageIndex=i_low, MaxCellVoltageIndex=i_high))

        # Cell voltages, three per frame; cells past the last are invalid.
        at = ticks[K_VOLTAGES]
        if len(at):
            nb = self.blocks[K_VOLTAGES]
            rows = np.searchsorted(v_at, at)
            values = np.zeros((len(at), nb * 3))
            values[:, :self.cells] = v_meas[rows]
            invalid = np.ones((len(at), nb * 3), dtype=np.int64)
            invalid[:, :self.cells] = v_invalid[rows]
            values = values.reshape(-1, 3)
            invalid = invalid.reshape(-1, 3)
            add(K_VOLTAGES, at, codecs["BMS_CellVoltages"].pack(
                len(values), CellVoltageBlock=np.tile(np.arange(nb), len(at)),
                CellVoltage0=values[:, 0], CellVoltage1=values[:, 1], CellVoltage2=values[:, 2],
                CellVoltageInvalid=invalid[:, 0] | invalid[:, 1] << 1 | invalid[:, 2] << 2))

        # Temperatures, six per frame.
        at = ticks[K_TEMPS]
        if len(at):
            nb = self.blocks[K_TEMPS]
            values = np.zeros((len(at), nb * 6))
            values[:, :self.sensor_count] = t_meas[np.searchsorted(t_at, at)]
            invalid = np.ones((len(at), nb * 6), dtype=np.int64)
            invalid[:, :self.sensor_count] = 0
            values = values.reshape(-1, 6)
            invalid = invalid.reshape(-1, 6)
            signals = {f"CellTemp{j}": values[:, j] for j in range(6)}
            add(K_TEMPS, at, codecs["BMS_CellTemperatures"].pack(
                len(values), CellTempBlock=np.tile(np.arange(nb), len(at)),
                CellTempInvalid=(invalid << np.arange(6)).sum(axis=1), **signals))

        # Balancing switches, 56 per frame.
        at = ticks[K_BALANCING]
        if len(at):
            nb = self.blocks[K_BALANCING]
            bits = np.zeros((len(at), nb * 56), dtype=np.uint64)
            bits[:, :self.cells] = chunk.bal[at]
            words = (bits.reshape(-1, 56) << np.arange(56, dtype=np.uint64)).sum(axis=1,
                                                                             dtype=np.uint64)
            add(K_BALANCING, at, codecs["BMS_Balancing"].pack(
                len(words), BalancingBlock=np.tile(np.arange(nb), len(at)),
                BalancingFlags=words))

        for kind, constant in ((K_IDENTITY, self._identity), (K_INFO, self._info)):
            at = ticks[kind]
            if len(at):
                add(kind, at, np.tile(constant, len(at)))

        # Burst layout: at each step the frame kinds follow each other in a fixed order.
        base = np.zeros((len(FRAME_NAMES), n), dtype=np.int64)
        running = np.zeros(n, dtype=np.int64)
        for kind, tk in enumerate(ticks):
            base[kind] = running
            running[tk] += self.blocks[kind]
        slot = np.concatenate([base[kind][loc] + blk
                               for kind, loc, blk in zip(kinds, local, blocks, strict=True)])
        step_local = np.concatenate(local)
        order = np.argsort(step_local * (int(running.max()) + 1) + slot, kind="stable")
        step = (k0 + step_local)[order]
        t_us = self.start_us + step * self.dt_us + self.phase_us + slot[order] * self.gap_us
        kind_col = np.concatenate([np.full(len(loc), kind, dtype=np.uint8)
                                   for kind, loc in zip(kinds, local, strict=True)])[order]
        ids = np.asarray(self.ids, dtype=np.uint32)[kind_col]
        data = payload_bytes(np.concatenate(payloads)[order])
        count = len(order)
        return FrameBatch(t_us, ids, data, np.full(count, 8, np.uint8),
                          np.zeros(count, np.uint8), kind_col, step)

    def _bms_soc_at(self, at: I64, current: FloatArray, full_at: tuple[int, ...]) -> FloatArray:
        """The firmware's own SOC: coulomb counting on the measured current, from a rested
        estimate at start, reset to 100 % when a CC-CV charge ends full."""
        per_tick = current * self._status_dt / (3600.0 * self.par[ph.P_RATED_AH]) * 100.0
        resets = set(np.searchsorted(at, full_at).tolist())
        if self._reset_pending:
            resets.add(0)
        # a charge that ended after the chunk's last status frame resets at the next one
        self._reset_pending = len(at) in resets
        soc = self._bms_soc
        out = np.empty(len(at))
        for j, delta in enumerate(per_tick.tolist()):
            if j in resets:
                soc = 100.0
            soc = min(100.0, max(0.0, soc - delta))
            out[j] = soc
        self._bms_soc = soc
        return out
