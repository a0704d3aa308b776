"""What the BMS measures: true values through noise, offsets, gain error and quantisation.

Every noise source draws from its own random stream, and the simulator always advances in chunks
of the same length, so the same seed gives the same numbers whatever the caller does.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from firmware_sim.scenario import SensorSection

FloatArray = npt.NDArray[np.float64]


def quantise(values: FloatArray, lsb: float) -> FloatArray:
    """Round to the converter's least significant bit (0: not quantised)."""
    if lsb <= 0:
        return values
    result: FloatArray = np.rint(values / lsb) * lsb
    return result


class Sensors:
    """The measurement chain of one pack."""

    def __init__(self, cfg: SensorSection, sensors: int, seed_seq: np.random.SeedSequence
                 ) -> None:
        self.cfg = cfg
        fixed, v_seq, p_seq, i_seq, t_seq = seed_seq.spawn(5)
        fixed_rng = np.random.default_rng(fixed)
        self._v_rng = np.random.default_rng(v_seq)
        self._p_rng = np.random.default_rng(p_seq)
        self._i_rng = np.random.default_rng(i_seq)
        self._t_rng = np.random.default_rng(t_seq)
        self.temp_offsets = fixed_rng.uniform(-1.0, 1.0, sensors) * cfg.temp_offset_spread_c
        self.current_offset_a = cfg.current_offset_fs * cfg.current_full_scale_a

    def cell_voltages(self, true_v: FloatArray) -> FloatArray:
        noise = self._v_rng.standard_normal(true_v.shape) * self.cfg.voltage_noise_v
        return quantise(true_v + noise, self.cfg.voltage_lsb_v)

    def pack_voltage(self, true_v: FloatArray) -> FloatArray:
        result: FloatArray = true_v + (self._p_rng.standard_normal(true_v.shape)
                                       * self.cfg.pack_voltage_noise_v)
        return result

    def current(self, true_i: FloatArray) -> FloatArray:
        c = self.cfg
        noise = self._i_rng.standard_normal(true_i.shape) * c.current_noise_a
        return quantise(true_i * (1.0 + c.current_gain_error) + self.current_offset_a + noise,
                        c.current_lsb_a)

    def temperatures(self, true_t: FloatArray) -> FloatArray:
        """``true_t`` is (samples, sensors): the temperature of the cell under each sensor."""
        noise = self._t_rng.standard_normal(true_t.shape) * self.cfg.temp_noise_c
        return quantise(true_t + self.temp_offsets + noise, self.cfg.temp_lsb_c)
