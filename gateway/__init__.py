"""bms-gateway: BMS telemetry from a CAN bus to MQTT, with state of health computed at the edge."""

__version__ = "0.1.0"
