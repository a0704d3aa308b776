"""firmware_sim: a BMS that plays a simulated battery pack on a CAN bus or into trace files.

It speaks the reference protocol (``dbc/bms_reference.dbc``) at realistic periods, runs a
physically faithful pack model (2-RC cells, Arrhenius resistance, aging, thermal, balancing,
protection), measures it through imperfect sensors, injects faults on request, and tells the
truth it hid in the data. See docs/simulator.md.
"""

from firmware_sim.scenario import Scenario, ScenarioError, load_scenario, shipped_scenarios
from firmware_sim.simulator import DEFAULT_START_TIME, Simulator

__all__ = ["DEFAULT_START_TIME", "Scenario", "ScenarioError", "Simulator", "load_scenario",
           "shipped_scenarios"]
